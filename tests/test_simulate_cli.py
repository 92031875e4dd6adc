import json

from typer.testing import CliRunner

from valve.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["simulate", "cluster", *args], env={"COLUMNS": "200"})


def test_cli_runs_a_small_fleet_and_writes_json_and_png(tmp_path):
    out = tmp_path / "out"
    res = run("--gpus", "64", "--services", "6", "--hours", "3", "--seed", "2", "--results-dir",
              str(tmp_path / "none"), "--out-dir", str(out), "--name", "small")
    assert res.exit_code == 0, res.output
    assert "Calibration used" in res.output and "default: H100 preemption probe" in res.output
    assert "GPUs needed" in res.output and "Valve" in res.output and "placement round" in res.output
    data = json.loads((out / "cluster_small.json").read_text())
    assert data["fleet"]["gpus"] == 64 and data["fleet"]["hours"] == 3
    assert set(data["strategies"]) == {"dedicated", "naive", "valve"}
    assert data["options"]["services"] == 6 and data["trace"] == "synthetic"
    assert data["calibration"]["valve_online_p99_ratio"]["source"].startswith("default")
    assert len(data["series"]["hours"]) == len(data["series"]["valve"]["utilisation"]) == 36
    png = (out / "cluster_small.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_reads_a_csv_trace_and_a_calibration_file(tmp_path):
    trace = tmp_path / "rates.csv"
    trace.write_text("service,minute,rps,replicas\n" + "".join(
        f"web,{m},{10 + m},2\napi,{m},5,1\n" for m in range(0, 30, 5)))
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"valve_online_p99_ratio": 1.05}))
    res = run("--trace", str(trace), "--gpus", "8", "--calibration", str(cal), "--results-dir", str(tmp_path),
              "--out-dir", str(tmp_path), "--name", "csv", "--no-plot")
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "cluster_csv.json").read_text())
    assert data["fleet"]["online_gpus_today"] == 3 and data["fleet"]["bin_minutes"] == 5
    assert data["calibration"]["valve_online_p99_ratio"] == {"value": 1.05, "source": str(cal)}
    assert not (tmp_path / "cluster_csv.png").exists()


def test_cli_reports_a_bad_trace_clearly(tmp_path):
    trace = tmp_path / "bad.csv"
    trace.write_text("service,minute,rps\nweb,0,fast\n")
    res = run("--trace", str(trace), "--out-dir", str(tmp_path), "--results-dir", str(tmp_path))
    assert res.exit_code == 2
    assert "rps must be a number" in res.output
    assert not list(tmp_path.glob("cluster_*"))


def test_cli_refuses_a_fleet_too_small_for_its_services(tmp_path):
    res = run("--gpus", "8", "--services", "20", "--out-dir", str(tmp_path), "--results-dir", str(tmp_path))
    assert res.exit_code == 2
    assert "20 services need at least 20 online GPUs" in res.output
