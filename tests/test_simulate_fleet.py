import json
import math

import numpy as np
import pytest
from simcal import EXACT, make

import valve.operator.placement as placement
from valve.simulate import calibration, fleet, traces

MEASURED = calibration.load()


def one_service(tmp_path, rps: float, gpu_s: float = 0.05):
    """One online service with one replica today, for an hour of 1-minute bins."""
    rows = "".join(f"svc,{m},{rps},{gpu_s},1\n" for m in range(60))
    p = tmp_path / "one.csv"
    p.write_text("service,minute,rps,gpu_s_per_request,replicas\n" + rows)
    return traces.read_csv(p)


def small_cfg(**kw):
    base = dict(gpus=2, gpus_per_node=2, offline_backlog=2.0, offline_job_hours=0.5, offline_job_sigma=0.0)
    return fleet.FleetConfig(**(base | kw))


def test_always_idle_online_frees_its_whole_gpu(tmp_path):
    res = fleet.simulate(one_service(tmp_path, rps=0.0), small_cfg(), EXACT)
    ded, valve = res["strategies"]["dedicated"], res["strategies"]["valve"]
    assert res["fleet"]["offline_backlog_gpu_hours"] == pytest.approx(2.0)  # 2 horizons x 1 offline GPU x 1 h
    # dedicated: only the offline GPU works; the backlog takes two hours
    assert ded["today"]["offline_gpu_equivalents"] == pytest.approx(1.0)
    assert ded["today"]["offline_backlog_done_h"] == pytest.approx(2.0)
    assert ded["today"]["utilisation_pct"] == pytest.approx(50.0)
    # Valve: the idle replica's GPU is a whole second offline GPU; half the time
    assert valve["today"]["offline_gpu_equivalents"] == pytest.approx(2.0)
    assert valve["today"]["offline_backlog_done_h"] == pytest.approx(1.0)
    assert valve["today"]["utilisation_pct"] == pytest.approx(100.0)
    # right-sized: the offline GPU is no longer needed
    assert ded["right_sized"]["gpus_needed"] == 2
    assert valve["right_sized"]["gpus_needed"] == 1
    assert valve["right_sized"]["gpus_saved"] == 1
    assert res["placement"]["pairs"] == 1 and res["placement"]["unpaired"] == 0


def test_always_busy_online_frees_nothing(tmp_path):
    res = fleet.simulate(one_service(tmp_path, rps=20.0), small_cfg(), EXACT)  # 20 rps x 0.05 s = 1 GPU busy
    ded, valve = res["strategies"]["dedicated"], res["strategies"]["valve"]
    assert valve["today"]["offline_gpu_equivalents"] == pytest.approx(1.0)
    assert valve["today"]["offline_backlog_done_h"] == pytest.approx(ded["today"]["offline_backlog_done_h"])
    assert valve["today"]["offline_backlog_done_h"] == pytest.approx(2.0)
    assert valve["today"]["utilisation_pct"] == pytest.approx(100.0)
    # a saturated replica misses its SLO with or without Valve
    assert ded["today"]["online_slo_violation_pct"] == pytest.approx(100.0)


def test_half_busy_online_gives_valve_the_idle_half_and_time_slicing_its_measured_share(tmp_path):
    res = fleet.simulate(one_service(tmp_path, rps=10.0), small_cfg(), EXACT)  # busy 0.5
    st = res["strategies"]
    # the idle half, less the arbiter's 5 ms idle hysteresis per preemption: 0.5 x 0.5 / 0.05 s = 5 per second
    assert st["valve"]["today"]["offline_gpu_equivalents"] == pytest.approx(1 + 0.5 - 5 * 0.005, abs=1e-3)
    assert st["valve"]["today"]["online_slo_violation_pct"] == 0.0
    assert st["dedicated"]["today"]["online_slo_violation_pct"] == 0.0
    # time-slicing measured 0.8 of offline alone at load 0.4: linear loss gives 0.75 at 0.5
    assert st["time_slicing"]["today"]["offline_gpu_equivalents"] == pytest.approx(1.75)
    assert st["mps"]["today"]["offline_gpu_equivalents"] == pytest.approx(1 + 1 - 0.5 * 0.1 / 0.4)


