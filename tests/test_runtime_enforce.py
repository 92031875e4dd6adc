"""The enforced gate: the pure decision, the samplers (a fake NVML), the simulated GPU end to end, and a real
process paused with SIGSTOP and resumed with SIGCONT by a running arbiter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from types import SimpleNamespace

import pytest
from sim_tenants import ROGUE_PID, SimTenants
from waiting import until

from valve.api.runtime import RuntimeSpec
from valve.runtime.arbiter.enforce import CpuTimeSampler, Enforcement, NvmlBusySampler, SignalPauser
from valve.runtime.arbiter.loop import Arbiter
from valve.runtime.arbiter.metrics import GateMetrics
from valve.runtime.arbiter.policy import MS, Action, EnforcePolicy, violation
from valve.runtime.control import GATE_OPEN, ControlBlock
from valve.runtime.online.signal import OnlineSignal

GRACE = 50 * MS


# ---- the pure decision -----------------------------------------------------------------------------------------
def test_violation_needs_a_closed_gate_and_evidence_past_the_grace():
    assert violation(None, 1000, 1.0, 10**9, GRACE, 0.2) is None  # open gate: nothing to enforce
    assert violation(0, 64, None, 0, GRACE, 0.2) is None  # marks queued before the closure may still pass
    assert "passed 65 gates" in violation(0, 65, None, 0, GRACE, 0.2)
    assert violation(0, 0, 0.9, GRACE - 1, GRACE, 0.2) is None  # queued work still draining
    assert violation(0, 0, 0.1, GRACE, GRACE, 0.2) is None  # below the threshold
    assert "busy 90%" in violation(0, 0, 0.9, GRACE, GRACE, 0.2)


def test_one_violation_per_closed_period_and_pause_only_in_pause_mode():
    report = EnforcePolicy("report", grace_ns=GRACE)
    got = report.observe(0, 0, 77, 0.9, GRACE)
    assert [a.kind for a in got] == ["violation"] and report.violations == 1
    assert report.observe(0, 0, 77, 0.9, 2 * GRACE) == []  # the same closed period
    assert report.observe(None, 0, 77) == []
    assert [a.kind for a in report.observe(10 * GRACE, 0, 77, 0.9, 12 * GRACE)] == ["violation"]

    pause = EnforcePolicy("pause", grace_ns=GRACE)
    reason = violation(0, 0, 0.9, GRACE, GRACE, 0.2)
    assert pause.observe(0, 0, 77, 0.9, GRACE) == [Action("violation", 77, reason), Action("pause", 77, reason)]
    assert pause.paused_pid == 77
    assert pause.observe(None, 0, 77) == [Action("resume", 77)]
    assert pause.observe(None, 0, 77) == []


def test_no_pause_without_a_usable_pid_and_a_failed_pause_owes_no_resume():
    p = EnforcePolicy("pause", grace_ns=GRACE)
    assert [a.kind for a in p.observe(0, 0, 0, 1.0, GRACE)] == ["violation"]  # pid unknown: report only
    p = EnforcePolicy("pause", grace_ns=GRACE)
    assert [a.kind for a in p.observe(0, 0, 1, 1.0, GRACE)] == ["violation"]  # never pid 1 (the pod's init)
    p = EnforcePolicy("pause", grace_ns=GRACE)
    p.observe(0, 0, 77, 1.0, GRACE)
    p.pause_failed()
    assert p.observe(None, 0, 77) == []


def test_marks_count_from_the_closure_and_survive_a_counter_restart():
    p = EnforcePolicy("report", max_marks=4)
    assert p.observe(0, 1000, 5) == []  # snapshot at the closure
    assert p.observe(0, 1004, 5) == []
    assert p.observe(0, 2, 5) == []  # the block was re-created: count from 2
    assert [a.kind for a in p.observe(0, 7, 5)] == ["violation"]


def test_off_mode_never_acts_and_a_bad_mode_is_refused():
    assert EnforcePolicy("off").observe(0, 10**6, 5, 1.0, 10**9) == []
    with pytest.raises(ValueError, match="expected one of off, report, pause"):
        EnforcePolicy("kill")


# ---- samplers ----------------------------------------------------------------------------------------------------
class FakeNvml:
    class NVMLError(Exception):
        pass

    class NVMLError_NotFound(NVMLError):
        pass

    def __init__(self) -> None:
        self.samples: list = []
        self.asked: list[int] = []

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return ("handle", uuid)

    def nvmlDeviceGetProcessUtilization(self, handle, last_seen_us):
        self.asked.append(last_seen_us)
        fresh = [s for s in self.samples if s.timeStamp > last_seen_us]
        if not fresh:
            raise self.NVMLError_NotFound()
        return fresh

    def add(self, pid: int, ts_us: int, sm: int) -> None:
        self.samples.append(SimpleNamespace(pid=pid, timeStamp=ts_us, smUtil=sm, memUtil=0))


def test_nvml_sampler_reads_the_offline_pids_samples_once_on_the_monotonic_clock():
    nv = FakeNvml()
    s = NvmlBusySampler("GPU-x", nvml=nv)
    assert s.sample(0, 77) == []  # NotFound: no sample yet
    import time

    wall_us = time.time_ns() // 1000
    nv.add(77, wall_us, 60)
    nv.add(99, wall_us, 100)  # another process (online): not the offline tenant's
    (since, busy), = s.sample(0, 77)
    assert busy == 0.6
    mono_of_stamp = wall_us * 1000 - (time.time_ns() - time.monotonic_ns())
    assert abs((mono_of_stamp - since) - NvmlBusySampler.FIRST_PERIOD_NS) < 50 * MS  # first: a period before
    assert s.sample(0, 77) == [] and nv.asked[-1] == wall_us  # asks only for newer samples
    nv.add(99, wall_us + 100_000, 100)
    assert s.sample(0, 77) == []  # only online's sample
    nv.add(77, wall_us + 200_000, 5)
    (since2, busy2), = s.sample(0, 77)
    assert busy2 == 0.05 and abs(since2 - (mono_of_stamp + 100_000_000)) < 50 * MS  # from the previous stamp


def test_nvml_sampler_passes_other_errors_on():
    nv = FakeNvml()

    def boom(handle, last):
        raise nv.NVMLError("GPU is lost")

    nv.nvmlDeviceGetProcessUtilization = boom
    with pytest.raises(FakeNvml.NVMLError, match="lost"):
        NvmlBusySampler("GPU-x", nvml=nv).sample(0, 1)


def test_arbiter_with_a_fake_nvml_reports_a_tenant_busy_behind_the_closed_gate():
    import time

    nv = FakeNvml()
    cb = ControlBlock.anonymous()
    cb.fields.offline_pid = 77
    metrics = GateMetrics(gpu="GPU-x")
    enf = Enforcement(EnforcePolicy("report", grace_ns=GRACE), NvmlBusySampler("GPU-x", nvml=nv), metrics=metrics,
                      period_ns=0)
    arb = Arbiter(cb, RuntimeSpec(), enforce=enf)
    sig = OnlineSignal(cb)
    arb.step(time.monotonic_ns())
    sig.begin()
    arb.step(time.monotonic_ns())
    assert cb.fields.gate != GATE_OPEN
    wall_us = time.time_ns() // 1000
    nv.add(77, wall_us + 100_000, 0)  # parked: its sample ends past the grace ...
    nv.add(77, wall_us + 300_000, 80)  # ... so the next one lies wholly behind the closed gate, busy
    arb.step(time.monotonic_ns())
    arb.step(time.monotonic_ns())
    assert cb.fields.violations == 1 and cb.fields.violation_ns > 0
    assert metrics.violations._value.get() == 1
    sig.end()


def test_cpu_sampler_sees_a_spinning_process():
    import time

    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        s = CpuTimeSampler()
        until(lambda: s._ticks(proc.pid), "the process's stat")
        t0 = time.monotonic_ns()
        assert s.sample(t0, proc.pid) == []  # the first sample only starts the window
        until(lambda: (time.monotonic_ns() - t0) > 300 * MS and s._ticks(proc.pid) > 0, "some CPU time")
        (since, busy), = s.sample(time.monotonic_ns(), proc.pid)
        assert since == t0 and busy > 0.05  # a loaded CI machine shares the CPU: only > 0 is certain
        assert s.sample(time.monotonic_ns(), 0) == []
    finally:
        proc.kill()
        proc.wait()


def test_signal_pauser_refuses_itself_and_init():
    p = SignalPauser()
    assert "refusing" in p.pause(os.getpid()) and "refusing" in p.pause(1)
    assert "No such process" in p.resume(2**22 + 12345)


# ---- the simulated GPU, end to end -------------------------------------------------------------------------------
def test_a_tenant_that_skips_the_gate_is_detected_paused_and_resumed():
    t = SimTenants("skip", mode="pause", grace_ms=10, period_ms=2)
    t.burst(50 * MS, 60)  # ~30 ms of online work
    t.gpu.run_until(300 * MS)
    (detected_at, reason), = t.violations()
    assert "busy" in reason
    assert detected_at - 50 * MS <= (10 + 3 * 2 + 1) * MS  # grace + a sample period or so + an arbiter step
    assert [k for k, _ in t.pauses] == ["pause", "resume"] and t.pauses[0][1] == detected_at
    resumed_at = t.pauses[1][1]
    burst_end = t.bursts[0][1]
    assert burst_end <= resumed_at <= burst_end + (5 + 2) * MS  # hysteresis + an arbiter step
    assert t.cb.fields.violations == 1 and t.cb.fields.paused_pid == 0
    assert t.off.kernels_done > 0 and not t.paused  # resumed: offline runs again


def test_a_paused_tenant_stops_using_the_gpu_once_its_queue_drains():
    t = SimTenants("skip", mode="pause", grace_ms=10, period_ms=2)
    t.burst(50 * MS, 100)  # ~50 ms
    t.gpu.run_until(90 * MS)  # detected by ~66 ms
    assert t.paused and not t.bursts
    busy = t.off.busy_ns
    t.gpu.run_until(99 * MS)
    assert not t.bursts and t.off.busy_ns == busy  # nothing new launched; its two queued kernels were done


def test_a_gate_whose_waits_do_not_wait_is_caught_by_its_marks():
    t = SimTenants("broken", mode="report", busy=False)
    t.burst(50 * MS, 60)
    t.gpu.run_until(200 * MS)
    (_, reason), = t.violations()
    assert "gates since the gate closed" in reason
    assert t.cb.fields.offline_pid == os.getpid()  # the Gate published it


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_gated_tenant_is_never_flagged_over_many_gate_cycles(seed):
    t = SimTenants("gated", mode="pause", seed=seed, grace_ms=10, period_ms=2)
    end = t.random_bursts(150)
    t.gpu.run_until(end + 50 * MS)
    assert t.arbiter.policy.preemptions >= 100  # many closed periods
    assert t.violations() == [] and t.pauses == []
    assert t.off.kernels_done > 1000  # offline did run between bursts


def test_a_tenant_that_skips_the_gate_is_flagged_once_per_burst():
    t = SimTenants("skip", mode="report", seed=3, grace_ms=10, period_ms=2)
    t.random_bursts(20)
    t.gpu.run_until(2000 * MS)
    long_bursts = [b for b in t.bursts if b[1] - b[0] > 20 * MS]
    assert len(t.violations()) >= len(long_bursts) >= 10
    assert len(t.violations()) <= t.arbiter.policy.preemptions
    assert t.cb.fields.offline_pid == ROGUE_PID


# ---- a real process, real signals --------------------------------------------------------------------------------
ROGUE = textwrap.dedent("""
    import sys
    from valve.runtime.control import ControlBlock
    from valve.runtime.gate.offline import Gate
    g = Gate(ControlBlock.open(sys.argv[1]), backend="host", watchdog=False)  # publishes the pid, then ignores it
    print("ready", flush=True)
    x = 0
    while True:
        x += 1
