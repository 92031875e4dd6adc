"""The CUDA gate backend: the offline stream waits on the control block's gate word in mapped host memory.

The control page (one mmap'ed page) is registered with ``cuMemHostRegister(..., DEVICEMAP)``; at each sub-layer
boundary the offline client enqueues ``cuStreamWaitValue32(stream, gate, GATE_OPEN, EQ)`` on the current torch
stream. Under CUDA-graph capture a plain stream memop is not captured, so the wait goes into the graph as a
batch memop node (``cuGraphAddBatchMemOpNode`` + ``cuStreamUpdateCaptureDependencies``): replays then wait on
the same word. Queue-ahead marks are torch CUDA events. Imported lazily: needs torch and cuda-python.

Second gate kind, ``mode="spin"``: a one-thread kernel that polls the mapped word (``__nanosleep`` between reads)
and records ``%globaltimer`` when it finds the gate closed. It is an ordinary kernel launch, so it is captured into
graphs everywhere; but while it spins the offline context still has a running kernel, so without MPS the GPU keeps
time-slicing to it. ``capture="spin"`` uses it only under capture. The bench measures both.
"""

from __future__ import annotations

import threading

from valve.api.contract import RUNTIME_DIR
from valve.runtime.control import FILE_SIZE, GATE_OFFSET, GATE_OPEN, ControlBlock
from valve.runtime.cuda import check, driver, ensure_context, nvrtc

_registered: dict[int, int] = {}  # host page address -> device pointer (one registration per mapping)
_reg_lock = threading.Lock()


def map_page(host_addr: int) -> int:
    """Register one control page (pinned, mapped into the device address space); return its device pointer."""
    cu = driver()
    with _reg_lock:
        if host_addr not in _registered:
            check(cu.cuMemHostRegister(host_addr, FILE_SIZE, cu.CU_MEMHOSTREGISTER_DEVICEMAP
                                       | cu.CU_MEMHOSTREGISTER_PORTABLE))
            _registered[host_addr] = int(check(cu.cuMemHostGetDevicePointer(host_addr, 0)))
        return _registered[host_addr]


def unmap_page(host_addr: int) -> None:
    cu = driver()
    with _reg_lock:
        if _registered.pop(host_addr, None) is not None:
            check(cu.cuMemHostUnregister(host_addr))


def capture_info(stream) -> tuple[bool, object, list]:
    """(capturing, graph, dependencies) of a stream, across cuda-python versions."""
    cu = driver()
    res = check(cu.cuStreamGetCaptureInfo(stream))
    status = res[0] if isinstance(res, tuple) else res
    if status != cu.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_ACTIVE:
        return False, None, []
    if isinstance(res, tuple) and len(res) >= 5:  # cuda-python 13: status, id, graph, deps, edges, n
        graph, deps = res[2], res[3]
        n = res[-1]
    else:  # cuda-python 12: the _v2 call has the graph and dependencies
        _, _, graph, deps, n = check(cu.cuStreamGetCaptureInfo_v2(stream))
    return True, graph, list(deps)[: int(n)]


def wait_value_node(stream, dptr: int, value: int) -> None:
    """Append a wait-on-word node to the graph a stream is capturing into, and make it the stream's tail."""
    cu = driver()
    _, graph, deps = capture_info(stream)
    op = cu.CUstreamBatchMemOpParams()
    op.waitValue.operation = cu.CUstreamBatchMemOpType.CU_STREAM_MEM_OP_WAIT_VALUE_32
    op.waitValue.address = cu.CUdeviceptr(dptr)
    op.waitValue.value = value
    op.waitValue.flags = cu.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_EQ
    params = cu.CUDA_BATCH_MEM_OP_NODE_PARAMS()
    params.ctx = check(cu.cuCtxGetCurrent())
    params.count = 1
    params.paramArray = [op]
    params.flags = 0
    node = check(cu.cuGraphAddBatchMemOpNode(graph, deps, len(deps), params))
    flag = cu.CUstreamUpdateCaptureDependencies_flags.CU_STREAM_SET_CAPTURE_DEPENDENCIES
    try:  # cuda-python 13 takes edge data
        check(cu.cuStreamUpdateCaptureDependencies(stream, [node], None, 1, flag))
    except TypeError:
        check(cu.cuStreamUpdateCaptureDependencies(stream, [node], 1, flag))