def synthetic(seed: int, gpus: int = 256, services: int = 12, hours: float = 6.0):
    cfg = fleet.FleetConfig(gpus=gpus, seed=seed, offline_job_hours=0.5)
    w = traces.synthetic(services, hours, 1.0, seed)
    return fleet.scale_to_online_gpus(w, gpus // 2, cfg.slo), cfg


def without_timings(res: dict) -> dict:
    res = json.loads(json.dumps(res))
    res.pop("simulate_seconds")
    res["placement"].pop("seconds")
    return res


def test_runs_are_reproducible_under_a_seed():
    a = fleet.simulate(*synthetic(3), MEASURED)
    b = fleet.simulate(*synthetic(3), MEASURED)
    c = fleet.simulate(*synthetic(4), MEASURED)
    assert without_timings(a) == without_timings(b)
    assert without_timings(a)["strategies"] != without_timings(c)["strategies"]


def test_simulator_places_pairs_with_the_operators_placement_function(monkeypatch):
    calls = []
    real = placement.place

    def spy(pairs, nodes):
        calls.append((list(pairs), list(nodes)))
        return real(pairs, nodes)

    monkeypatch.setattr(placement, "place", spy)
    work, cfg = synthetic(1)
    res = fleet.simulate(work, cfg, MEASURED)
    assert calls, "the simulator did not call valve.operator.placement.place"
    pairs, nodes = calls[0]
    assert len(pairs) == res["fleet"]["online_gpus_today"] == res["placement"]["pairs"]
    assert all(isinstance(p, placement.PairRequest) for p in pairs)
    assert len(nodes) == math.ceil(cfg.gpus / cfg.gpus_per_node)
    assert all(isinstance(n, placement.Node) and n.online_allocatable == 8 for n in nodes)
    assert len(calls) >= 2  # the right-sized Valve fleet is checked with it too


def test_simulator_uses_what_the_placement_function_decides(monkeypatch):
    def refuse(pairs, nodes):
        return [placement.Placement(p.key, None, "refused by test") for p in pairs]

    work, cfg = synthetic(1)
    placed = fleet.simulate(work, cfg, EXACT)
    monkeypatch.setattr(placement, "place", refuse)
    res = fleet.simulate(work, cfg, EXACT)
    assert res["placement"]["unpaired"] == res["placement"]["pairs"] > 0
    # no pair placed: the online replicas run alone and Valve's fleet does only the dedicated offline work
    valve, ded = res["strategies"]["valve"]["today"], res["strategies"]["dedicated"]["today"]
    assert valve["offline_gpu_equivalents"] == pytest.approx(ded["offline_gpu_equivalents"])
    assert placed["strategies"]["valve"]["today"]["offline_gpu_equivalents"] > ded["offline_gpu_equivalents"]
    # the right-sized fleet grows by nodes until the (refusing) placement has had its chance
    assert res["strategies"]["valve"]["right_sized"]["extra_nodes_for_placement"] > 0


def test_less_interference_needs_fewer_gpus():
    work, cfg = synthetic(2)
    need = []
    for ratio in (3.0, 1.76, 1.0):
        cal = make(valve=(0.4, ratio, 0.55))
        need.append(fleet.simulate(work, cfg, cal)["strategies"]["valve"]["right_sized"]["gpus_needed"])
    assert need[0] >= need[1] >= need[2]
    assert need[2] < cfg.gpus
    # a variant shares only while its interference stays below the SLO bound (here the same at every load)
    bound = fleet.right_sized(work, cfg, make(ts=(0.4, 5.0, 0.8), load_elasticity=0.0))
    assert bound["time_slicing"]["right_sized"]["services_shared"] == 0
    cheap = fleet.right_sized(work, cfg, make(ts=(0.4, 1.1, 0.8), load_elasticity=0.0))
    assert cheap["time_slicing"]["right_sized"]["services_shared"] > 0


def test_more_offline_throughput_saves_more_gpus():
    work, cfg = synthetic(2)
    saved = [fleet.right_sized(work, cfg, make(mps=(0.4, 1.3, off)))["mps"]["right_sized"]["gpus_saved"]
             for off in (0.3, 0.6, 0.9)]
    assert saved[0] <= saved[1] <= saved[2] and saved[0] < saved[2]


def test_choose_shared_stops_when_offline_work_is_covered():
    extra = np.array([0, 1, 2, 5])
    carried = np.array([1.0, 4.0, 3.0, 4.0])
    ok = np.ones(4, dtype=bool)
    assert list(fleet.choose_shared(extra, carried, ok, target=100.0)) == [True, True, True, False]
    assert list(fleet.choose_shared(extra, carried, ok, target=1.0)) == [True, False, False, False]
    assert list(fleet.choose_shared(extra, carried, ~ok, target=100.0)) == [False] * 4


def test_placement_round_over_the_default_fleet():
    # Timing is not asserted (no wall-clock tests); `valve simulate cluster` prints it, docs/simulate.md has it.
    replicas = np.full(1007, 4)
    w = traces.Workload([f"s{i}" for i in range(1007)], ["x"] * 1007, np.zeros((1007, 1)), np.ones(1007),
                        np.ones(1007), replicas, 1.0)
    lay = fleet.place_pairs(replicas, w, np.zeros(1007), gpus=8054, per_node=8)
    assert lay.placement_seconds > 0
    assert lay.pairs == 4028 and lay.unpaired == 0
    assert lay.shared.sum() == 4028
    # one pair per GPU: no GPU carries two services
    assert np.bincount(lay.service[lay.shared], minlength=1007).tolist() == [4] * 1007


def test_default_fleet():
    cfg = fleet.FleetConfig()
    w = fleet.scale_to_online_gpus(traces.synthetic(240, 24, 1, 0), cfg.gpus // 2, cfg.slo)
    res = fleet.simulate(w, cfg, MEASURED)
    assert res["placement"]["pairs"] == res["fleet"]["online_gpus_today"] <= cfg.gpus // 2
    assert res["placement"]["unpaired"] == 0
    assert res["fleet"]["gpus"] == 8054 and res["fleet"]["hours"] == 24
    assert res["strategies"]["valve"]["right_sized"]["gpus_needed"] < 8054
    assert res["strategies"]["dedicated"]["today"]["online_slo_violation_pct"] == 0.0
