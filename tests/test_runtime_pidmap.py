"""The arbiter's side of the pid map: the published (pod) pid -> host pids for NVML samples, the fallback to the
pid itself (one log line) when the map is missing, stale or corrupt, and the wiring from --pod-uid / the env."""

from __future__ import annotations

import json
import logging
import time
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from valve.api.contract import ENV_POD_UID, PIDS_FILE
from valve.device_plugin.pidmap import document, write_atomic
from valve.runtime.arbiter.enforce import NvmlBusySampler
from valve.runtime.arbiter.pidmap import STALE_MIN_S, PidMap, host_pids, parse_pid_map, pid_mapping

POD = "1b2c3d4e-5f60-4a1b-8c2d-3e4f5a6b7c8d"
OTHER = "ffff3d4e-5f60-4a1b-8c2d-3e4f5a6b7c8d"
ENTRIES = [
    {"host_pid": 48213, "ns_pid": 7, "pod_uid": POD},  # the tenant
    {"host_pid": 48214, "ns_pid": 7, "pod_uid": POD},  # a second container of the pod with its own namespace
    {"host_pid": 48230, "ns_pid": 9, "pod_uid": POD},  # another process of the pod
    {"host_pid": 48999, "ns_pid": 7, "pod_uid": OTHER},  # pid 7 of another pod
    {"host_pid": 7, "ns_pid": 7, "pod_uid": None},  # the host's pid 7
]


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def gpu_dir(tmp_path):
    return tmp_path / "GPU-a"


def write(gpu_dir, entries=ENTRIES, at=1000.0, interval=1.0):
    gpu_dir.mkdir(exist_ok=True)
    write_atomic(gpu_dir / PIDS_FILE, document("GPU-a", entries, at, interval))  # the device plugin's writer


def lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "valve.runtime.arbiter.pidmap"]


def test_the_published_pid_maps_to_this_pods_host_pids(gpu_dir):
    write(gpu_dir)
    pm = pid_mapping(gpu_dir, POD.upper())
    pm.clock = Clock(1000.5)
    assert pm(7) == {48213, 48214}  # never another pod's pid 7, nor the host's
    assert pm(9) == {48230}
    assert pm(11) == set()  # fresh map, pid not on the GPU: nothing of NVML's is this tenant's
    assert pm(0) == set() and pm.fallback is None
    assert pid_mapping(gpu_dir, None) is None and pid_mapping(gpu_dir, "") is None  # a bare machine: identity


def test_a_changed_map_is_read_again(gpu_dir):
    write(gpu_dir)
    pm = PidMap(gpu_dir / PIDS_FILE, POD, Clock(1000.0))
    assert pm(7) == {48213, 48214}
    write(gpu_dir, [{"host_pid": 50001, "ns_pid": 7, "pod_uid": POD}])
    assert pm(7) == {50001}


@pytest.mark.parametrize("damage, reason", [
    (None, "missing"),
    ("{not json", "corrupt: not JSON"),
    (json.dumps({"version": 2, "processes": []}), "corrupt: not a version 1 pid map"),
    (json.dumps({"version": 1, "time": 1000.0, "interval_s": 1.0}), "corrupt: no processes list"),
    (json.dumps({"version": 1, "processes": [], "time": "now", "interval_s": 1.0}), "corrupt: no time"),
    ("stale", "stale: written 6.0 s ago"),
])
def test_a_missing_corrupt_or_stale_map_falls_back_to_the_pid_itself_with_one_line(gpu_dir, caplog, damage,
                                                                                       reason):
    clock = Clock(1000.0)
    if damage == "stale":
        write(gpu_dir, at=1000.0 - STALE_MIN_S - 1)
    elif damage is not None:
        gpu_dir.mkdir()
        (gpu_dir / PIDS_FILE).write_text(damage)
    pm = PidMap(gpu_dir / PIDS_FILE, POD, clock)
    with caplog.at_level(logging.INFO, logger="valve.runtime.arbiter.pidmap"):
        for _ in range(50):  # every busy sample asks
            assert pm(7) == {7}
        assert pm.fallback.startswith(reason)
        (first,) = lines(caplog)
        assert reason in first and str(gpu_dir / PIDS_FILE) in first
        write(gpu_dir, at=clock.now)  # the plugin writes again: mapped again, said once
        assert pm(7) == {48213, 48214} and pm(7) == {48213, 48214}
        clock.now += 100  # ... and it stops: one more line
        assert pm(7) == {7} and pm(7) == {7}
    said = lines(caplog)
    assert len(said) == 3 and said[1].endswith("is usable again") and "stale: written 100.0 s ago" in said[2]


