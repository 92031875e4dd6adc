"""libvalvegate.so against a fake libcuda: waits before launches on every path, pacing, lease, bound, counters,
bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from valve.preload.build import build
from valve.runtime.control import GATE_CLOSED, GATE_OPEN, VERSION, ControlBlock, Layout

SUPPORT = Path(__file__).parent / "support" / "preload"


def _cc(*args: str) -> None:
    subprocess.run(["gcc", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("preload")
    # -Bsymbolic: like libcuda, its proc-address table holds its own functions, not the preloaded ones
    _cc("-shared", "-fPIC", "-Wl,-Bsymbolic", "-o", str(d / "libcuda.so.1"), str(SUPPORT / "fake_libcuda.c"))
    # -rdynamic: the probe's clock_gettime (a fake clock for the pacing tests) is the one the library binds to
    _cc("-rdynamic", "-o", str(d / "probe"), str(SUPPORT / "probe.c"), f"-L{d}", "-l:libcuda.so.1", "-ldl")
    return d, build(d)


@pytest.fixture
def shm():
    d = Path(tempfile.mkdtemp(prefix="valvegate", dir="/dev/shm"))  # tmpfs, as on a node
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run(built, control: Path | None, *args: str, **env: str):
    d, lib = built
    log = d / f"log-{time.monotonic_ns()}"
    e = {k: v for k, v in os.environ.items() if not k.startswith("VALVE_")}
    e.update(LD_LIBRARY_PATH=str(d), LD_PRELOAD=str(lib), FAKE_CUDA_LOG=str(log), **env)
    if control is not None:
        e["VALVE_GATE_CONTROL"] = str(control)
    with subprocess.Popen([str(d / "probe"), *args], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        out, err = proc.communicate(timeout=60)
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    p.pid = proc.pid  # what the library publishes as offline_pid
    assert p.returncode == 0, p.stdout + p.stderr
    lines = log.read_text().splitlines() if log.exists() else []
    return p, lines


def launches(lines):
    return [ln for ln in lines if ln.startswith(("launch", "wait"))]


@pytest.mark.parametrize("pacing", [{}, {"VALVE_GATE_EVERY_US": "100"}], ids=["default", "paced"])
def test_waits_before_every_launch_on_every_path(built, shm, pacing):
    # by default a wait before every launch; paced, each launch here still waits: it is its stream's first
    cb = ControlBlock.create(shm / "control")
    p, lines = run(built, cb.path, **pacing)
    assert p.stderr == ""
    assert "passthrough 1 1" in p.stdout  # other symbols: the driver's own function, by dlsym and by proc address
    assert "next 1" in p.stdout  # dlsym(RTLD_NEXT) still sees its real caller
    seq = launches(lines)
    assert seq == [
        "wait 0x10 value=1 flags=1 word=1", "launch cuLaunchKernel 0x10",  # by symbol
        "wait 0x11 value=1 flags=1 word=1", "launch cuLaunchKernel 0x11",  # dlsym by name
        "wait 0x12 value=1 flags=1 word=1", "launch cuLaunchCooperativeKernel 0x12",
        "wait 0x2 value=1 flags=1 word=1", "launch cuLaunchKernel_ptsz (nil)",  # proc address, per-thread stream
        "wait 0x22 value=1 flags=1 word=1", "launch cuLaunchKernelEx 0x22",  # cuGetProcAddress from itself
        "wait 0x33 value=1 flags=1 word=1", "launch cuGraphLaunch_ptsz 0x33",  # v1 proc address, per-thread
        "launch cuLaunchKernel 0xca9",  # capturing stream: no wait (the graph is gated at launch)
    ]
    assert sum(ln.startswith("register 4096 3") for ln in lines) == 1  # page registered once, portable + mapped
    f = cb.fields
    assert (f.preload_launches, f.preload_waits, f.preload_captured, f.forced_opens) == (7, 6, 1, 0)


def test_stale_heartbeat_opens_a_closed_gate_and_a_fresh_one_does_not(built, shm):
    cb = ControlBlock.create(shm / "control")
    f = cb.fields
    f.gate, f.lease_ns, f.heartbeat_ns = GATE_CLOSED, 50_000_000, time.monotonic_ns() - 10**9
    p, lines = run(built, cb.path)
    assert f.gate == GATE_OPEN and f.forced_opens == 1
    assert "heartbeat is" in p.stderr and launches(lines)[0].endswith("word=1")  # opened before the first wait

    f.gate, f.heartbeat_ns, f.lease_ns = GATE_CLOSED, time.monotonic_ns(), 600 * 10**9
    p, lines = run(built, cb.path)
    assert f.gate == GATE_CLOSED and f.forced_opens == 1 and p.stderr == ""
    assert launches(lines)[:2] == ["wait 0x10 value=1 flags=1 word=0", "launch cuLaunchKernel 0x10"]


def test_queue_ahead_bound_waits_for_the_gpu_before_queueing_more(built, shm):
    cb = ControlBlock.create(shm / "control")
    _, lines = run(built, cb.path, "many", VALVE_GATE_QUEUE_AHEAD="2", VALVE_GATE_EVERY_US="0")
    ops = [ln.split()[0] for ln in lines if ln.split()[0] in ("launch", "record", "query")]
    # two launches queue freely; the third and fourth first query the oldest mark until the GPU reached it
    assert ops[:4] == ["record", "launch", "record", "launch"]
    assert ops[4] == "query" and ops.count("launch") == 4 and ops.count("record") == 4
    assert cb.fields.preload_throttled >= 1
    cb.fields.queue_ahead = 3  # the arbiter's published value, used with "published"
    _, lines = run(built, cb.path, "many", VALVE_GATE_QUEUE_AHEAD="published", VALVE_GATE_EVERY_US="0")
    ops = [ln.split()[0] for ln in lines if ln.split()[0] in ("launch", "query")]
    assert ops[:3] == ["launch"] * 3 and ops[3] == "query"
    _, lines = run(built, cb.path, "many", VALVE_GATE_EVERY_US="0")  # no bound by default
    assert not any(ln.startswith(("record", "query")) for ln in lines)


START = 10**12  # the fake clock's start (ns)


def script(built, cb, *ops: str, **env: str):
    """The probe's script mode on the fake clock; returns (stderr, the wait/launch lines as (op, stream, word))."""
    p, lines = run(built, cb.path, "script", *ops, FAKE_CLOCK_START_NS=str(START),
                   PROBE_GATE_OFFSET=str(Layout.gate.offset), **env)
    seq = []
    for ln in launches(lines):
        w = ln.split()
        seq.append(("wait", int(w[1], 16), int(w[-1].split("=")[1])) if w[0] == "wait" else ("launch", int(w[2], 16)))
    return p.stderr, seq


