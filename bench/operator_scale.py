"""Operator at scale: N ColocationPairs created at once, against kmock, in one process.

    python bench/operator_scale.py [--pairs 100 500 2000] [--gpus 8] [--restart] [--out bench/results/operator_scale.json]

Each size runs on a fresh emulator (tests/support/operator_harness.py: ValveKube, its object lookups and garbage
collection O(1) per request) with ceil(N/gpus) nodes of `gpus` GPUs, `valve operator` as a child process (as in
a cluster: its own interpreter, heap and GIL) and, in this process, kmock and a driver that plays scheduler,
kubelets and device plugins (FakeNodes): it binds every pod the operator creates as soon as it appears, then
admits the bound pods in a random order, the GPU chosen by the device plugin's own rule from what the plugin can
know (the node's pending pods' wishes and its taken slots, not which pod is being admitted).

Per size: seconds until every pair is Running or Degraded, pairs Degraded, pairs whose two pods got two GPUs,
API requests per pair (all the operator's: kopf's lists and watches too), the operator process's CPU from the
moment it watches (its start apart) per pair, this process's CPU (kmock and the driver), and the load average.
`--restart`: at the largest size the operator is stopped (SIGTERM, as in a rolling update) when half the pairs
are done and started again; pod creates refused with 409 after it and seconds from the restart to all done.

kmock is not an API server: no bookmarks or watch resumption, every object version and request stays in memory;
see docs/operator.md for what that leaves unmeasured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]

import kmock  # noqa: E402
from operator_harness import Harness, ValveKube, operator_requests, pair_body, write_kubeconfig  # noqa: E402

from valve.api import colocation as c  # noqa: E402
from valve.api.contract import OFFLINE, ONLINE  # noqa: E402

NS = "default"
DONE = ("Running", "Degraded")


class RecordingKube(ValveKube):
    """Hands every pod created through the API to the driver (no listing of all pods to find new ones)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.new_pods: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.gone_pods: list[str] = []  # uids of pods deleted through the API

    async def _handle(self, request: kmock.Request) -> Any:
        response = await super()._handle(request)
        if (response.status < 300 and request.action == kmock.action.CREATE and request.resource is not None
                and request.resource.plural == "pods" and request.subresource is None):
            self.new_pods.put_nowait(request.data)
        elif (response.status < 300 and request.action == kmock.action.DELETE and request.resource is not None
              and request.resource.plural == "pods" and request.name is not None):
            self.gone_pods.append(request.name)
        return response


