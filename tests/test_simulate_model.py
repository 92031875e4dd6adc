import numpy as np
import pytest
from simcal import make

from valve.simulate import model, traces

CAL = make(ts=(0.4, 1.3, 0.8), mps=(0.4, 1.5, 0.9), valve=(0.4, 1.02, 0.55), preemption_latency_s=0.001,
           reclaim_latency_s=0.02, reclaim_recompute_s=0.5)
DED, TS, MPS, VALVE = model.strategies(CAL)


def test_queue_factor_is_one_unloaded_and_infinite_at_saturation():
    assert model.queue_factor(0.0, 1.0) == pytest.approx(1.0)
    assert model.queue_factor(0.5, 1.0) == pytest.approx(2.0)  # M/M/1: 1 / (1 - u)
    assert np.isinf(model.queue_factor(1.0, 1.0))
    assert model.queue_factor(0.5, 2.0) > model.queue_factor(0.5, 1.0)  # burstier arrivals queue more


def test_replicas_for_peak():
    assert list(model.replicas_for([0.0, 0.8, 0.81, 8.0], 0.8)) == [1, 1, 2, 10]
    assert list(model.replicas_for([0.0], 0.8, min_replicas=2)) == [2]


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


@pytest.mark.parametrize("cv", [0.0, 1.0, 2.0])
def test_max_util_meets_the_slo_exactly(cv):
    for s in (DED, TS, MPS, VALVE):
        u = float(model.max_util(5.0, cv, s))
        assert 0 < u < 1
        assert float(model.online_p99(u, cv, s, 1.0)) == pytest.approx(5.0, rel=1e-6)
    # more interference, less load under the same SLO
    assert model.max_util(5.0, cv, MPS) < model.max_util(5.0, cv, TS) < model.max_util(5.0, cv, VALVE) \
        < model.max_util(5.0, cv, DED)


def test_interference_as_large_as_the_slo_leaves_no_load():
    ts = model.strategies(make(ts=(0.4, 5.0, 0.8)).with_(load_elasticity=0.0))[1]
    assert float(model.max_util(5.0, 1.0, ts)) == 0.0
    assert model.replicas_for(3.0, 0.0) == 0


def test_fitted_slowdown_gives_the_measured_ratio_and_elasticity_sets_the_load_dependence():
    s = model.fit_slowdown(1.3, 0.4, 1.0)
    assert s * model.queue_factor(s * 0.4, 1.0) / model.queue_factor(0.4, 1.0) == pytest.approx(1.3)
    flat = model.strategies(CAL.with_(load_elasticity=0.0))[1]
    steep = model.strategies(CAL.with_(load_elasticity=1.0))[1]
    u = np.array([0.1, 0.4, 0.7])
    np.testing.assert_allclose(model.interference(u, 1.0, flat), 1.3)  # the measured ratio at every load
    r = model.interference(u, 1.0, steep)
    assert r[1] == pytest.approx(1.3) and r[0] < r[1] < r[2]  # queueing amplifies the slowdown with load
    assert float(model.interference(0.7, 1.0, DED)) == 1.0


def test_offline_rate_follows_the_measurement_and_the_gate():
    # time-slicing and MPS: the measured offline ratio at the measured load, full throughput with no online load
    assert float(model.offline_rate(0.4, TS)) == pytest.approx(0.8)
    assert float(model.offline_rate(0.0, TS)) == pytest.approx(1.0)
    assert float(model.offline_rate(0.2, TS)) == pytest.approx(0.9)  # linear loss by default
    convex = model.strategies(CAL.with_(offline_loss_exponent=2.0))[1]
    assert float(model.offline_rate(0.2, convex)) == pytest.approx(1 - 0.2 * 0.2**2 / 0.4**2)
    # Valve: the idle share at the fitted efficiency, nothing when online is always busy
    eff = VALVE.offline[0]
    assert float(model.offline_rate(0.4, VALVE, 0.2, CAL, 0.005, 100.0)) == pytest.approx(0.55)
    assert float(model.offline_rate(0.0, VALVE)) == pytest.approx(eff)
    assert float(model.offline_rate(1.0, VALVE)) == 0.0
    assert float(model.offline_rate(0.0, DED)) == 0.0  # dedicated online GPUs run no offline work


def test_preemptions_and_reclaims_cost_valve_offline_time():
    free = float(model.offline_rate(0.3, VALVE))
    with_costs = float(model.offline_rate(0.3, VALVE, 0.05, CAL, 0.005, 100.0, reclaims=1.0, bin_s=60.0))
    preempt = model.preemptions_per_s(0.3, 0.05, 100.0)
    assert preempt == pytest.approx(0.3 * 0.7 / 0.05)
    lost = preempt * (0.005 + CAL.preemption_latency_s) + (CAL.reclaim_latency_s + CAL.reclaim_recompute_s) / 60
    assert with_costs == pytest.approx(VALVE.offline[0] * (0.7 - lost))
    assert with_costs < free
    assert model.preemptions_per_s(0.5, 1e-6, 100.0) == 100.0  # the arbiter's rate cap