def W(s, word=1):  # noqa: N802 - a wait on stream s that saw the gate word
    return ("wait", s, word)


def L(s):  # noqa: N802
    return ("launch", s)


def test_pacing_waits_at_most_once_per_interval_per_stream(built, shm):
    cb = ControlBlock.create(shm / "control")
    err, seq = script(built, cb, "L10", "T30", "L10", "T30", "L10", "L20", "T40", "L10", "L20", "T100", "L20",
                      VALVE_GATE_EVERY_US="100")
    assert err == ""
    assert seq == [W(0x10), L(0x10), L(0x10), L(0x10),  # 30 and 60 us after the wait: none
                   W(0x20), L(0x20),  # another stream: its own interval
                   W(0x10), L(0x10),  # 100 us after 0x10's wait
                   L(0x20),  # 40 us after 0x20's
                   W(0x20), L(0x20)]
    f = cb.fields
    assert (f.preload_launches, f.preload_waits) == (7, 4)
    cb2 = ControlBlock.create(shm / "control2")  # unpaced by default: a wait before every launch
    _, seq = script(built, cb2, "L10", "T99", "L10", "T1", "L10")
    assert seq == [W(0x10), L(0x10), W(0x10), L(0x10), W(0x10), L(0x10)]


def test_pacing_every_n_launches_and_whichever_comes_first(built, shm):
    cb = ControlBlock.create(shm / "control")
    _, seq = script(built, cb, *["L10"] * 7, VALVE_GATE_EVERY_US="0", VALVE_GATE_EVERY_N="3")
    assert [op for op, *_ in seq] == ["wait", "launch", "launch", "launch", "wait", "launch", "launch", "launch",
                                      "wait", "launch"]
    _, seq = script(built, cb, "L10", "L10", "T100", "L10", "L10", "L10", "L10",
                    VALVE_GATE_EVERY_US="100", VALVE_GATE_EVERY_N="3")
    assert seq == [W(0x10), L(0x10), L(0x10), W(0x10), L(0x10), L(0x10), L(0x10), W(0x10), L(0x10)]


