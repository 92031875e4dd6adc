"""How fast the arbiter catches an offline tenant that skips the gate, and whether it ever flags one that does not.

    python3 bench/enforce.py [--device cuda|cpu] [--closures 60] [--hold-ms 200 400] [--gap-ms 200 500]
                             [--out bench/results]

Per tenant, three processes: a real arbiter (``valve runtime arbiter --enforce report``, busy samples from NVML on
CUDA (``--enforce-busy nvml``), from ``/proc`` on the CPU path (``--enforce-busy cpu``)), the tenant, and this one
as the online client (``OnlineSignal``), which closes the gate ``--closures`` times, each for a random
``--hold-ms`` after a random ``--gap-ms`` with the gate open. Tenants:

- ``skip``: matmuls back to back (torch on CUDA, numpy on the CPU path) that never pass a gate; it publishes its
  pid in the control block (``offline_pid``) as the offline ``Gate`` does, so the arbiter knows whom to sample;
- ``gated``: the same work behind a real offline ``Gate`` (the CUDA backend on CUDA, the host one on the CPU).

Per closure: whether the arbiter recorded a violation (the control block's ``violations`` counter) and when
(``violation_ns`` minus the closure), the gate marks the tenant passed while it was closed and, on the CPU
path, the tenant's CPU share after the grace (what the arbiter's samples can see: a tenant that other jobs on
the machine starve of CPU takes little and is not flagged). Written:
``enforce_<device>.json`` and ``.txt`` (detection p50/p99/max for ``skip``, false positives for ``gated``) and a
``.png`` of the detection times when matplotlib is installed.

NVML reports host pids: the tenant's published ``os.getpid()`` is its host pid only outside a container's pid
namespace, as on a bare GPU machine, so this is where the NVML path can be measured.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import env as envrec  # noqa: E402
from bench.harness import output  # noqa: E402
from bench.harness.procs import Child, ChildFailed, Worker, child_env, commands, emit, wait_for  # noqa: E402
from valve.stats import percentile  # noqa: E402

PREFIX = "@enforce "
TENANTS = ("skip", "gated")
CPU_GPU = "GPU-e0f0c0e0-0000-4000-8000-000000000001"  # the control block's name on the CPU path (no GPU)


# ---- the tenant (a child process) ----------------------------------------------------------------------------
def make_work(device: str, size: int, per_step: int):
    """``per_step`` matmuls of ``size`` square matrices: (work, stream, sync). A thread's work: the tenant may run
    several (numpy releases the GIL)."""
    if device == "cpu":
        import numpy as np

        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))

        def work() -> None:
            c = np.empty_like(a)
            for _ in range(per_step):
                np.matmul(a, b, out=c)

        return work, None, lambda: None
    import torch

    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)

    def work() -> None:
        for _ in range(per_step):
            torch.mm(a, b, out=c)

    return work, torch.cuda.current_stream(), torch.cuda.synchronize


def tenant(kind: str, control: str, device: str, size: int, per_step: int, threads: int) -> None:
    """Work until told to exit. On the CPU ``threads`` threads each run the loop, as a GPU kernel spreads over
    SMs: a tenant that takes the device takes several cores, so it stays visible in /proc when other jobs share
    the machine. Each thread of the gated tenant passes the (one, shared) Gate before each step."""
    from valve.runtime.control import ControlBlock

    cmds = commands()
    cb = ControlBlock.open(control)
    work, stream, sync = make_work(device, size, per_step)
    gate = None
    if kind == "gated":
        from valve.runtime.gate.offline import Gate

        gate = Gate(cb, backend="host" if device == "cpu" else "cuda")  # publishes this pid
    else:
        cb.fields.offline_pid = os.getpid()  # what Gate._publish_pid writes, with no gate after it
    work()
    sync()
    stop = threading.Event()
    steps = [0] * (threads if device == "cpu" else 1)

    def loop(k: int) -> None:
        while not stop.is_set():
            if gate is not None:
                gate.gate(stream)  # waits (host) or queues a wait (CUDA) while the gate is closed
            work()
            steps[k] += 1
            if gate is None and steps[k] % 4 == 0:
                sync()  # bound the skipping tenant's queue as an engine's per-step sync does

    workers = [threading.Thread(target=loop, args=(k,), daemon=True) for k in range(len(steps))]
    for w in workers:
        w.start()
    emit({"event": "ready", "pid": os.getpid()}, PREFIX)
    while cmds.get().get("cmd") != "exit":
        pass
    stop.set()
    for w in workers:
        w.join()
    sync()
    emit({"event": "done", "steps": sum(steps), "passed": gate.passed if gate else 0}, PREFIX)


# ---- the orchestrator ----------------------------------------------------------------------------------------
def gpu_uuid(device: str) -> tuple[str, str]:
    """(UUID for --gpu, a name for the result)."""
    if device == "cpu":
        return CPU_GPU, "cpu"
    info = envrec.nvml()
    if "gpu_uuid" not in info:
        raise SystemExit(f"enforce: --device cuda needs a GPU that NVML sees ({info.get('nvml_error', 'none')})")
    return info["gpu_uuid"], info["gpu"]


def arbiter_cmd(gpu: str, runtime_dir: str, busy: str, grace_ms: float, period_ms: float, threshold: float):
    return [sys.executable, "-m", "valve.cli", "runtime", "arbiter", "--gpu", gpu, "--runtime-dir", runtime_dir,
            "--metrics-port", "0", "--no-memory", "--enforce", "report", "--enforce-busy", busy,
            "--enforce-grace-ms", str(grace_ms), "--enforce-period-ms", str(period_ms),
            "--enforce-threshold", str(threshold)]


def phase(kind: str, s: dict, gpu: str, logs: Path) -> dict:
    """One tenant under one arbiter, ``s['closures']`` closures; per-closure records and the tenant's counts."""
    from valve.runtime.arbiter.enforce import CpuTimeSampler
    from valve.runtime.control import (
        FLAG_ARBITER,
        FLAG_CLOSE_ALLOWED,
        GATE_OPEN,
        ControlBlock,
        ControlBlockError,
        control_path,
    )
    from valve.runtime.online.signal import OnlineSignal

    rt = tempfile.mkdtemp(prefix="valve-enforce-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    path = control_path(gpu, rt)
    cenv = child_env(one_thread=s["device"] == "cpu")
    arb = Child(f"arbiter-{kind}", arbiter_cmd(gpu, rt, s["busy"], s["grace_ms"], s["period_ms"], s["threshold"]),
                cenv, logs / f"arbiter-{kind}.log")
    children = [arb]
    ten = None
    try:
        def up() -> bool:
            try:
                return bool(ControlBlock.open(path).fields.flags & FLAG_ARBITER)
            except (ControlBlockError, OSError):
                return False

        wait_for("the arbiter", up, 60, children)
        cb = ControlBlock.open(path)
        f = cb.fields
        ten = Worker(f"tenant-{kind}", [sys.executable, str(Path(__file__).resolve()), "--tenant", kind,
                                        "--control", str(path), "--device", s["device"], "--size", str(s["size"]),
                                        "--per-step", str(s["per_step"]), "--threads", str(s["threads"])],
                     env=cenv, log=logs / f"tenant-{kind}.log", prefix=PREFIX)
        ready = ten.expect("ready", timeout=180)
        if int(f.offline_pid) != ready["pid"]:
            raise ChildFailed(f"tenant {kind}: published pid {int(f.offline_pid)}, runs as {ready['pid']}")
        time.sleep(s["warmup_s"])  # the load's schedule: the tenant runs with the gate open first
        sig = OnlineSignal(cb)
        rng = random.Random(s["seed"])
        records = []
        for i in range(s["closures"]):
            gap, hold = rng.uniform(*s["gap_ms"]), rng.uniform(*s["hold_ms"])
            time.sleep(gap / 1000)
            wait_for("the gate open and closing allowed",
                     lambda: f.gate == GATE_OPEN and bool(f.flags & FLAG_CLOSE_ALLOWED), 10, children, poll=0.001)
            v0 = int(f.violations)
            t0 = time.monotonic_ns()
            if not sig.begin():  # the arbiter closes it on its next step instead
                wait_for("the gate to close", lambda: f.gate != GATE_OPEN, 10, children, poll=0.001)
                t0 = int(f.last_close_ns)
            # counted from the closure, not before begin(): the first begin() claims a slot (file I/O), and the
            # tenant passes gates until the gate is closed
            marks0 = int(f.offline_progress)
            # the tenant's own CPU share after the grace (CPU path): what the arbiter's /proc samples can see
            share = CpuTimeSampler() if s["device"] == "cpu" else None
            time.sleep(min(hold, s["grace_ms"]) / 1000)
            if share is not None:
                share.sample(time.monotonic_ns(), ready["pid"])
            time.sleep(max(0.0, hold - s["grace_ms"]) / 1000)
            cpu = share.sample(time.monotonic_ns(), ready["pid"]) if share is not None else []
            marks = int(f.offline_progress) - marks0  # read while still closed
            sig.end()
            wait_for("the gate to reopen", lambda: f.gate == GATE_OPEN, 10, children, poll=0.001)
            closed_ms = (time.monotonic_ns() - t0) / 1e6
            detected = int(f.violations) > v0  # at most one per closed period, recorded only while closed
            records.append({"i": i, "hold_ms": round(hold, 1), "closed_ms": round(closed_ms, 1),
                            "detected": detected,
                            "detect_ms": round((int(f.violation_ns) - t0) / 1e6, 2) if detected else None,
                            "marks_while_closed": marks,
                            "cpu_share_after_grace": round(cpu[0][1], 2) if cpu else None})
        sig.close()
        ten.send(cmd="exit")
        done = ten.expect("done", timeout=60)
        return {"records": records, "tenant_steps": done["steps"], "gates_passed": done["passed"],
                "arbiter_violations": int(f.violations)}
    finally:
        if ten is not None:
            ten.stop()
        arb.stop()
        shutil.rmtree(rt, ignore_errors=True)


def summary(records: list[dict]) -> dict:
    det = [r["detect_ms"] for r in records if r["detected"]]
    out = {"closures": len(records), "detected": len(det), "detect_rate": len(det) / len(records) if records else None,
           "hold_ms_min": min((r["hold_ms"] for r in records), default=None),
           "max_marks_while_closed": max((r["marks_while_closed"] for r in records), default=None)}
    for name, q in (("p50", 50), ("p99", 99)):
        out[f"detect_{name}_ms"] = round(percentile(det, q), 1) if det else None
    out["detect_min_ms"] = min(det) if det else None
    out["detect_max_ms"] = max(det) if det else None
    return out


def run(device: str = "cpu", closures: int = 60, hold_ms=(200.0, 400.0), gap_ms=(200.0, 500.0),
        grace_ms: float = 50.0, period_ms: float | None = None, threshold: float | None = None,
        size: int | None = None, per_step: int = 4, threads: int = 4, warmup_s: float = 1.0, seed: int = 0,
        tenants=TENANTS, logs: Path | None = None) -> dict:
    """The benchmark; returns the result document."""
    gpu, gpu_name = gpu_uuid(device)
    s = {"device": device, "closures": closures, "hold_ms": list(hold_ms), "gap_ms": list(gap_ms),
         "grace_ms": grace_ms, "busy": "cpu" if device == "cpu" else "nvml",
         # /proc counts in clock ticks (10 ms): a 100 ms period on the CPU path; NVML is sampled as the sidecar does
         "period_ms": period_ms if period_ms is not None else (100.0 if device == "cpu" else 20.0),
         # the host gate polls its word (and the lease) while it waits, every 0.5 ms once a wait passes 5 ms:
         # 0.04-0.06 of a core here (0.2-0.24 when it polled every 50 us throughout, too near 0.3 on a slower
         # machine); the CPU path's threshold sits above it (a GPU gate's wait uses no SM)
         "threshold": threshold if threshold is not None else (0.3 if device == "cpu" else 0.2),
         "size": size if size is not None else (256 if device == "cpu" else 4096), "per_step": per_step,
         "threads": threads if device == "cpu" else 1,  # CUDA: one thread, one stream
         "warmup_s": warmup_s, "seed": seed, "tenants": list(tenants)}
    logs = Path(logs or tempfile.mkdtemp(prefix="valve-enforce-logs-"))
    doc = {"bench": "enforce", "env": envrec.record(device, gpu=gpu_name), "settings": s, "tenants": {}}
    for kind in tenants:
        t0 = time.monotonic()
        res = phase(kind, s, gpu, logs)
        res["summary"] = summary(res["records"])
        res["wall_s"] = round(time.monotonic() - t0, 1)
        doc["tenants"][kind] = res
    if "gated" in doc["tenants"]:
        doc["gated_false_positives"] = doc["tenants"]["gated"]["summary"]["detected"]
    return doc


def table(doc: dict) -> str:
    s = doc["settings"]
    lines = [f"enforce on {doc['env'].get('gpu')} ({s['device']}, busy samples {s['busy']} every {s['period_ms']:g} ms, "
             f"grace {s['grace_ms']:g} ms, threshold {s['threshold']:g}; closures {s['hold_ms'][0]:g}-"
             f"{s['hold_ms'][1]:g} ms)",
             f"{'tenant':<7} {'closures':>8} {'flagged':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'marks':>5}"]
    for kind, res in doc["tenants"].items():
        m = res["summary"]

        def f(x):
            return "-" if x is None else f"{x:.1f}"

        lines.append(f"{kind:<7} {m['closures']:>8} {m['detected']:>7} {f(m['detect_p50_ms']):>7} "
                     f"{f(m['detect_p99_ms']):>7} {f(m['detect_max_ms']):>7} {m['max_marks_while_closed']:>5}")
    lines.append("flagged: closures with a violation recorded; ms: from the closure to the violation; marks: most "
                 "gates the tenant passed in one closure")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    plt = output.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kind, res in doc["tenants"].items():
        xs = sorted(r["detect_ms"] for r in res["records"] if r["detected"])
        if xs:
            ax.step(xs, [(i + 1) / len(res["records"]) for i in range(len(xs))], where="post",
                    label=f"{kind} ({len(xs)}/{len(res['records'])} flagged)")
    ax.set_xlabel("closure -> violation recorded (ms)")
    ax.set_ylabel("share of closures")
    ax.set_title(f"gate enforcement, {doc['env'].get('gpu')}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="enforce", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--closures", type=int, default=60, help="closures per tenant")
    ap.add_argument("--hold-ms", type=float, nargs=2, default=(200.0, 400.0), metavar=("MIN", "MAX"))
    ap.add_argument("--gap-ms", type=float, nargs=2, default=(200.0, 500.0), metavar=("MIN", "MAX"))
    ap.add_argument("--grace-ms", type=float, default=50.0)
    ap.add_argument("--period-ms", type=float, help="busy sample period (default: 20 on CUDA, 100 on the CPU)")
    ap.add_argument("--threshold", type=float, help="busy share that counts (default: 0.2 on CUDA, 0.3 on the CPU)")
    ap.add_argument("--size", type=int, help="matrix side (default: 4096 on CUDA, 256 on the CPU)")
    ap.add_argument("--per-step", type=int, default=4, help="matmuls per step (per gate for the gated tenant)")
    ap.add_argument("--threads", type=int, default=4, help="CPU path: the tenants' worker threads")
    ap.add_argument("--tenants", nargs="+", choices=TENANTS, default=list(TENANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--logs", type=Path, help="the children's logs (default: a temporary folder)")
    ap.add_argument("--tenant", choices=TENANTS, help=argparse.SUPPRESS)
    ap.add_argument("--control", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.tenant:
        tenant(a.tenant, a.control, a.device, a.size, a.per_step, a.threads)
        return 0
    if a.closures < 1 or a.threads < 1 or a.hold_ms[0] > a.hold_ms[1] or a.gap_ms[0] > a.gap_ms[1] or min(*a.hold_ms, *a.gap_ms) < 0:
        ap.exit(2, f"{ap.prog}: --closures and --threads at least 1, --hold-ms and --gap-ms MIN <= MAX, not negative\n")
    output.checked_out(ap, a.out)
    stem = "enforce_" + output.slug(a.device if a.device == "cpu" else envrec.nvml().get("gpu", "cuda"))
    doc = run(a.device, a.closures, tuple(a.hold_ms), tuple(a.gap_ms), a.grace_ms, a.period_ms, a.threshold,
              a.size, a.per_step, a.threads, seed=a.seed, tenants=a.tenants, logs=a.logs)
    try:
        import matplotlib  # noqa: F401
        drawn = lambda p: plot(doc, p)  # noqa: E731
    except ImportError:
        drawn = None
    files = output.write(a.out, stem, doc, table(doc), drawn)
    print(table(doc), end="")
    print("wrote", *files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
