"""Shared helpers for the CUDA backends (cuda-python's driver API). Imported lazily: needs `valve[cuda]`."""

from __future__ import annotations


def driver():
    """The `cuda.bindings.driver` module (or the older `cuda.cuda`), with a clear error when missing."""
    try:
        from cuda.bindings import driver as cu
    except ImportError:
        try:
            from cuda import cuda as cu  # cuda-python < 12.6
        except ImportError as e:
            raise RuntimeError("the CUDA backend needs cuda-python: pip install 'valve[cuda]'") from e
    return cu


def check(result):
    """Unwrap a cuda-python result tuple, raising on any error code."""
    cu = driver()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(err)
        raise RuntimeError(f"CUDA driver error {name.decode() if name else err}")
    return rest[0] if len(rest) == 1 else tuple(rest) if rest else None


def ensure_context(device: int | None = None) -> None:
    """Make the device's primary context current on this thread if none is. The CUDA runtime (torch) binds it
    lazily per thread, and a cached torch allocation binds nothing, so a new thread's first driver call would
    fail with CUDA_ERROR_INVALID_CONTEXT."""
    cu = driver()
    ctx = check(cu.cuCtxGetCurrent())
    if ctx is not None and int(ctx) != 0:
        return
    if device is None:
        import torch

        device = torch.cuda.current_device()
    ctx = check(cu.cuDevicePrimaryCtxRetain(check(cu.cuDeviceGet(device))))
    check(cu.cuCtxSetCurrent(ctx))
