"""Small file helpers shared by the package."""
from __future__ import annotations

import json
import os
import tempfile
from typing import IO, Callable


def _chmod_as_new_file(path: str) -> None:
    """Gives a mkstemp file (owner-only ``0o600``) the permissions of any new file: ``0o666`` less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_atomically(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = False,
                     prefix: str = ".tmp_", durable: bool = False) -> str:
    """Calls ``write(file)`` on a uniquely named temporary file (``prefix``...) in ``path``'s folder, creating the
    folder, and renames it over ``path``: a reader (or a process writing the same file at once, as DDP ranks may)
    never sees a partial file, and a write stopped midway leaves the previous file intact and removes the
    temporary one. The file gets the permissions of any new file. ``durable``: the file is fsynced before the
    rename and the folder after it, so that the rename survives a power loss too. Returns ``path`` as a string."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=os.path.splitext(path)[1], dir=folder)
    try:
        _chmod_as_new_file(tmp)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            folder_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(folder_fd)
            finally:
                os.close(folder_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> str:
    """Writes ``text`` to ``path`` atomically (:func:`write_atomically`). Returns ``path`` as a string."""
    return write_atomically(path, lambda f: f.write(text))


def write_json_atomically(path: str | os.PathLike, data: object) -> str:
    """Writes ``data`` as JSON to ``path`` atomically (:func:`write_text_atomically`). Returns ``path``."""
    return write_text_atomically(path, json.dumps(data, indent=1))


def read_json(path: str | os.PathLike) -> object:
    """The JSON document in ``path``; a file that is not JSON (truncated, or not UTF-8 text) raises a ValueError
    naming it, not the decoder's bare position."""
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{os.fspath(path)}: not a readable JSON file ({exc})") from None
