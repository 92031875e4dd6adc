"""`valve top`: against `valve demo --serve`'s simulated node (as JSON, and live in a pseudo-terminal), and on
bad runtime roots (no blocks, foreign or unreadable blocks, a stale heartbeat): a line per GPU, no traceback."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from waiting import until

from valve import top
from valve.api.contract import CONTROL_FILE, ENV_PAIR, LABEL_PAIR
from valve.runtime.control import FLAG_ARBITER, VERSION, ControlBlock, control_path, write_pair

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "valve.cli"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160"}


@pytest.fixture
def demo_node(tmp_path):
    """`valve demo --serve` with two GPUs, until every block has a live arbiter and offline progress."""
    root = tmp_path / "run"
    proc = subprocess.Popen([*CLI, "demo", "--serve", "--gpus", "2", "--rate", "20", "--runtime-dir", str(root)],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    node = top.Node(root)

    def ready():
        rows = node.sample()
        return len(rows) == 2 and all(r.status == "ok" and r.offline_progress for r in rows)

    try:
        until(ready, "the demo node's arbiters and offline clients", timeout=30)
        yield root
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "Traceback" not in err, err


def test_once_json_reads_the_demo_node(demo_node):
    out = subprocess.run([*CLI, "top", "--runtime-dir", str(demo_node), "--once", "--json", "--interval", "0.5"],
                         env=env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    assert snap["problem"] is None
    gpus = snap["gpus"]
    assert [g["pair"] for g in gpus] == ["demo-0", "demo-1"]
    for g in gpus:
        assert g["status"] == "ok" and g["problem"] is None and g["gate"] in ("open", "closed")
        assert 0.0 <= g["closed_fraction"] <= 1.0
        assert g["preemptions_per_s"] >= 0 and g["offline_sublayers_per_s"] > 0
        assert g["pool_bytes"] > 0 and g["pool_limit_bytes"] >= g["pool_bytes"] - (256 << 20)
        assert g["reserve_bytes"] > 0 and 0 <= g["heartbeat_age_ms"] < 1000
        assert g["online_requests"] >= g["preemptions"] >= 0


def read_pty(fd: int, until_text: bytes, buf: bytearray, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while until_text not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"no {until_text!r} on the terminal; it shows: {bytes(buf[-2000:])!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                buf += os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break


def test_live_view_refreshes_in_place_in_a_terminal(demo_node):
    main, sub = pty.openpty()
    fcntl.ioctl(sub, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen([*CLI, "top", "--runtime-dir", str(demo_node), "--interval", "0.1"],
                            env={**env(), "TERM": "xterm-256color", "COLUMNS": ""}, stdin=sub, stdout=sub,
                            stderr=sub, start_new_session=True,
                            # a terminal's Ctrl-C: SIGINT as a shell leaves it, even if this test process ignores it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(sub)
    buf = bytearray()
    try:
        read_pty(main, b"demo-1", buf)
        first = len(buf)
        # a refresh redraws the view over itself: the cursor goes back up, and the rows come again
        read_pty(main, b"\x1b[1A", buf)
        del buf[:first]
        read_pty(main, b"demo-1", buf)
        assert b"demo-0" in buf and b"ok" in buf
        proc.send_signal(signal.SIGINT)
        # keep reading: a full terminal buffer would block the last redraw and the exit with it
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([main], [], [], 0.1)[0]:
                try:
                    buf += os.read(main, 65536)
                except OSError:
                    break
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)
    assert b"Traceback" not in buf


def stale_block(root: Path, uuid: str) -> None:
    cb = ControlBlock.create(control_path(uuid, root))
    cb.fields.flags = FLAG_ARBITER
    cb.fields.lease_ns = 1_000_000_000
    cb.fields.heartbeat_ns = max(1, time.monotonic_ns() - 5_000_000_000)
    cb.close()


def bad_root(root: Path) -> None:
    stale_block(root, "GPU-stale")
    foreign = ControlBlock.create(control_path("GPU-foreign", root))
    foreign.fields.version = VERSION + 1
    foreign.close()
    (root / "GPU-truncated").mkdir()
    (root / "GPU-truncated" / CONTROL_FILE).write_bytes(b"\0" * 100)
    (root / "GPU-unreadable" / CONTROL_FILE).mkdir(parents=True)  # open works, read fails (EISDIR)
    (root / "GPU-missing").mkdir()  # a GPU folder whose arbiter never started
    write_pair(root / "GPU-stale", "team-a/chat")


def test_bad_blocks_give_one_clear_line_each(tmp_path):
    bad_root(tmp_path)
    snap = top.snapshot(tmp_path, 0.05)
    by = {g["gpu"]: g for g in snap["gpus"]}
    assert sorted(by) == ["GPU-foreign", "GPU-missing", "GPU-stale", "GPU-truncated", "GPU-unreadable"]
    assert by["GPU-stale"]["status"] == "stale" and "heartbeat" in by["GPU-stale"]["problem"]
    assert by["GPU-stale"]["pair"] == "team-a/chat" and by["GPU-stale"]["heartbeat_age_ms"] > 4000
    assert "layout version" in by["GPU-foreign"]["problem"] and by["GPU-foreign"]["status"] == "error"
    assert "not a Valve control file" in by["GPU-truncated"]["problem"]
    assert "cannot read" in by["GPU-unreadable"]["problem"]
    assert "no control file" in by["GPU-missing"]["problem"]
    out = subprocess.run([*CLI, "top", "--runtime-dir", str(tmp_path), "--once", "--interval", "0.05"],
                         env=env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr, out.stderr
    for gpu, g in by.items():
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith(f"{gpu}: "))
        age = re.compile(r"heartbeat [0-9.]+ s")  # it moved on between the two runs
        assert age.sub("", line) == age.sub("", f"{gpu}: {g['problem']}")


@pytest.mark.parametrize("make", ["missing", "empty", "files only"])
def test_a_root_without_blocks_says_so(tmp_path, make):
    root = tmp_path / "run"
    if make != "missing":
        root.mkdir()
    if make == "files only":
        (root / "README").write_text("not a GPU\n")
    snap = top.snapshot(root, 0.01)
    assert snap["gpus"] == [] and str(root) in snap["problem"]
    out = subprocess.run([*CLI, "top", "--runtime-dir", str(root), "--once", "--interval", "0.05"],
                         env=env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and snap["problem"] in out.stdout and not out.stderr


def test_json_needs_once(tmp_path):
    out = subprocess.run([*CLI, "top", "--runtime-dir", str(tmp_path), "--json"], env=env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "--once" in out.stderr


def test_arbiter_names_its_pair_for_top(tmp_path):
    uuid = "GPU-pair"
    proc = subprocess.Popen([*CLI, "runtime", "arbiter", "--gpu", uuid, "--runtime-dir", str(tmp_path),
                             "--metrics-port", "0", "--no-memory"], env={**env(), ENV_PAIR: "chat"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: top.read_pair(tmp_path / uuid), "the pair file")
        assert top.read_pair(tmp_path / uuid) == "chat"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_operator_passes_the_pair_label_to_the_arbiter():
    from operator_harness import pair_body

    from valve.api import colocation as c
    from valve.operator.pods import OperatorConfig, render_pod

    body = pair_body()
    body["metadata"]["uid"] = "uid-1"
    pod = render_pod(body, c.ColocationPairSpec.model_validate(body["spec"]), "offline", "n1", OperatorConfig())
    arbiter = next(x for x in pod["spec"]["containers"] if x["name"] == "valve-arbiter")
    ref = next(e for e in arbiter["env"] if e["name"] == ENV_PAIR)["valueFrom"]["fieldRef"]["fieldPath"]
    assert ref == f"metadata.labels['{LABEL_PAIR}']" and pod["metadata"]["labels"][LABEL_PAIR] == body["metadata"]["name"]
