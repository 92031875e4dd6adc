"""Hand-made calibrations for the simulator tests."""

from valve.simulate.calibration import Calibration, Point


def make(ts=(0.4, 1.3, 0.8), mps=(0.4, 1.3, 0.9), valve=(0.4, 1.0, 0.6), **kw) -> Calibration:
    """(online load, p99 ratio, offline ratio) per variant; TTFT and TPOT ratios equal."""
    pts = {name: (Point(u, r, r, off),) for name, (u, r, off) in
           (("time-slicing", ts), ("mps", mps), ("valve", valve))}
    return Calibration(gpu="test", points=pts, bench_request_gpu_s=kw.pop("bench_request_gpu_s", 0.2), **kw)


# Valve with no gate costs and efficiency 1: hand-checkable offline throughput.
EXACT = make(valve=(0.4, 1.0, 0.6), preemption_latency_s=0.0, reclaim_latency_s=0.0, reclaim_recompute_s=0.0,
             valve_offline_efficiency=1.0)