def proc_cpu(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class OperatorProcess:
    """`valve operator` as a child process against the emulator, logged to a file."""

    def __init__(self, kube: ValveKube, folder: Path, resync: float) -> None:
        self.kube, self.resync = kube, resync
        self.kubeconfig = write_kubeconfig(folder / "kubeconfig", str(kube.url))
        self.log = folder / "operator.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cpu_ready = 0.0  # its CPU when it started watching (imports, login, listing)

    async def start(self) -> None:
        """Start it and wait until it watches pairs, pods and nodes."""
        mark = len(self.kube._requests)
        env = {**{k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"},
               "KUBECONFIG": str(self.kubeconfig), "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "valve.cli", "operator", "--metrics-port", "0", "--health-port", "0",
             "--resync-seconds", str(self.resync), "--sidecar-image", "valve:t", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=self.log.open("a"), env=env, cwd=ROOT)
        want = {"pods", "nodes", c.PLURAL}
        deadline = time.monotonic() + 60
        while True:
            watched = {r.resource.plural for r in self.kube._requests[mark:]
                       if r.resource is not None and r.params.get("watch") == "true"
                       and r.headers.get("User-Agent", "").startswith("kopf/")}
            if want <= watched:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the operator did not start watching {sorted(want - watched)} (exit code "
                                   f"{self.proc.poll()}): {self.log.read_text()[-2000:]}")
            await asyncio.sleep(0.05)
        self.cpu_ready = proc_cpu(self.proc.pid)

    def cpu(self) -> float:
        assert self.proc is not None
        return proc_cpu(self.proc.pid)

    async def stop(self) -> float:
        """SIGTERM, wait for it to exit; its CPU until then."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        cpu = self.cpu()
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait, 10)
        return cpu


class Run:
    def __init__(self, kube: RecordingKube, env: Harness, pairs: int, seed: int) -> None:
        self.kube, self.env, self.pairs = kube, env, pairs
        self.names = [f"p{i:05d}" for i in range(pairs)]
        self.rng = random.Random(seed)
        self.errors: list[str] = []

    def release_deleted(self) -> None:
        """The kubelet frees the slots of pods the operator deleted (by name: names are unique per namespace)."""
        names, self.kube.gone_pods[:] = set(self.kube.gone_pods), []
        for uid, (_, _, name, _, _) in list(self.env.nodes.placed.items()):
            if name in names:
                self.env.nodes.release(uid)
        for pods in self.env.nodes.bound.values():
            for uid in [u for u, p in pods.items() if p["metadata"]["name"] in names]:
                del pods[uid]

    def phases(self) -> dict[str, int]:
        """Pairs by phase: one lookup per pair (a walk over every stored object, 5 times a second, was a
        good part of the process's CPU at 2,000 pairs)."""
        res = kmock.resource(f"{c.API_VERSION}/{c.PLURAL}")
        out: dict[str, int] = {}
        for name in self.names:
            o = self.kube.objects._objects.get((res, NS, name))
            if o is not None and not o.deleted:
                phase = (o.raw.get("status") or {}).get("phase") or "New"
                out[phase] = out.get(phase, 0) + 1
        return out

    async def kubelets(self) -> None:
        """Bind what appears; admit the bound pods in a random order."""
        sem = asyncio.Semaphore(8)

        async def start(pod: dict[str, Any]) -> None:
            async with sem:
                try:
                    await self.env.nodes.start(pod)
                except Exception as e:  # noqa: BLE001 - a driver failure is a finding, not a stop
                    self.errors.append(f"{pod['metadata']['name']}: {e}")

        while True:
            batch = [await self.kube.new_pods.get()]
            self.release_deleted()
            while not self.kube.new_pods.empty():
                batch.append(self.kube.new_pods.get_nowait())
            await asyncio.gather(*(self.env.nodes.bind(p) for p in batch))
            self.rng.shuffle(batch)
            await asyncio.gather(*(start(p) for p in batch))

    async def until_done(self, timeout: float, at_least: int | None = None) -> float:
        t0 = time.monotonic()
        want = self.pairs if at_least is None else at_least
        while True:
            phases = self.phases()
            if sum(phases.get(p, 0) for p in DONE) >= want:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{want} pairs not done after {timeout} s: {phases}")
            await asyncio.sleep(0.2)

    def split_pairs(self) -> int:
        """Pairs whose live online and offline pods got two GPUs (from the fake plugins' allocations)."""
        gpus: dict[str, dict[str, str]] = {}
        for _, _, name, role, gpu in self.env.nodes.placed.values():
            gpus.setdefault(name.rsplit("-", 1)[0], {})[role] = gpu
        return sum(1 for g in gpus.values() if ONLINE in g and OFFLINE in g and g[ONLINE] != g[OFFLINE])


def request_counts(kube: ValveKube, since: int = 0) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in operator_requests(kube)[since:]:
        what = f"{r.method.value} {r.resource.plural if r.resource else 'discovery'}" + \
            (f"/{r.subresource}" if r.subresource else "")
        out[what] = out.get(what, 0) + 1
    return dict(sorted(out.items()))


def refused_creates(kube: ValveKube, since: int) -> int:
    """Pod creates after `since` whose name had been created before (the emulator refuses them with 409)."""
    reqs = operator_requests(kube)
    seen = {r.data["metadata"]["name"] for r in reqs[:since] if _pod_create(r)}
    out = 0
    for r in reqs[since:]:
        if _pod_create(r):
            name = r.data["metadata"]["name"]
            out += name in seen
            seen.add(name)
    return out


def _pod_create(r: Any) -> bool:
    return r.method.value == "POST" and r.resource is not None and r.resource.plural == "pods" \
        and r.subresource is None


async def one(pairs: int, gpus: int, restart: bool, seed: int, resync: float, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="operator-scale-") as folder:
        async with RecordingKube() as kube, kmock.Server(kube):
            op = OperatorProcess(kube, Path(folder), resync)
            try:
                return await _one(kube, Harness(kube), op, pairs, gpus, restart, seed, timeout)
            finally:
                await op.stop()


async def _one(kube: RecordingKube, env: Harness, op: OperatorProcess, pairs: int, gpus: int, restart: bool,
               seed: int, timeout: float) -> dict[str, Any]:
    nodes = math.ceil(pairs / gpus)
    for i in range(nodes):
        env.add_node(f"n{i:04d}", gpus)
    await op.start()
    start_cpu = op.cpu_ready
    run = Run(kube, env, pairs, seed)
    driver = asyncio.create_task(run.kubelets())
    load0 = os.getloadavg()
    self_cpu0 = proc_cpu()
    t0 = time.monotonic()
    names = run.names
    sem = asyncio.Semaphore(16)

    async def create(name: str) -> None:
        async with sem:
            code, body = await env.api.create_pair(pair_body(name), NS)
            assert code in (200, 201), body
    await asyncio.gather(*(create(n) for n in names))
    out: dict[str, Any] = {"pairs": pairs, "nodes": nodes, "gpus_per_node": gpus}
    cpu = 0.0
    try:
        if restart:
            await run.until_done(timeout, at_least=pairs // 2)
            done_before = sum(run.phases().get(p, 0) for p in DONE)
            cpu += await op.stop() - op.cpu_ready
            mark = len(operator_requests(kube))
            t_restart = time.monotonic()
            await op.start()
            started = time.monotonic() - t_restart
            await run.until_done(timeout)
            cpu += op.cpu() - op.cpu_ready
            out["restart"] = {"done_at_restart": done_before,
                              "seconds_to_all_done": round(time.monotonic() - t_restart, 2),
                              "pod_creates_refused_409": refused_creates(kube, mark),
                              "started_in_s": round(started, 2), "start_cpu_s": round(op.cpu_ready, 2),
                              "cpu_after_start_s": round(op.cpu() - op.cpu_ready, 2),
                              "requests_after": request_counts(kube, mark)}
        else:
            await run.until_done(timeout)
            cpu += op.cpu() - op.cpu_ready
        seconds = time.monotonic() - t0
    finally:
        driver.cancel()
    harness_cpu = proc_cpu() - self_cpu0
    phases = run.phases()
    counts = request_counts(kube)
    total = sum(counts.values())
    out.update({
        "seconds": round(seconds, 2),
        "pairs_per_s": round(pairs / seconds, 1),
        "phases": phases,
        "degraded": phases.get("Degraded", 0),
        "split_pairs": run.split_pairs(),
        "driver_errors": run.errors[:10],
        "requests": total,
        "requests_per_pair": round(total / pairs, 2),
        "requests_by_kind": counts,
        "operator_cpu_s": round(cpu, 2),
        "operator_cpu_ms_per_pair": round(1000 * cpu / pairs, 2),
        "operator_start_cpu_s": round(start_cpu, 2),
        "harness_cpu_s": round(harness_cpu, 2),
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    })
    return out


def table(runs: list[dict[str, Any]]) -> str:
    rows = ["| pairs | nodes | seconds | pairs/s | requests/pair | Degraded | split | operator CPU | ms/pair "
            "| kmock + driver CPU | load 1m |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        rows.append(f"| {r['pairs']}{' (restart)' if 'restart' in r else ''} | {r['nodes']} | {r['seconds']} | "
                    f"{r['pairs_per_s']} | {r['requests_per_pair']} | {r['degraded']} | {r['split_pairs']} | "
                    f"{r['operator_cpu_s']} s | {r['operator_cpu_ms_per_pair']} | {r['harness_cpu_s']} s | "
                    f"{r['loadavg_before'][0]} |")
    for r in runs:
        if "restart" in r:
            x = r["restart"]
            rows.append(f"\nrestart at {r['pairs']} pairs ({x['done_at_restart']} done): all done "
                        f"{x['seconds_to_all_done']} s after it (watching after {x['started_in_s']} s), "
                        f"{x['pod_creates_refused_409']} pod creates refused with 409")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, nargs="+", default=[100, 500, 2000])
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    ap.add_argument("--restart", action="store_true", help="also: the largest size with an operator restart")
    ap.add_argument("--resync", type=float, default=30.0, help="operator resync seconds (its default)")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "operator_scale.json")
    args = ap.parse_args(argv)
    from bench.harness.output import checked_out
    from valve.operator.cli import tune_gc

    checked_out(ap, args.out, file=True)
    tune_gc()  # kmock keeps every object version and request: full collections here walk all of them

    sizes = [(n, False) for n in args.pairs] + ([(max(args.pairs), True)] if args.restart else [])
    runs: list[dict[str, Any]] = []
    result = {
        "command": "python bench/operator_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "resync_seconds": args.resync,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for n, restart in sizes:
        runs.append(asyncio.run(one(n, args.gpus, restart, args.seed, args.resync, args.timeout)))
        # after each size: a long run that is stopped still leaves what it measured
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        text = table(runs)
        args.out.with_suffix(".txt").write_text(text + "\n")
        print(table(runs[-1:]), file=sys.stderr, flush=True)
    print(text)
    return result


if __name__ == "__main__":
    main()
