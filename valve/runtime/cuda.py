"""Shared helpers for the CUDA backends of the gate and the memory pool (cuda-python's driver API).

Imported lazily: needs `valve[cuda]`."""

from __future__ import annotations

import functools
import threading

_bound = threading.local()  # threads on which ensure_context() found or made a current context


def _bindings(name: str, legacy: str, what: str):
    """`cuda.bindings.<name>`, or `cuda.<legacy>` of cuda-python < 12.6, with a clear error when missing."""
    import importlib

    try:
        return importlib.import_module(f"cuda.bindings.{name}")
    except ImportError:
        try:
            return importlib.import_module(f"cuda.{legacy}")
        except ImportError as e:
            raise RuntimeError(f"{what} needs cuda-python: pip install 'valve[cuda]'") from e


@functools.cache  # check() looks it up on every driver call
def driver():
    """The CUDA driver API module."""
    return _bindings("driver", "cuda", "the CUDA backend")


@functools.cache
def nvrtc():
    """The NVRTC module (the spin gate compiles its kernel with it)."""
    return _bindings("nvrtc", "nvrtc", "the spin gate")


class CudaError(RuntimeError):
    """A CUDA driver call failed; the message names the call (``what``) and the error."""

    def __init__(self, what: str, code: int, name: str) -> None:
        super().__init__(f"{what} failed: {name} ({code})")
        self.code, self.name = code, name


def check(result, what: str = "CUDA driver call"):
    """Unwrap a cuda-python result tuple; raise :class:`CudaError` naming ``what`` on any error code."""
    cu = driver()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        try:
            name = cu.cuGetErrorName(err)[1].decode()
        except Exception:  # noqa: BLE001 - best effort for the message
            name = str(err)
        raise CudaError(what, int(err), name)
    return rest[0] if len(rest) == 1 else tuple(rest) if rest else None


def ensure_context(device: int | None = None) -> None:
    """Make the device's primary context current on this thread if none is. The CUDA runtime (torch) binds it
    lazily per thread, and a cached torch allocation binds nothing, so a new thread's first driver call would
    fail with CUDA_ERROR_INVALID_CONTEXT."""
    if getattr(_bound, "ok", False):  # checked once per thread: this sits on the gate's per-sub-layer path
        return
    cu = driver()
    ctx = check(cu.cuCtxGetCurrent())
    if ctx is not None and int(ctx) != 0:
        _bound.ok = True
        return
    if device is None:
        import torch

        device = torch.cuda.current_device()
    ctx = check(cu.cuDevicePrimaryCtxRetain(check(cu.cuDeviceGet(device))))
    check(cu.cuCtxSetCurrent(ctx))
    _bound.ok = True
