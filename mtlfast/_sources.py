"""The digest of the C++/CUDA sources (``csrc/``), computed alike by setup.py, which builds it into the
extension's ``build_info`` ("sources=<digest>"), and by mtlfast for the tree next to an editable install: an
extension built from other sources than the tree's (csrc edited, not rebuilt; a warm GPU machine's old build) is
named by ``mtlfast info`` and refused by ``mtlfast bench``, whose results would credit the tree with its numbers.
Standard library only: setup.py loads this file by path, before the package is installed."""
from __future__ import annotations

import hashlib
import os

SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def csrc_digest(csrc: str) -> str | None:
    """16 hex digits of SHA-256 over the relative paths and contents of ``csrc``'s sources; None without it."""
    if not os.path.isdir(csrc):
        return None
    files = sorted(os.path.relpath(os.path.join(d, f), csrc) for d, _, names in os.walk(csrc) for f in names
                   if f.endswith(SUFFIXES))
    digest = hashlib.sha256()
    for rel in files:
        digest.update(rel.replace(os.sep, "/").encode())
        with open(os.path.join(csrc, rel), "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()[:16]
