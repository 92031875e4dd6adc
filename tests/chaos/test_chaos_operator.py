"""The operator SIGKILLed ten times while it places a batch of pairs: a real `valve operator` process against the
kmock API server (tests/support/operator_harness.py), killed as soon as it has written something in each life.
Every pair must end Running on one GPU with both its pods, and no pod may be created twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("kopf")
pytest.importorskip("kmock")

from operator_harness import emulated, operator_requests, pair_body, write_kubeconfig  # noqa: E402

from tests.test_operator_scale import Kubelets, assert_paired, run_until_done  # noqa: E402

KILLS = 10
NS = "default"
WRITES = ("POST", "PATCH", "PUT", "DELETE")


class OperatorProc:
    """`valve operator` as a child process, logged to a file (a pipe nobody reads would block it)."""

    def __init__(self, kubeconfig: Path, log: Path) -> None:
        self.env = {**{k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"},
                    "KUBECONFIG": str(kubeconfig)}
        self.log, self.proc = log, None

    def start(self) -> None:
        # resync every 30 s: progress after a restart must come from the startup listing and the watches
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "valve.cli", "operator", "--metrics-port", "0", "--health-port", "0",
             "--resync-seconds", "30", "--sidecar-image", "valve:t", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=self.log.open("a"), env=self.env)

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-2000:]
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def writes(env) -> int:
    return sum(r.method.value in WRITES for r in operator_requests(env.kube))


def requests(env) -> int:
    return len(operator_requests(env.kube))


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_operator_killed_mid_reconcile_ten_times(tmp_path, figures):
    async with emulated() as env:
        for i in range(2):
            env.add_node(f"n{i}", 8)
        names = [f"p{i:02d}" for i in range(16)]
        await asyncio.gather(*(env.api.create_pair(pair_body(n, NS), NS) for n in names))
        kubelets = Kubelets(env, seed=11)
        op = OperatorProc(write_kubeconfig(tmp_path / "kubeconfig", str(env.kube.url)), tmp_path / "operator.log")
        mid_write = 0
        for _ in range(KILLS):
            w0, r0 = writes(env), requests(env)
            op.start()

            # killed right after a write of this life (mid-reconcile), or once it has looked when nothing is left
            async def acted(w0=w0, r0=r0):
                return writes(env) > w0 or (requests(env) > r0 + 4 and await _all_running(env, names))
            await env.until(acted, "the operator to act", timeout=60)
            mid_write += writes(env) > w0
            op.kill()
            await kubelets.step()  # pods bound and started while no operator runs
        t0 = time.monotonic()
        op.start()
        try:
            pairs = await run_until_done(env, kubelets, names, timeout=120)
        finally:
            op.kill()
        recovered_ms = (time.monotonic() - t0) * 1e3
        assert_paired(env, pairs)
        creates = env.pod_creations()
        assert len(creates) == len(set(creates)) == 2 * len(names)  # none created twice, none recreated
        assert len(await env.api.pods(NS)) == 2 * len(names)
        assert mid_write >= 3  # most lives were cut in the middle of the work, not after it
    figures.update(kills=KILLS, killed_after_a_write=mid_write, pairs=len(names), pods_created=len(creates),
                   restart_to_all_running_ms=round(recovered_ms, 1))


async def _all_running(env, names) -> bool:
    pairs = [await env.api.get_pair(n, NS) for n in names]
    return all(((p or {}).get("status") or {}).get("phase") == "Running" for p in pairs)
