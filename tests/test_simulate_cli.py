import json
from pathlib import Path

from typer.testing import CliRunner

from valve.cli import app
from valve.simulate import calibration

runner = CliRunner()
FIXTURE = Path(__file__).parent / "fixtures" / "requests_tiny.csv"


def run(*args: str):
    return runner.invoke(app, ["simulate", "cluster", *args], env={"COLUMNS": "200"})


def test_cli_runs_a_small_fleet_with_the_packaged_calibration(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is read from or written to the working directory unasked
    out = tmp_path / "out"
    res = run("--gpus", "64", "--services", "6", "--hours", "3", "--seed", "2", "--out", str(out), "--name", "small")
    assert res.exit_code == 0, res.output
    assert f"calibration: {calibration.DEFAULT_FILE} (packaged default)" in res.output
    assert f"output: {out.resolve()}" in res.output
    assert "GPUs needed" in res.output and "MPS" in res.output and "placement round" in res.output
    data = json.loads((out / "cluster_small.json").read_text())
    assert data["fleet"]["gpus"] == 64 and data["fleet"]["hours"] == 3
    assert set(data["strategies"]) == {"dedicated", "time_slicing", "mps", "valve"}
    assert data["calibration"]["file"] == str(calibration.DEFAULT_FILE)
    assert len(data["series"]["hours"]) == len(data["series"]["valve"]["utilisation"]) == 36
    png = (out / "cluster_small.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_needs_an_output_directory(tmp_path):
    res = run("--gpus", "64", "--services", "6")
    assert res.exit_code == 2 and "--out" in res.output


def test_cli_reads_a_request_trace_and_a_calibration_file(tmp_path):
    doc = json.loads(calibration.DEFAULT_FILE.read_text())
    doc["gpu"] = "H200 (test)"
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps(doc))
    res = run("--requests", str(FIXTURE), "--gpus", "8", "--calibration", str(cal), "--out", str(tmp_path),
              "--name", "req", "--no-plot")
    assert res.exit_code == 0, res.output
    assert f"calibration: {cal}\n" in res.output
    data = json.loads((tmp_path / "cluster_req.json").read_text())
    assert data["fleet"]["services"] == 2 and data["trace"] == str(FIXTURE)
    assert data["calibration"]["gpu"] == "H200 (test)"
    assert not (tmp_path / "cluster_req.png").exists()


def test_cli_reports_a_bad_trace_clearly(tmp_path):
    trace = tmp_path / "bad.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n1,10,10\n0.5,10,10\n")
    res = run("--requests", str(trace), "--out", str(tmp_path))
    assert res.exit_code == 2
    assert f"{trace}:3: arrival_s 0.5 is before" in res.output
    assert not list(tmp_path.glob("cluster_*"))


def test_cli_sweep_writes_its_json_and_tornado(tmp_path):
    res = run("--gpus", "64", "--services", "6", "--hours", "2", "--sweep", "--out", str(tmp_path), "--name", "s")
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "cluster_s_sweep.json").read_text())
    assert {r["name"] for r in data["tornado"]} >= {"reclaim_recompute_s", "preemption_latency_s", "slo",
                                                     "valve_offline_efficiency", "burst_cv", "load_elasticity"}
    assert len(data["grid"]) == 27
    assert (tmp_path / "cluster_s_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "range" in res.output


def test_cli_refuses_a_fleet_too_small_for_its_services(tmp_path):
    res = run("--gpus", "8", "--services", "20", "--out", str(tmp_path))
    assert res.exit_code == 2
    assert "20 services need at least 20 online GPUs" in res.output
