import json
import os
from pathlib import Path

import numpy as np
import pytest

from valve.simulate import calibration, model
from valve.simulate.calibration import CalibrationError

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def measured():
    """The committed colocation measurement, read straight from its rows (not through the calibration code)."""
    doc = json.loads((RESULTS / "colocation_h100-80gb-hbm3.json").read_text())
    rows = {r["variant"]: r for r in doc["rows"]}
    return doc, rows, rows["online-alone"]["busy_fraction"]


def test_packaged_calibration_is_the_committed_measurement():
    def read(name):
        return str(RESULTS.relative_to(RESULTS.parents[1]) / name), json.loads((RESULTS / name).read_text())

    built = calibration.build([read("colocation_h100-80gb-hbm3.json")], read("preemption_nvidia_h100_80gb_hbm3.json"),
                              read("reclaim_nvidia_h100_80gb_hbm3.json"))
    assert json.loads(calibration.DEFAULT_FILE.read_text()) == built


def test_packaged_calibration_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    here = calibration.load()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench" / "results").mkdir(parents=True)  # a decoy: nothing is read from the working directory
    (tmp_path / "bench" / "results" / "colocation_x.json").write_text("{}")
    assert calibration.load() == here
    assert Path(here.path).parent == Path(calibration.__file__).parent


@pytest.mark.parametrize("elasticity", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("exponent", [0.5, 1.0, 2.0])
def test_model_reproduces_every_measured_ratio_within_10_percent(elasticity, exponent):
    doc, rows, _ = measured()
    cal = calibration.load().with_(load_elasticity=elasticity, offline_loss_exponent=exponent)
    names = {"time-slicing": "time_slicing", "mps": "mps", "valve": "valve"}
    strategies = {s.name: s for s in model.strategies(cal)}
    u0 = rows["online-alone"]["busy_fraction"]
    cv = 1.0 if doc["settings"]["arrival"] == "poisson" else pytest.fail("benchmark arrivals changed")
    # dedicated: the online-alone and offline-alone rows are the unit
    assert float(model.interference(u0, cv, strategies["dedicated"])) == rows["online-alone"]["ttft_p99_ratio"] == 1.0
    for variant, name in names.items():
        s, row = strategies[name], rows[variant]
        ratio = float(model.interference(u0, cv, s))
        for metric in ("ttft_p99_ratio", "tpot_p99_ratio"):
            assert ratio == pytest.approx(row[metric], rel=0.10), (variant, metric)
        rate = float(model.offline_rate(u0, s, doc["calibration"]["service_s"], cal, 0.005, 100.0))
        assert rate == pytest.approx(row["offline_ratio"], rel=0.10), variant


def test_several_measured_loads_are_each_reproduced():
    base = calibration.load()
    p = base.points["time-slicing"][0]
    two = (calibration.Point(0.2, 1.1, 1.1, 0.95), calibration.Point(0.6, 1.8, 1.8, 0.6))
    cal = base.with_(points=base.points | {"time-slicing": two})
    ts = model.strategies(cal)[1]
    for q in two:
        assert float(model.interference(q.online_load, 1.0, ts)) == pytest.approx(q.p99_ratio, rel=1e-6)
        assert float(model.offline_rate(q.online_load, ts)) == pytest.approx(q.offline_ratio, rel=1e-6)
    assert p.online_load > 0


def test_calibration_file_errors_name_the_field(tmp_path):
    good = json.loads(calibration.DEFAULT_FILE.read_text())
    f = tmp_path / "cal.json"
    for change, message in [
        (lambda d: d["points"].pop("mps"), "no measured points for mps"),
        (lambda d: d["points"]["valve"][0].update(offline_ratio="lots"), r"points.valve\[0\]: offline_ratio must be a number"),
        (lambda d: d.update(load_elasticity=2.0), "load_elasticity = 2.0 outside"),
        (lambda d: d["points"].update(gpu_direct=[]), "unknown variant"),
    ]:
        doc = json.loads(json.dumps(good))
        change(doc)
        f.write_text(json.dumps(doc))
        with pytest.raises(CalibrationError, match=message) as e:
            calibration.load(f)
        assert str(f) in str(e.value)
    f.write_text("{")
    with pytest.raises(CalibrationError, match="calibration file"):
        calibration.load(f)


def test_a_calibration_file_is_used_as_given(tmp_path):
    doc = json.loads(calibration.DEFAULT_FILE.read_text())
    doc["points"]["valve"][0]["ttft_p99_ratio"] = 1.5
    f = tmp_path / "cal.json"
    f.write_text(json.dumps(doc))
    cal = calibration.load(f)
    assert cal.path == str(f) and cal.points["valve"][0].p99_ratio == 1.5
    assert float(model.interference(cal.points["valve"][0].online_load, 1.0, model.strategies(cal)[3])) == \
        pytest.approx(1.5)
    assert os.path.basename(calibration.load().path) == "calibration_h100.json"
    assert np.isfinite(cal.bench_request_gpu_s)
