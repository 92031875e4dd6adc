import csv
from pathlib import Path

import numpy as np
import pytest

from valve.simulate import traces
from valve.simulate.traces import TraceError, read_csv


def write(tmp_path, text: str, name: str = "t.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_csv_parses_rates_into_busy_gpu_demand(tmp_path):
    p = write(tmp_path, "service,minute,rps,gpu_s_per_request,replicas,class\n"
                        "a,0,10,0.1,3,chat\na,5,20,0.1,3,chat\nb,0,4,,,\nb,5,0,,,\n")
    w = read_csv(p, gpu_s_per_request=0.5, cv=1.5)
    assert w.names == ["a", "b"]
    assert w.bin_minutes == 5.0 and w.bins == 2
    np.testing.assert_allclose(w.demand, [[1.0, 2.0], [2.0, 0.0]])  # rps x GPU seconds per request
    assert list(w.replicas) == [3, 0]
    assert list(w.request_gpu_s) == [0.1, 0.5]
    assert list(w.cv) == [1.5, 1.5]
    assert w.classes == ["chat", "csv"]


@pytest.mark.parametrize("text, message", [
    ("", "empty file"),
    ("service,minute\na,0\n", "missing column(s) rps"),
    ("service,minute,rps\n", "no data rows"),
    ("service,minute,rps\na,0,1\na,1,lots\n", ":3: rps must be a number, got 'lots'"),
    ("service,minute,rps\na,0,-1\n", ":2: rps must be >= 0"),
    ("service,minute,rps\na,0.5,1\n", ":2: minute must be a whole number"),
    ("service,minute,rps\na,0,1\na,0,2\n", ":3: second row for service 'a' at minute 0"),
    ("service,minute,rps\na,0,1\na,1,1\nb,0,1\n", "service 'b' has no row for minute 1"),
    ("service,minute,rps\na,0,1\na,5,1\na,7,1\n", "evenly spaced from 0"),
    ("service,minute,rps,replicas\na,0,1,2\na,1,1,3\n", ":3: replicas of service 'a' changes"),
    ("service,minute,rps,replicas\na,0,1,1.5\n", "replicas must be a whole number"),
    ("service,minute,rps,gpu_s_per_request\na,0,1,0\n", "gpu_s_per_request must be > 0"),
    ("service,minute,rps\n,0,1\n", ":2: empty service name"),
    ("service,minute,rps\na,0,1,9\n", ":2: more fields than columns"),
    ("service,minute,rps\na,0,inf\n", "must be finite"),
])
def test_bad_csv_files_get_clear_errors(tmp_path, text, message):
    p = write(tmp_path, text)
    with pytest.raises(TraceError) as e:
        read_csv(p)
    assert message in str(e.value)
    assert str(p) in str(e.value)


def test_missing_csv_file(tmp_path):
    with pytest.raises(TraceError, match="No such file"):
        read_csv(tmp_path / "nope.csv")


def test_synthetic_traces_follow_their_classes_and_seed():
    a = traces.synthetic(40, 24, 1, seed=5)
    b = traces.synthetic(40, 24, 1, seed=5)
    c = traces.synthetic(40, 24, 1, seed=6)
    np.testing.assert_array_equal(a.demand, b.demand)
    assert not np.array_equal(a.demand, c.demand)
    assert a.demand.shape == (40, 1440) and (a.demand > 0).all()
    flat = traces.synthetic(40, 24, 1, seed=5, burst_cv=0.0)
    classes = {k.name: k for k in traces.DEFAULT_CLASSES}
    for i, cls in enumerate(flat.classes):  # without bursts: the class's diurnal peak over mean
        d = flat.demand[i]
        assert d.max() / d.mean() == pytest.approx(classes[cls].peak_to_mean, rel=1e-3)
    bursty = traces.synthetic(40, 24, 1, seed=5, burst_cv=0.5)
    ratio = bursty.demand / flat.demand  # the gamma factor: mean 1, CV 0.5
    assert ratio.mean() == pytest.approx(1.0, abs=0.02)
    assert ratio.std() == pytest.approx(0.5, abs=0.02)


FIXTURE = Path(__file__).parent / "fixtures" / "requests_tiny.csv"


def test_request_trace_becomes_per_service_demand():
    w = traces.read_requests(FIXTURE, bin_minutes=1.0)
    rows = list(csv.DictReader(FIXTURE.open()))
    assert w.names == sorted({r["service"] for r in rows})
    t0 = float(rows[0]["arrival_s"])
    assert w.bins == int((float(rows[-1]["arrival_s"]) - t0) // 60) + 1
    # total GPU-busy seconds are kept: prefill and decode per token
    busy = sum(int(r["prompt_tokens"]) * traces.PREFILL_S_PER_TOKEN + int(r["output_tokens"]) *
               traces.DECODE_S_PER_TOKEN for r in rows)
    assert w.demand.sum() * 60 == pytest.approx(busy)
    chat = [float(r["arrival_s"]) for r in rows if r["service"] == "chat"]
    gaps = np.diff(chat)
    assert w.cv[w.names.index("chat")] == pytest.approx(gaps.std() / gaps.mean())


@pytest.mark.parametrize("text, message", [
    ("arrival_s,prompt_tokens\n0,1\n", ":1: missing column(s) output_tokens"),
    ("arrival_s,prompt_tokens,output_tokens\n0,1,2\n1,many,2\n", ":3: prompt_tokens must be a number"),
    ("arrival_s,prompt_tokens,output_tokens\n0,1,2\n5,1,2\n4,1,2\n", ":4: arrival_s 4 is before the previous"),
    ("arrival_s,prompt_tokens,output_tokens\n0,-1,2\n", ":2: token counts must be >= 0"),
    ("arrival_s,prompt_tokens,output_tokens\n", "no data rows"),
])
def test_bad_request_traces_name_the_line(tmp_path, text, message):
    p = write(tmp_path, text)
    with pytest.raises(TraceError) as e:
        traces.read_requests(p)
    assert f"{p}" in str(e.value) and message in str(e.value)
    assert "\n" not in str(e.value)
