"""The downward-API annotations file, waiting for the GPU annotation, and `--gpu-from` on the sidecar CLIs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from valve.api.contract import ANN_GPU
from valve.runtime.cli import app
from valve.runtime.control import FILE_SIZE, control_path
from valve.runtime.podinfo import (
    parse_annotations,
    read_annotations,
    resolve_gpu,
    wait_for_annotation,
)

GPU = "GPU-11111111-2222-4333-8444-555555555555"


class FakeTime:
    """A simulated clock; `sleep` advances it and runs a hook (e.g. the kubelet writing the file)."""

    def __init__(self, on_sleep=None) -> None:
        self.now = 100.0
        self.sleeps = 0
        self.on_sleep = on_sleep

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s
        self.sleeps += 1
        if self.on_sleep:
            self.on_sleep(self)


def kubelet_file(annotations: dict[str, str]) -> str:
    """What the kubelet writes: sorted key="value" lines, values Go-quoted (%q)."""
    def go_quote(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'
    return "\n".join(f"{k}={go_quote(v)}" for k, v in sorted(annotations.items()))


def test_parse_round_trips_kubelet_format():
    ann = {ANN_GPU: GPU, "valve.io/role": "offline", "note": 'say "hi"\n\tand\\bye', "json": '{"a": [1, 2]}',
           "empty": "", "eq": "a=b=c", "unicode": "naïve ✓"}
    assert parse_annotations(kubelet_file(ann)) == ann
    assert parse_annotations("\n\n") == {}
    assert parse_annotations('k="\\u00e9\\x41"') == {"k": "éA"}


@pytest.mark.parametrize("bad", ["novalue", 'k=unquoted', 'k="open', '="v"', 'k="a" + "b"', 'k=b"x"'])
def test_parse_rejects_malformed_lines(bad):
    with pytest.raises(ValueError, match="line 2"):
        parse_annotations(f'ok="1"\n{bad}')


def test_read_missing_file_is_empty_and_bad_file_names_the_path(tmp_path):
    assert read_annotations(tmp_path / "nope") == {}
    f = tmp_path / "annotations"
    f.write_text("garbage")
    with pytest.raises(ValueError, match=str(f)):
        read_annotations(f)


def test_wait_returns_once_the_annotation_appears(tmp_path, caplog):
    f = tmp_path / "annotations"
    f.write_text(kubelet_file({"other": "x"}))

    def kubelet(t: FakeTime) -> None:
        if t.sleeps == 3:
            f.write_text(kubelet_file({ANN_GPU: ""}))  # empty value: still waiting
        if t.sleeps == 5:
            f.write_text(kubelet_file({"other": "x", ANN_GPU: GPU}))

    t = FakeTime(kubelet)
    with caplog.at_level("INFO", logger="valve.runtime.podinfo"):
        assert wait_for_annotation(f, timeout_s=300, poll_s=0.5, clock=t.clock, sleep=t.sleep) == GPU
    assert t.sleeps == 5
    assert "waiting up to 300 s for annotation valve.io/gpu-uuid" in caplog.text


def test_wait_times_out_with_a_clear_message(tmp_path):
    t = FakeTime()
    with pytest.raises(TimeoutError, match="valve.io/gpu-uuid did not appear .* within 10 s.*--annotate"):
        wait_for_annotation(tmp_path / "annotations", timeout_s=10, poll_s=0.5, clock=t.clock, sleep=t.sleep)
    assert t.now - 100.0 == pytest.approx(10.0)
    # Present at once: no wait at all.
    (tmp_path / "annotations").write_text(kubelet_file({ANN_GPU: GPU}))
    assert wait_for_annotation(tmp_path / "annotations", timeout_s=0, clock=t.clock, sleep=t.sleep) == GPU


def test_resolve_gpu_prefers_the_flag_and_refuses_lists(tmp_path):
    f = tmp_path / "annotations"
    f.write_text(kubelet_file({ANN_GPU: "GPU-a,GPU-b"}))
    assert resolve_gpu("GPU-x", str(f), 0) == "GPU-x"
    assert resolve_gpu(None, None, 0) is None
    assert resolve_gpu(None, str(f), 0) == "GPU-a,GPU-b"
    with pytest.raises(ValueError, match="one GPU expected"):
        resolve_gpu(None, str(f), 0, single=True)


def test_arbiter_cli_without_any_gpu_source_exits_2(tmp_path, monkeypatch):
    monkeypatch.delenv("VALVE_GPU_UUID", raising=False)
    res = CliRunner().invoke(app, ["arbiter", "--runtime-dir", str(tmp_path), "--metrics-port", "0"])
    assert res.exit_code == 2
    assert "--gpu-from" in res.output


def test_arbiter_cli_gpu_from_times_out_with_exit_2(tmp_path, monkeypatch):
    monkeypatch.delenv("VALVE_GPU_UUID", raising=False)
    res = CliRunner().invoke(app, ["arbiter", "--gpu-from", str(tmp_path / "annotations"), "--gpu-wait-seconds", "0",
                                   "--runtime-dir", str(tmp_path), "--metrics-port", "0"])
    assert res.exit_code == 2
    assert "did not appear" in res.output
    assert not (tmp_path / "GPU-x").exists()


def test_proxy_cli_reads_the_gpu_from_the_file(tmp_path, monkeypatch):
    got = {}
    monkeypatch.delenv("VALVE_GPU_UUID", raising=False)
    monkeypatch.setattr("valve.runtime.online.proxy.proxy_command", lambda **kw: got.update(kw))
    f = tmp_path / "annotations"
    f.write_text(kubelet_file({ANN_GPU: GPU, "valve.io/role": "online"}))
    res = CliRunner().invoke(app, ["proxy", "--gpu-from", str(f), "--metrics-port", "0"])
    assert res.exit_code == 0, res.output
    assert got["gpu"] == GPU
    res = CliRunner().invoke(app, ["proxy", "--gpu", "GPU-flag", "--gpu-from", str(f)])
    assert res.exit_code == 0 and got["gpu"] == "GPU-flag"
    res = CliRunner().invoke(app, ["proxy"])  # no GPU: forwards only
    assert res.exit_code == 0 and got["gpu"] is None
    res = CliRunner().invoke(app, ["proxy", "--gpu-from", str(tmp_path / "missing"), "--gpu-wait-seconds", "0"])
    assert res.exit_code == 2 and "did not appear" in res.output


def test_arbiter_process_waits_for_the_annotation_then_runs(tmp_path):
    """The real process: it logs that it waits, the 'kubelet' writes the file later, the arbiter starts."""
    f = tmp_path / "podinfo" / "annotations"
    f.parent.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "VALVE_GPU_UUID"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "valve.cli", "runtime", "arbiter", "--gpu-from", str(f), "--gpu-wait-seconds", "60",
         "--runtime-dir", str(tmp_path), "--metrics-port", "0", "--no-memory"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    path = control_path(GPU, tmp_path)
    try:
        first = proc.stdout.readline()  # blocks until the first log line (bounded by the test timeout)
        assert "waiting up to 60 s for annotation valve.io/gpu-uuid" in first
        assert not path.exists()
        tmp = f.with_suffix(".tmp")  # the kubelet swaps the file atomically
        tmp.write_text(kubelet_file({ANN_GPU: GPU, "valve.io/role": "offline"}))
        tmp.rename(f)
        end = time.monotonic() + 120
        while not (path.exists() and path.stat().st_size == FILE_SIZE):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < end, "no control block"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=20)[0]
        assert proc.returncode == 0, out
        assert f"annotation valve.io/gpu-uuid = {GPU}" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()

