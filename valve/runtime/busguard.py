"""Keep a process alive when a control file is truncated under its mapping.

Touching a page of a shared file mapping past the file's end raises SIGBUS, and Python cannot handle it: its
handlers run between bytecodes, after the faulting load, which the CPU retries for ever. Any tenant that can
write the file can truncate it, and no check before a touch closes the window between the check and the touch.
So a small C handler (``busguard.c``) maps a zero page over the faulting page of a guarded range: the access
completes, the header then reads 0, and the block's next check re-attaches (``ControlBlock.healthy``).

The library is looked for at ``$VALVE_BUSGUARD`` (a path; ``off`` disables the guard), then where the image
installs it, then built with gcc into a per-user cache. Without it a process runs as before and says so once.
``python -m valve.runtime.busguard OUT_DIR`` builds it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path

SOURCE = Path(__file__).with_name("busguard.c")
LIBRARY = "libvalvebusguard.so"
ENV = "VALVE_BUSGUARD"
INSTALLED = Path("/opt/valve/lib") / LIBRARY  # where the image builds it (Dockerfile)

log = logging.getLogger(__name__)
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def build(out_dir: str | os.PathLike) -> Path:
    from valve.cbuild import compile_shared

    return compile_shared(SOURCE, Path(out_dir) / LIBRARY, libs=["-lpthread"])


def _cached() -> Path:
    """Built once per source text and user (a cache that outlives the process, not shared between users)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    for root in (Path(base), Path(tempfile.gettempdir()) / f"valve-{os.geteuid()}"):
        lib = root / "valve" / f"busguard-{digest}" / LIBRARY
        if lib.exists():
            return lib
        try:
            return build(lib.parent)
        except OSError:
            continue  # a read-only or missing home: the next place
    raise RuntimeError("no writable cache directory to build it in")


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        where = os.environ.get(ENV, "")
        if where == "off":
            return None
        try:
            path = Path(where) if where else INSTALLED if INSTALLED.exists() else _cached()
            lib = ctypes.CDLL(str(path))
        except (OSError, RuntimeError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.warning("no SIGBUS guard (%s): a control file truncated under this process can kill it", first)
            return None
        lib.valve_busguard_add.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.valve_busguard_remove.argtypes = [ctypes.c_void_p]
        lib.valve_busguard_replaced.restype = ctypes.c_ulong
        _lib = lib
        return lib


def protect(address: int, length: int) -> bool:
    """Guard a mapping; False when no guard is available (logged once) or its table is full."""
    lib = _load()
    return lib is not None and lib.valve_busguard_add(address, length) == 0


def release(address: int) -> None:
    """Stop guarding the mapping at ``address``: call before the mapping is closed."""
    if _lib is not None:
        _lib.valve_busguard_remove(address)


def pages_replaced() -> int:
    """How many touches of a truncated file the guard has absorbed in this process."""
    return int(_lib.valve_busguard_replaced()) if _lib is not None else 0


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "."))
