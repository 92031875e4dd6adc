"""Compile a small C shared library with gcc (no CUDA toolkit): the preload gate and the SIGBUS guard."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def compile_shared(source: Path, out: Path, flags: list[str] | tuple[str, ...] = (),
                   libs: list[str] | tuple[str, ...] = (), cc: str | None = None) -> Path:
    """Compile ``source`` into ``out`` (written under a temporary name and renamed, so a concurrent build or a
    process loading ``out`` never sees half a file). Raises RuntimeError with the compiler's output on failure."""
    cc = cc or os.environ.get("CC") or "gcc"
    if shutil.which(cc) is None:
        raise RuntimeError(f"building {out.name} needs a C compiler: {cc!r} is not on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cmd = [cc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-fvisibility=hidden", *flags,
           "-o", str(tmp), str(source), *libs]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr}")
    os.replace(tmp, out)
    return out