def test_the_stale_limit_follows_the_writers_interval(gpu_dir):
    write(gpu_dir, at=1000.0, interval=10.0)
    assert PidMap(gpu_dir / PIDS_FILE, POD, Clock(1049.0))(7) == {48213, 48214}  # 5 intervals of 10 s
    assert PidMap(gpu_dir / PIDS_FILE, POD, Clock(1051.0))(7) == {7}


def test_bad_entries_are_skipped_not_fatal():
    doc = parse_pid_map(json.dumps({"version": 1, "time": 1.0, "interval_s": 1.0, "processes": [
        {"host_pid": "x", "ns_pid": 7, "pod_uid": POD}, {"ns_pid": 7, "pod_uid": POD},
        {"host_pid": 5, "ns_pid": 7, "pod_uid": POD}]}))
    assert host_pids(doc, POD, 7) == {5}


class FakeNvml:
    class NVMLError(Exception):
        pass

    def __init__(self, samples):
        self.samples = samples

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return uuid

    def nvmlDeviceGetProcessUtilization(self, handle, last_seen_us):
        return [s for s in self.samples if s.timeStamp > last_seen_us]


def test_nvml_samples_of_the_tenants_host_pid_count_and_no_others(gpu_dir):
    write(gpu_dir, at=time.time())
    stamp = time.time_ns() // 1000
    nv = FakeNvml([SimpleNamespace(pid=p, timeStamp=stamp, smUtil=u, memUtil=0)
                   for p, u in ((48999, 100), (7, 90), (48213, 40))])
    sampler = NvmlBusySampler("GPU-a", nvml=nv, pids=pid_mapping(gpu_dir, POD))
    assert [busy for _, busy in sampler.sample(0, 7)] == [0.4]  # not pid 7 of the host, not the other pod's


def test_the_arbiter_takes_its_pod_uid_from_the_env_and_reads_its_gpus_map(tmp_path, monkeypatch):
    from valve.runtime import cli

    seen = []

    def spy(*args, pids=None):
        seen.append(pids)
        raise ValueError("spied")

    monkeypatch.setattr(cli, "make_enforcement", spy)
    monkeypatch.setattr("valve.signals.stop_on_signals", lambda stop: None)  # keep pytest's own handlers
    base = ["arbiter", "--gpu", "GPU-a", "--runtime-dir", str(tmp_path), "--metrics-port", "0", "--no-memory"]
    got = CliRunner().invoke(cli.app, base, env={ENV_POD_UID: POD})
    assert got.exit_code == 2 and "spied" in got.output
    CliRunner().invoke(cli.app, base, env={ENV_POD_UID: ""})
    CliRunner().invoke(cli.app, [*base, "--pod-uid", OTHER])
    assert [(p.path, p.pod_uid) if p else None for p in seen] == [
        (tmp_path / "GPU-a" / PIDS_FILE, POD), None, (tmp_path / "GPU-a" / PIDS_FILE, OTHER)]


def test_make_enforcement_gives_the_nvml_sampler_the_mapping(monkeypatch, gpu_dir):
    from valve.runtime import cli

    monkeypatch.setattr("valve.runtime.arbiter.enforce.NvmlBusySampler",
                        lambda gpu, pids=None: SimpleNamespace(gpu=gpu, pids=pids))
    pm = pid_mapping(gpu_dir, POD)
    enf = cli.make_enforcement("report", "nvml", "GPU-a", 50, 0.2, 20, None, pids=pm)
    assert enf.sampler.pids is pm and enf.sampler.gpu == "GPU-a"
