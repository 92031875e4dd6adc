import numpy as np
import pytest

from valve.simulate import model, traces
from valve.simulate.calibration import Calibration

CAL = Calibration()
DED, NAIVE, VALVE = model.strategies(CAL)


def test_queue_factor_is_one_unloaded_and_infinite_at_saturation():
    assert model.queue_factor(0.0, 1.0) == pytest.approx(1.0)
    assert model.queue_factor(0.5, 1.0) == pytest.approx(2.0)  # M/M/1: 1 / (1 - u)
    assert np.isinf(model.queue_factor(1.0, 1.0))
    assert model.queue_factor(0.5, 2.0) > model.queue_factor(0.5, 1.0)  # burstier arrivals queue more


@pytest.mark.parametrize("cv", [0.0, 1.0, 2.0])
def test_max_util_meets_the_slo_exactly(cv):
    for s in (DED, VALVE):
        u = float(model.max_util(5.0, cv, s))
        assert 0 < u < 1
        assert model.online_p99(u, cv, s, 1.0) == pytest.approx(5.0)
    assert float(model.max_util(5.0, cv, VALVE)) < float(model.max_util(5.0, cv, DED))


def test_interference_as_large_as_the_slo_leaves_no_load():
    _, naive, _ = model.strategies(Calibration(ts_online_p99_ratio=5.0))
    assert float(model.max_util(5.0, 1.0, naive)) == 0.0
    assert model.replicas_for(3.0, 0.0) == 0


def test_default_interference_is_the_added_delay_over_each_request():
    req = np.array([0.02, 0.2])
    # Valve: the gate delays a request by the preemption latency once; offline is stopped while online runs
    assert model.interference(VALVE, req) == pytest.approx(1 + CAL.preemption_latency_s / req)
    # time-slicing: online runs at half speed while offline has work, after waiting for a slice
    assert model.interference(NAIVE, req) == pytest.approx(2 + CAL.ts_online_added_s / req)
    assert model.interference(DED, req) == 1.0
    # a measured end-to-end ratio wins
    _, naive, valve = model.strategies(Calibration(valve_online_p99_ratio=1.3, ts_online_p99_ratio=2.5))
    assert model.interference(valve, req) == 1.3 and model.interference(naive, req) == 2.5
    # short requests pay more: less load fits under the SLO
    u = model.max_util(5.0, np.ones(2), NAIVE, True, req)
    assert 0 < u[0] < u[1] < float(model.max_util(5.0, 1.0, DED))


def test_replicas_for_peak():
    assert list(model.replicas_for([0.0, 0.8, 0.81, 8.0], 0.8)) == [1, 1, 2, 10]
    assert list(model.replicas_for([0.0], 0.8, min_replicas=2)) == [2]


def test_offline_rate_idle_gpu_is_whole_and_busy_gpu_is_nothing():
    assert model.offline_rate(0.0, VALVE, 0.05, CAL, 0.005) == pytest.approx(CAL.valve_offline_efficiency)
    assert model.offline_rate(1.0, VALVE, 0.05, CAL, 0.005) == 0.0
    assert model.offline_rate(0.0, DED) == 0.0  # dedicated online GPUs run no offline work
    # time-slicing is work-conserving up to online's share, then online is starved at its share
    assert model.offline_rate(0.3, NAIVE) == pytest.approx(0.7)
    assert model.offline_rate(0.9, NAIVE) == pytest.approx(1 - CAL.ts_online_share)
    assert model.online_served(0.9, NAIVE, 1.0) == pytest.approx(CAL.ts_online_share)


def test_preemptions_and_reclaims_cost_valve_offline_time():
    free = model.offline_rate(0.3, VALVE)
    with_costs = model.offline_rate(0.3, VALVE, 0.05, CAL, 0.005, reclaims=1.0, bin_s=60.0)
    preempt = model.preemptions_per_s(0.3, 0.05, 100.0)
    assert preempt == pytest.approx(0.3 * 0.7 / 0.05)
    lost = preempt * (0.005 + CAL.preemption_latency_s) + (CAL.reclaim_latency_s + CAL.reclaim_recompute_s) / 60
    assert with_costs == pytest.approx(CAL.valve_offline_efficiency * (0.7 - lost))
    assert with_costs < free
    assert model.preemptions_per_s(0.5, 1e-6, 100.0) == 100.0  # the arbiter's rate cap


def test_reclaim_only_when_demand_rises_above_the_reserve():
    u = np.array([[0.5] * 5, [0.2, 0.5, 0.5, 0.1, 0.1], [0.5, 0.52, 0.5, 0.5, 0.5]])
    ev = model.reclaim_events(u, half_life_bins=1000.0, margin=0.1)
    assert ev[0].sum() == 0  # constant load: memory stays reserved
    assert list(ev[1]) == [0, 1, 0, 0, 0]
    assert ev[2].sum() == 0  # within the margin
    fast = model.reclaim_events(np.array([[0.5, 0.1, 0.1, 0.1, 0.5]]), half_life_bins=1.0)
    assert fast[0, 4] == 1  # the reserve decayed, the burst must be reclaimed


def test_diurnal_curve_has_mean_one_and_the_class_peak():
    hours = (np.arange(1440) + 0.5) / 60
    for ratio in (1.0, 1.5, 3.0, 6.0):
        c = traces.diurnal(hours, 14.0, ratio)
        assert c.mean() == pytest.approx(1.0, rel=1e-3)
        assert c.max() / c.mean() == pytest.approx(ratio, rel=1e-3)
        if ratio > 1.0:
            assert abs(hours[c.argmax()] - 14.0) < 0.02