SPIN_SRC = r"""
extern "C" __global__ void valve_gate_spin(const volatile unsigned int* gate, unsigned int open,
                                           unsigned long long* parked) {
    if (*gate == open) return;
    if (parked) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        *parked = t;
    }
    while (*gate != open) { __nanosleep(2000); }
}
"""


def compile_spin_kernel():
    """Compile the spin-gate kernel for the current device (NVRTC -> CUBIN) and return its CUfunction."""
    cu, nv = driver(), nvrtc()

    def nvcheck(res, what):
        err, *rest = res
        if err != nv.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC {what} failed: {err}")
        return rest[0] if rest else None

    dev = check(cu.cuCtxGetDevice())
    major = check(cu.cuDeviceGetAttribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev))
    minor = check(cu.cuDeviceGetAttribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev))
    prog = nvcheck(nv.nvrtcCreateProgram(SPIN_SRC.encode(), b"valve_gate_spin.cu", 0, [], []), "create")
    opts = [f"--gpu-architecture=sm_{major}{minor}".encode()]
    (err,) = nv.nvrtcCompileProgram(prog, len(opts), opts)
    if err != nv.nvrtcResult.NVRTC_SUCCESS:
        size = nvcheck(nv.nvrtcGetProgramLogSize(prog), "log size")
        buf = b" " * size
        nv.nvrtcGetProgramLog(prog, buf)
        raise RuntimeError(f"NVRTC could not compile the spin gate for sm_{major}{minor}: {buf.decode(errors='replace')}")
    size = nvcheck(nv.nvrtcGetCUBINSize(prog), "CUBIN size")
    cubin = b" " * size
    nvcheck(nv.nvrtcGetCUBIN(prog, cubin), "get CUBIN")
    module = check(cu.cuModuleLoadData(cubin))
    return check(cu.cuModuleGetFunction(module, b"valve_gate_spin"))


class CudaGateBackend:
    """Gate waits and queue-ahead marks on the current (or given) torch CUDA stream.

    ``mode``: "memop" (``cuStreamWaitValue32``) or "spin" (the polling kernel) for eager waits; ``capture``:
    which of the two to put into a CUDA graph under capture ("memop" = a batch memop node).
    """

    name = "cuda"
    can_block = True

    def __init__(self, cb: ControlBlock, mode: str = "memop", capture: str = "memop") -> None:
        import torch

        if mode not in ("memop", "spin") or capture not in ("memop", "spin"):
            raise ValueError(f"mode and capture must be 'memop' or 'spin', got {mode!r}, {capture!r}")
        self.mode, self.capture = mode, capture
        self._spin = None

        if not torch.cuda.is_available():
            raise RuntimeError("the CUDA gate backend needs a CUDA device")
        torch.cuda.init()
        ensure_context()
        self.torch, self.cu = torch, driver()
        self.page = cb.page_address()
        try:
            self.gate_dptr = map_page(self.page) + GATE_OFFSET
        except RuntimeError as e:
            raise RuntimeError(f"cannot map the control block {cb.path or '(anonymous)'} into the GPU: {e}. "
                               f"It must live on tmpfs ({RUNTIME_DIR}, /run, /dev/shm): CUDA cannot register a "
                               "page of a disk-backed file") from e
        self.parked_dptr = 0  # where the spin kernel writes %globaltimer when it parks (0: nowhere)
        if "spin" in (mode, capture):
            self._spin = compile_spin_kernel()

    def bind(self, cb: ControlBlock) -> None:
        """The Gate re-attached to a new mapping (the file was replaced): wait on the new page's word."""
        if cb.page_address() != self.page:
            ensure_context()  # the Gate's watchdog thread may be the one that sees the re-attach
            unmap_page(self.page)  # the old mapping stays alive (ControlBlock keeps it), so this is valid
            self.page = cb.page_address()
            self.gate_dptr = map_page(self.page) + GATE_OFFSET

    def _stream(self, stream=None):
        ensure_context()  # every driver call below; the caller's thread may have no current context
        s = stream if stream is not None else self.torch.cuda.current_stream()
        return self.cu.CUstream(int(getattr(s, "cuda_stream", s)))

    def capturing(self, stream=None) -> bool:
        return capture_info(self._stream(stream))[0]

    def spin(self, stream=None) -> None:
        """Enqueue the spin-gate kernel (capturable)."""
        import ctypes

        args = ((self.gate_dptr, GATE_OPEN, self.parked_dptr), (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p))
        check(self.cu.cuLaunchKernel(self._spin, 1, 1, 1, 1, 1, 1, 0, self._stream(stream), args, 0))

    def wait(self, stream=None) -> None:
        """Enqueue: later work on the stream runs only once the gate word equals GATE_OPEN."""
        cu, s = self.cu, self._stream(stream)
        capturing = capture_info(s)[0]
        if (self.capture if capturing else self.mode) == "spin":
            self.spin(stream)
        elif capturing:
            wait_value_node(s, self.gate_dptr, GATE_OPEN)
        else:
            check(cu.cuStreamWaitValue32(s, cu.CUdeviceptr(self.gate_dptr), GATE_OPEN,
                                         cu.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_EQ))

    def mark(self, stream=None):
        ev = self.torch.cuda.Event()
        ev.record(stream)
        return ev

    def reached(self, mark) -> bool:
        return mark.query()

    def now_ns(self) -> int:
        import time

        return time.monotonic_ns()