""")


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


def test_arbiter_pauses_a_real_process_that_ignores_the_gate_and_resumes_it(tmp_path):
    path = tmp_path / "GPU-e" / "control"
    cb = ControlBlock.create(path)
    enf = Enforcement(EnforcePolicy("pause", grace_ns=50 * MS, busy_threshold=0.05), CpuTimeSampler(),
                      period_ns=200 * MS)
    arb = Arbiter(cb, RuntimeSpec(), enforce=enf)
    stop = threading.Event()
    runner = threading.Thread(target=arb.run, args=(stop,), daemon=True)
    proc = subprocess.Popen([sys.executable, "-c", ROGUE, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    sig = OnlineSignal(path)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert cb.fields.offline_pid == proc.pid
        runner.start()
        sig.begin()
        until(lambda: cb.fields.paused_pid == proc.pid, "the pause", timeout=20)
        until(lambda: _state(proc.pid) == "T", "the stop")  # a signal is delivered after kill() returns
        assert cb.fields.violations == 1
        sig.end()
        until(lambda: cb.fields.paused_pid == 0, "the resume", timeout=20)
        until(lambda: _state(proc.pid) != "T", "the process running again")
    finally:
        stop.set()
        runner.join(5)
        os.kill(proc.pid, 9)
        proc.wait()
        sig.close()


def test_a_restarted_arbiter_resumes_the_process_a_dead_one_left_paused(tmp_path):
    import signal as sigmod

    cb = ControlBlock.create(tmp_path / "GPU-r" / "control")
    proc = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"])
    try:
        os.kill(proc.pid, sigmod.SIGSTOP)
        until(lambda: _state(proc.pid) == "T", "the stop")
        cb.fields.paused_pid = proc.pid  # what the dead arbiter recorded
        arb = Arbiter(cb, RuntimeSpec(), enforce=Enforcement(EnforcePolicy("pause")))
        arb.step(0)
        until(lambda: _state(proc.pid) != "T", "the resume")
        assert cb.fields.paused_pid == 0
    finally:
        proc.kill()
        proc.wait()


# ---- the arbiter's flags ------------------------------------------------------------------------------------------
def test_enforce_flags_build_the_enforcement_or_fail_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from valve.runtime.cli import app, make_enforcement

    assert make_enforcement("off", "auto", "GPU-x", 50, 0.2, 20, None) is None
    enf = make_enforcement("pause", "cpu", "GPU-x", 50, 0.2, 100, None)
    assert isinstance(enf.sampler, CpuTimeSampler) and enf.policy.mode == "pause" and enf.period_ns == 100 * MS
    with pytest.raises(ValueError, match="expected auto, nvml, cpu or none"):
        make_enforcement("report", "gpu", "GPU-x", 50, 0.2, 20, None)
    with pytest.raises(ValueError, match="expected one of off, report, pause"):
        make_enforcement("kill", "none", "GPU-x", 50, 0.2, 20, None)
    got = CliRunner().invoke(app, ["arbiter", "--gpu", "GPU-x", "--runtime-dir", str(tmp_path), "--metrics-port",
                                   "0", "--enforce", "kill"])
    assert got.exit_code == 2 and "expected one of off, report, pause" in got.output
    assert not (tmp_path / "GPU-x" / "control").exists()  # refused before touching the block
