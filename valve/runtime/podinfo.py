"""The pod's annotations from a downward-API volume file, and waiting for the GPU annotation to appear.

The kubelet writes `metadata.annotations` as one `key="value"` line per annotation (the value Go-quoted,
so one line each) and replaces the file when the annotations change, unlike a downward-API env variable,
which is fixed when the container starts. The device plugin writes `valve.io/gpu-uuid` after allocation.
"""

from __future__ import annotations

import ast
import logging
import time
from collections.abc import Callable
from pathlib import Path

from valve.api.contract import ANN_GPU

log = logging.getLogger(__name__)


def parse_annotations(text: str) -> dict[str, str]:
    """`key="value"` lines to a dict; raises ValueError naming the bad line."""
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, quoted = line.partition("=")
        value = None
        if sep and quoted.startswith('"') and quoted.endswith('"') and len(quoted) >= 2:
            try:
                value = ast.literal_eval(quoted)  # Go's %q escapes are a subset of Python's
            except (SyntaxError, ValueError):
                value = None
        if not key or not isinstance(value, str):
            raise ValueError(f'line {n}: expected key="value", got {line[:120]!r}')
        out[key] = value
    return out


def read_annotations(path: str | Path) -> dict[str, str]:
    """The annotations in `path`; {} while the file does not exist yet."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return {}
    try:
        return parse_annotations(text)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def wait_for_annotation(
    path: str | Path,
    key: str = ANN_GPU,
    timeout_s: float = 300.0,
    poll_s: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    stop: Callable[[], bool] = lambda: False,
) -> str:
    """The value of annotation `key` in `path` once it is there and not empty.

    Raises TimeoutError after `timeout_s` (or when `stop()` turns true) and ValueError on an unreadable file.
    """
    start = clock()
    value = read_annotations(path).get(key)
    if value:
        return value
    log.info("waiting up to %.0f s for annotation %s in %s (the device plugin writes it after allocation)",
             timeout_s, key, path)
    while True:
        if stop() or clock() - start >= timeout_s:
            raise TimeoutError(
                f"annotation {key} did not appear in {path} within {timeout_s:.0f} s: is the Valve device plugin "
                f"running with --annotate on this node, and allowed to patch pods?"
            )
        sleep(poll_s)
        value = read_annotations(path).get(key)
        if value:
            log.info("annotation %s = %s (after %.1f s)", key, value, clock() - start)
            return value


def resolve_gpu(gpu: str | None, gpu_from: str | None, wait_s: float, single: bool = False, **kw) -> str | None:
    """The GPU from `--gpu`, else from the `--gpu-from` annotations file (waiting), else None.

    `single`: refuse a list of GPUs (the arbiter owns one). Raises ValueError or TimeoutError.
    """
    if gpu:
        if gpu_from:
            log.info("--gpu %s given: not reading %s", gpu, gpu_from)
    elif gpu_from:
        gpu = wait_for_annotation(gpu_from, ANN_GPU, wait_s, **kw)
    else:
        return None
    if single and "," in gpu:
        raise ValueError(f"one GPU expected, got {gpu!r}")
    return gpu
