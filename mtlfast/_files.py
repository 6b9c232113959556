"""Small file helpers shared by the package."""
from __future__ import annotations

import json
import os
import tempfile


def write_json_atomically(path: str | os.PathLike, data: object) -> str:
    """Writes ``data`` as JSON to ``path`` through a uniquely named temporary file in the same folder and a rename,
    creating the folder: a reader (or a process writing the same file at once, as DDP ranks may) never sees a
    partial file, and a run stopped mid-write leaves the previous file intact. Returns ``path`` as a string."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
