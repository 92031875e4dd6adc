"""Build libvalvegate.so with gcc (no CUDA toolkit needed): ``python -m valve.preload.build OUT_DIR``.

The control block's offsets and header come from ``valve.runtime.control`` (stdlib only), passed as -D flags, so
the C library cannot drift from the Python layout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from valve.cbuild import compile_shared
from valve.runtime.control import FILE_SIZE, MAGIC, VERSION, Layout

SOURCE = Path(__file__).with_name("valvegate.c")
LIBRARY = "libvalvegate.so"
FIELDS = ("magic", "version", "size", "gate", "heartbeat_ns", "queue_ahead", "lease_ns", "forced_opens",
          "preload_launches", "preload_waits", "preload_captured", "preload_throttled", "offline_pid")


def defines() -> list[str]:
    flags = [f"-DOFF_{f.upper()}={getattr(Layout, f).offset}" for f in FIELDS]
    return [*flags, f"-DMAGIC={MAGIC:#x}u", f"-DVERSION={VERSION}", f"-DFILE_SIZE={FILE_SIZE}"]


def build(out_dir: str | os.PathLike, cc: str | None = None) -> Path:
    """Compile the library into ``out_dir``; returns its path. Raises RuntimeError with gcc's output on failure."""
    return compile_shared(SOURCE, Path(out_dir) / LIBRARY, cc=cc, libs=["-ldl", "-lpthread"],
                          flags=["-foptimize-sibling-calls",  # dlsym passes through by tail call: glibc sees the caller
                                 *defines()])


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "."))
