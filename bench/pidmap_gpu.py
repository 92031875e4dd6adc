"""Enforcement's pid map on a real GPU, without a cluster.

A CUDA tenant runs in its own pid namespace (``unshare --pid``, as in a pod) and, where cgroup v2 lets us, in a
cgroup named like a kubelet's pod slice. The device plugin's ``PidMapWriter`` (over NVML) writes the GPU's
``pids.json``; the arbiter's ``PidMap`` turns the pid the tenant sees as its own (the one a ``Gate`` publishes)
into the host pid NVML reports, and ``NvmlBusySampler`` with that map finds the tenant's busy samples, where the
published pid alone finds none. Needs root, a GPU, util-linux ``unshare`` and torch.

    python3 bench/pidmap_gpu.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TENANT = """import os, time, torch
x = torch.randn(8192, 8192, device="cuda")
print(os.getpid(), flush=True)
end = time.time() + float(os.environ["SECONDS_BUSY"])
while time.time() < end:
    y = x @ x
    torch.cuda.synchronize()
"""
# the tenant joins the pod-like cgroup before it exists as a process of the new pid namespace
LAUNCH = 'echo $$ > "$1/cgroup.procs" 2>/dev/null; exec unshare --pid --fork --mount-proc "$2" -c "$3"'


def missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (unshare --pid, a cgroup)"
    if not shutil.which("unshare"):
        return "needs util-linux unshare"
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - any NVML failure means: no GPU here
        return f"needs NVML ({' '.join(str(e).split())})"
    return None


def cgroup_root() -> Path:
    """Where a new cgroup can be made: the v2 root, else a v1 hierarchy (a plain folder would not be a cgroup)."""
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():
        return base
    for name in ("pids", "cpu", "memory", "systemd"):
        if (base / name / "cgroup.procs").exists():
            return base / name
    return base


def nspid(pid: int) -> list[int]:
    from valve.device_plugin.pidmap import parse_nspid

    try:
        return list(parse_nspid(Path(f"/proc/{pid}/status").read_text()) or ())
    except OSError:
        return []


def run(seconds: float) -> dict:
    from valve.api.contract import PIDS_FILE
    from valve.device_plugin.nvml import NvmlBackend
    from valve.device_plugin.pidmap import PidMapWriter
    from valve.runtime.arbiter.enforce import NvmlBusySampler
    from valve.runtime.arbiter.pidmap import PidMap

    backend = NvmlBackend()
    gpu = backend.discover()[0].uuid
    pod_uid = str(uuidlib.uuid4())
    cg = cgroup_root() / "kubepods.slice" / f"kubepods-pod{pod_uid.replace('-', '_')}.slice"
    try:
        cg.mkdir(parents=True)
    except OSError as e:
        return {"error": f"cannot make a pod-like cgroup {cg}: {e}"}
    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(["sh", "-c", LAUNCH, "sh", str(cg), sys.executable, TENANT], stdout=subprocess.PIPE,
                            stderr=err, text=True, env={**os.environ, "SECONDS_BUSY": str(seconds)})
    out: dict = {"gpu": gpu, "pod_uid": pod_uid, "cgroup": str(cg)}
    try:
        line = proc.stdout.readline()
        if not line.strip():
            proc.wait(10)
            err.seek(0)
            out["error"] = f"the tenant did not start (rc {proc.returncode}): {err.read()[-2000:]}"
            return out
        out["ns_pid"] = ns_pid = int(line)
        host = None
        deadline = time.time() + 60
        while host is None and time.time() < deadline:  # NVML lists the tenant once its context exists
            for pid in backend.compute_pids(gpu) or []:
                chain = nspid(pid)
                if len(chain) >= 2 and chain[-1] == ns_pid:
                    host, out["nspid_chain"] = pid, chain
            time.sleep(0.2)
        out["host_pid"] = host
        if host is not None:
            out["host_cgroup"] = Path(f"/proc/{host}/cgroup").read_text().strip()
        with tempfile.TemporaryDirectory() as rdir:
            (Path(rdir) / gpu).mkdir()  # the GPU's folder (the plugin's Allocate or the arbiter makes it)
            PidMapWriter([gpu], backend.compute_pids, Path(rdir)).step()
            path = Path(rdir) / gpu / PIDS_FILE
            out["pid_map"] = json.loads(path.read_text())
            pm = PidMap(path, pod_uid)
            out["mapped"] = sorted(pm(ns_pid))
            mapped, plain = NvmlBusySampler(gpu, pids=pm), NvmlBusySampler(gpu)
            got_mapped, got_plain = [], []
            end = time.time() + min(6.0, seconds / 2)
            while time.time() < end:
                now = time.monotonic_ns()
                got_mapped += mapped.sample(now, ns_pid)
                got_plain += plain.sample(now, ns_pid)
                time.sleep(0.5)
        out["samples_mapped"] = len(got_mapped)
        out["busy_max_mapped"] = max((b for _, b in got_mapped), default=None)
        out["samples_published_pid_alone"] = len(got_plain)
    finally:
        proc.kill()
        proc.wait()
        for d in (cg, cg.parent):  # cgroups go with rmdir once empty
            try:
                d.rmdir()
            except OSError:
                pass
    out["checks"] = {
        "nvml_reports_the_host_pid": out.get("host_pid") is not None and out["host_pid"] != out["ns_pid"],
        "map_has_the_pod_uid": any(e.get("pod_uid") == pod_uid for e in out["pid_map"]["processes"]),
        "published_pid_maps_to_the_host_pid": out["mapped"] == [out.get("host_pid")],
        "busy_samples_found_through_the_map": out["samples_mapped"] > 0,
        "none_without_the_map": out["samples_published_pid_alone"] == 0,
    }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--seconds", type=float, default=20.0, help="how long the tenant keeps the GPU busy")
    args = ap.parse_args()
    from bench.harness import output

    out = output.checked_out(ap, args.out)
    why = missing()
    if why:
        ap.exit(2, f"{ap.prog}: {why}\n")
    res = run(args.seconds)
    import pynvml

    res["driver"] = pynvml.nvmlSystemGetDriverVersion()
    output.write_json(out / "pidmap_gpu.json", res)
    print(json.dumps(res.get("checks", res), indent=1))
    return 0 if res.get("checks") and all(res["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