def test_a_closed_gate_holds_the_next_launch_inside_the_interval(built, shm):
    cb = ControlBlock.create(shm / "control")
    f = cb.fields
    f.heartbeat_ns, f.lease_ns = START, 600 * 10**9  # a live arbiter (on the fake clock)
    _, seq = script(built, cb, "L10", "T10", "G0", "L10", "T10", "L10", "G1", "T10", "L10", "T100", "L10",
                    VALVE_GATE_EVERY_US="1000000")
    assert seq == [W(0x10), L(0x10),
                   W(0x10, 0), L(0x10), W(0x10, 0), L(0x10),  # closed: every launch waits, interval or not
                   L(0x10), L(0x10)]  # open again: the interval restarted at the last wait
    assert f.forced_opens == 0


def test_the_lease_opens_a_closed_gate_under_pacing(built, shm):
    cb = ControlBlock.create(shm / "control")
    f = cb.fields
    f.gate, f.heartbeat_ns, f.lease_ns = GATE_CLOSED, START - 10**9, 50_000_000  # arbiter silent for 1 s
    err, seq = script(built, cb, "L10", "T10", "L10", VALVE_GATE_EVERY_US="1000")
    assert seq == [W(0x10, 1), L(0x10), L(0x10)]  # opened before the first wait; then paced as usual
    assert f.gate == GATE_OPEN and f.forced_opens == 1 and "heartbeat is 1000 ms old" in err


@pytest.mark.parametrize("name,value", [("VALVE_GATE_EVERY_US", "soon"), ("VALVE_GATE_EVERY_N", "-2")])
def test_a_bad_pacing_value_says_so_and_keeps_the_default(built, shm, name, value):
    cb = ControlBlock.create(shm / "control")
    err, seq = script(built, cb, "L10", "T50", "L10", "T50", "L10", **{name: value})
    assert err.strip().splitlines() == [f"valvegate: {name}={value} is not a whole number >= 0: using "
                                        "0"]
    assert seq == [W(0x10), L(0x10), W(0x10), L(0x10), W(0x10), L(0x10)]  # still gated, before every launch


def _ungated(built, control, why):
    p, lines = run(built, control)
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and why in err[0] and "ungated" in err[0], p.stderr
    assert not any(ln.startswith(("wait", "register")) for ln in lines)
    assert sum(ln.startswith("launch") for ln in lines) == 7  # the program itself runs as without the library


def test_missing_foreign_or_disk_control_block_leaves_the_process_ungated(built, shm, tmp_path):
    _ungated(built, shm / "nothing", "no control block")
    _ungated(built, None, "VALVE_GPU_UUID")
    cb = ControlBlock.create(shm / "control")
    cb.fields.version = VERSION + 1
    _ungated(built, cb.path, f"version {VERSION + 1}")
    (shm / "short").write_bytes(b"\0" * 100)
    _ungated(built, shm / "short", "size 100")
    disk = tmp_path if subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                                      text=True).stdout.strip() != "tmpfs" else Path.cwd()
    ControlBlock.create(disk / "control")
    _ungated(built, disk / "control", "not on tmpfs")


def test_control_block_found_from_the_device_plugin_env(built, shm):
    cb = ControlBlock.create(shm / "GPU-a" / "control")
    p, lines = run(built, None, VALVE_RUNTIME_DIR=str(shm), VALVE_GPU_UUID="GPU-a,GPU-b")
    assert p.stderr == "" and cb.fields.preload_waits == 6


def test_the_process_that_starts_launching_publishes_its_pid(built, shm):
    cb = ControlBlock.create(shm / "control")
    cb.fields.offline_pid = 424242  # published by an earlier tenant
    p, lines = run(built, cb.path, "script")  # maps the block, never launches (a shell, a compiler)
    assert p.stderr == "" and launches(lines) == [] and cb.fields.offline_pid == 424242
    first, _ = run(built, cb.path, "script", "L10")
    assert cb.fields.offline_pid == first.pid != 424242  # the arbiter samples and pauses it
    second, _ = run(built, cb.path)
    assert cb.fields.offline_pid == second.pid != first.pid  # the last one to start launching wins
    off, _ = run(built, cb.path, "script", "L10", VALVE_GATE_OFF="1")
    assert cb.fields.offline_pid == second.pid  # ungated: not the gate's tenant


def test_build_without_a_compiler_says_so(tmp_path):
    with pytest.raises(RuntimeError, match="needs a C compiler"):
        build(tmp_path, cc="no-such-cc")
