"""Output paths given on the command line, checked before a long run: a file where a folder is expected, or a
folder this process cannot write, is one line at once rather than a traceback when the results are written.
Standard library only."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _why(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    return f"{e.strerror or e}{where}"


def check_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """The folder `path`, created if missing, once a file could be made (and removed) in it. ValueError naming
    `option` otherwise. A real write, not os.access: root passes every permission check yet cannot write a
    read-only or virtual filesystem."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{option} {str(p)!r}: is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise ValueError(f"{option} {str(p)!r}: cannot write there: {_why(e)}") from None
    return p


def check_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """The file `path` (not created; its folder is, as `check_dir`), when it could be written. ValueError otherwise."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{option} {str(p)!r}: is a folder, not a file")
    check_dir(p.parent, option)
    if p.exists():
        try:
            with open(p, "r+b"):  # opened for writing, not changed
                pass
        except OSError as e:
            raise ValueError(f"{option} {str(p)!r}: cannot write it: {_why(e)}") from None
    return p