def selfcheck(out: str | None = None) -> dict:
    """GPU check of each gate kind: eager memop, eager spin, graph-captured memop node, graph-captured spin.
    A closed gate must hold the work behind it; opening it must release it. ``python3 -m valve.runtime.gate.cuda``."""
    import json
    import tempfile
    import time
    from pathlib import Path

    import torch

    from valve.runtime.control import GATE_CLOSED

    cb = ControlBlock.create(Path(tempfile.mkdtemp(dir="/dev/shm")) / "GPU-selfcheck" / "control")
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "driver": int(check(driver().cuDriverGetVersion()))}
    for mode, captured in (("memop", False), ("spin", False), ("memop", True), ("spin", True)):
        name = f"{mode}{'-graph' if captured else ''}"
        try:
            be = CudaGateBackend(cb, mode=mode, capture=mode)
            x = torch.zeros(1, device="cuda")
            s = torch.cuda.Stream()
            if captured:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
                    be.wait(s)
                    x.add_(1)
            with torch.cuda.stream(s):  # one pass with the gate open: loads every kernel (lazy module loading
                if captured:  # would otherwise block this thread's next launch behind the closed gate)
                    g.replay()
                else:
                    be.wait(s)
                    x.add_(1)
            torch.cuda.synchronize()
            x.zero_()
            torch.cuda.synchronize()
            cb.fields.gate = GATE_CLOSED
            t0 = time.perf_counter()
            with torch.cuda.stream(s):
                if captured:
                    g.replay()
                else:
                    be.wait(s)
                    x.add_(1)
                ev = be.mark(s)
            time.sleep(0.05)
            held = not ev.query()
            cb.fields.gate = GATE_OPEN
            ev.synchronize()
            res[name] = {"held_while_closed": held, "released": float(x.item()) == 1.0,
                         "seconds": round(time.perf_counter() - t0, 4)}
        except Exception as e:  # noqa: BLE001 - report each kind, keep going
            cb.fields.gate = GATE_OPEN
            res[name] = f"FAILED: {type(e).__name__}: {e}"
        print(f"[gate_cuda] {name}: {res[name]}", flush=True)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gate_cuda_selfcheck.json").write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    import sys

    selfcheck(sys.argv[1] if len(sys.argv) > 1 else None)
