"""The environment a result was measured in: Python, host, torch and its CUDA, driver, GPU, clocks.

Nothing here creates a CUDA context or imports torch (NVML and package metadata only), so the orchestrator of a
benchmark can call it next to its engines.
"""

from __future__ import annotations

import os
import platform
import re
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec


def visible_index() -> int:
    """NVML index of the first GPU in CUDA_VISIBLE_DEVICES (0 if unset or a UUID)."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def torch_versions() -> dict:
    """torch's version and the CUDA it was built for, read from its files (importing torch takes seconds)."""
    try:
        out = {"torch": version("torch"), "cuda": None}
    except PackageNotFoundError:
        return {"torch": None, "cuda": None}
    spec = find_spec("torch")
    if spec and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "version.py")
        try:
            m = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", open(path).read(), re.M)  # noqa: SIM115
            out["cuda"] = m.group(1) if m else None
        except OSError:
            pass
    return out


def nvml(index: int | None = None) -> dict:
    """Driver, GPU name, UUID, memory and max clocks from NVML; {'nvml_error': ...} without a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - no NVML library or no driver: a CPU machine
        return {"nvml_error": f"{type(e).__name__}: {e}"}
    try:
        out = {"driver": _s(pynvml.nvmlSystemGetDriverVersion()),
               "cuda_driver": pynvml.nvmlSystemGetCudaDriverVersion()}
        if pynvml.nvmlDeviceGetCount() > 0:
            h = pynvml.nvmlDeviceGetHandleByIndex(visible_index() if index is None else index)
            out.update(gpu=_s(pynvml.nvmlDeviceGetName(h)), gpu_uuid=_s(pynvml.nvmlDeviceGetUUID(h)),
                       gpu_total_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(h).total))
            try:
                out["clocks_max_mhz"] = {"sm": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                                         "mem": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)}
            except Exception:  # noqa: BLE001 - not every board reports clocks
                pass
        return out
    except Exception as e:  # noqa: BLE001
        return {"nvml_error": f"{type(e).__name__}: {e}"}
    finally:
        pynvml.nvmlShutdown()


def record(device: str, gpu: str = "cpu", **defaults) -> dict:
    """One dict for a result's ``env``: python, host, device, torch, cuda, and on CUDA the NVML fields.

    ``gpu`` (and ``defaults``) stand where NVML has nothing to say (``cpu``, ``sim``)."""
    out = {"device": device, "python": platform.python_version(), "host": platform.node(), "gpu": gpu,
           **torch_versions(), **defaults}
    if device == "cuda":
        out.update(nvml())
    return out


def has_gpu() -> bool:
    """NVML sees at least one GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount() > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML library or no driver: no GPU
        return False
