"""The device plugin's pid map (--pid-map): NSpid and cgroup parsing on real-looking /proc contents, the table
over a fake /proc tree, the file (mode, atomic replacement, content), the loop in a running plugin, the flags."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
from typer.testing import CliRunner
from waiting import until

from valve.api.contract import PIDS_FILE
from valve.device_plugin.backend import SimBackend
from valve.device_plugin.cli import register
from valve.device_plugin.config import PluginConfig
from valve.device_plugin.nvml import NvmlBackend
from valve.device_plugin.pidmap import (
    FILE_MODE,
    PidMapWriter,
    build_table,
    document,
    parse_nspid,
    pod_uid_from_cgroup,
    write_atomic,
)
from valve.device_plugin.server import DevicePlugin

UID = "1b2c3d4e-5f60-4a1b-8c2d-3e4f5a6b7c8d"
UID_ = UID.replace("-", "_")
CID = "4f1c0a7e9b2d3c6f8e0a1b2c3d4e5f60718293a4b5c6d7e8f90123456789abcd"


def status(name: str, *nspid: int) -> str:
    """A /proc/<pid>/status as Linux 6.x writes it (the lines around NSpid trimmed)."""
    return (f"Name:\t{name}\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t{nspid[-1]}\nNgid:\t0\nPid:\t{nspid[0]}\n"
            f"PPid:\t1\nTracerPid:\t0\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nFDSize:\t256\n"
            f"Groups:\t1000 \nNStgid:\t{chr(9).join(map(str, nspid))}\nNSpid:\t{chr(9).join(map(str, nspid))}\n"
            f"NSpgid:\t{chr(9).join(map(str, nspid))}\nNSsid:\t{nspid[0]}\nVmPeak:\t 8419200 kB\nThreads:\t42\n")


def test_nspid_host_first_own_namespace_last():
    assert parse_nspid(status("python3", 48213, 7)) == (48213, 7)  # a container's process
    assert parse_nspid(status("nvidia-smi", 1234)) == (1234,)  # the host's own
    assert parse_nspid(status("vllm", 90001, 412, 3)) == (90001, 412, 3)  # a nested namespace: its own pid last
    assert parse_nspid("Name:\tpython3\nPid:\t5\n") is None  # a kernel before 4.1
    assert parse_nspid("NSpid:\t12\tx\n") is None


CGROUPS = {
    "v1 cgroupfs burstable": (
        f"12:memory:/kubepods/burstable/pod{UID}/{CID}\n11:cpuset:/kubepods/burstable/pod{UID}/{CID}\n"
        f"1:name=systemd:/kubepods/burstable/pod{UID}/{CID}\n", UID),
    "v1 cgroupfs guaranteed": (f"4:devices:/kubepods/pod{UID}/{CID}\n", UID),
    "v1 systemd": (
        f"12:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
        f"cri-containerd-{CID}.scope\n0::/\n", UID),
    "v1 systemd guaranteed": (f"5:pids:/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope\n", UID),
    "v2 systemd": (
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope\n", UID),
    "v2 cgroupfs": (f"0::/kubepods/besteffort/pod{UID}/{CID}\n", UID),
    # read from a container with its own cgroup namespace: relative to its root, the pod's folder still there
    "v2 systemd, another cgroup namespace": (
        f"0::/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n", UID),
    "v2 cgroupfs, another cgroup namespace": (f"0::/../../besteffort/pod{UID}/{CID}\n", UID),
    "upper-case hex": (f"0::/kubepods/pod{UID.upper()}/{CID}\n", UID),
    "host service": ("0::/system.slice/containerd.service\n", None),
    "login session": ("0::/user.slice/user-1000.slice/session-3.scope\n", None),
    "docker outside Kubernetes": (f"0::/docker/{CID}\n", None),
    "not a uuid": ("0::/kubepods/podnotauuid/abc\n", None),
    "empty": ("", None),
}


@pytest.mark.parametrize("name", CGROUPS)
def test_pod_uid_from_the_kubelets_cgroup_path(name):
    text, uid = CGROUPS[name]
    assert pod_uid_from_cgroup(text) == uid


def fake_proc(root: Path, pid: int, nspid: tuple[int, ...], cgroup: str) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "status").write_text(status("python3", *nspid))
    (d / "cgroup").write_text(cgroup)


@pytest.fixture
def proc(tmp_path):
    root = tmp_path / "proc"
    fake_proc(root, 48213, (48213, 7), CGROUPS["v2 systemd"][0])  # the offline tenant
    fake_proc(root, 48999, (48999, 7), f"0::/kubepods/pod{UID.replace('1b2c', 'ffff')}/{CID}\n")  # pid 7 elsewhere
    fake_proc(root, 1234, (1234,), CGROUPS["host service"][0])  # a host process on the GPU
    fake_proc(root, 555, (9, 1), CGROUPS["v2 cgroupfs"][0])  # a /proc of another namespace: pid 555 is not 555
    return root


def test_table_of_nvmls_pids_over_a_proc_tree(proc):
    entries, missing = build_table(proc, [48999, 48213, 1234, 48213, 555, 777])
    assert entries == [
        {"host_pid": 1234, "ns_pid": 1234, "pod_uid": None},
        {"host_pid": 48213, "ns_pid": 7, "pod_uid": UID},
        {"host_pid": 48999, "ns_pid": 7, "pod_uid": UID.replace("1b2c", "ffff")},
    ]
    assert missing == [555, 777]  # 777: gone meanwhile


def test_the_file_is_replaced_whole_readable_by_all_writable_by_its_owner(tmp_path):
    path = tmp_path / PIDS_FILE
    old_umask = os.umask(0o077)
    try:
        write_atomic(path, document("GPU-a", [], 100.0, 1.0))
        before = path.stat().st_ino
        with open(path) as reader:  # a reader that opened the old table keeps reading it whole
            write_atomic(path, document("GPU-a", [{"host_pid": 5, "ns_pid": 1, "pod_uid": UID}], 101.0, 1.0))
            assert json.load(reader)["processes"] == []
    finally:
        os.umask(old_umask)
    assert path.stat().st_ino != before  # renamed over, not rewritten in place
    assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE == 0o644
    assert json.loads(path.read_text()) == {"version": 1, "gpu": "GPU-a", "time": 101.0, "interval_s": 1.0,
                                            "processes": [{"host_pid": 5, "ns_pid": 1, "pod_uid": UID}]}
    assert sorted(p.name for p in tmp_path.iterdir()) == [PIDS_FILE]  # no temporary file left


def test_a_pass_writes_each_gpus_table_and_says_once_what_it_cannot_do(tmp_path, proc, caplog):
    backend = SimBackend(2)
    a, b = backend.uuids
    for u in (a, b):
        (tmp_path / "run" / u).mkdir(parents=True)
    backend.set_processes(a, [48213, 1234])
    backend.set_processes(b, [31337])  # not in this /proc: hostPID missing
    clock = iter([10.0, 10.0, 11.0, 11.0]).__next__
    writer = PidMapWriter([a, b, "GPU-gone"], backend.compute_pids, tmp_path / "run", 0.5, proc, clock)
    with caplog.at_level(logging.WARNING, logger="valve.device_plugin.pidmap"):
        writer.step()
        writer.step()
    doc = json.loads((tmp_path / "run" / a / PIDS_FILE).read_text())
    assert doc["time"] == 11.0 and doc["interval_s"] == 0.5 and doc["gpu"] == a
    assert [e["host_pid"] for e in doc["processes"]] == [1234, 48213]
    assert json.loads((tmp_path / "run" / b / PIDS_FILE).read_text())["processes"] == []
    assert not (tmp_path / "run" / "GPU-gone").exists()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # two passes, one line per problem
    assert "[31337] are not in" in lines[0] and "hostPID" in lines[0]
    assert "NVML lists no processes of GPU-gone" in lines[1]


def test_a_running_plugin_keeps_the_map_current(short_dir, proc):
    backend = SimBackend(1)
    (uuid,) = backend.uuids
    config = PluginConfig(device_plugin_dir=short_dir / "dp", runtime_root=short_dir / "run",
                          state_dir=short_dir / "state", pod_resources_socket=None, metrics_port=None,
                          pid_map=True, pid_map_interval_s=0.1, proc_root=proc)
    plugin = DevicePlugin(config, backend)
    plugin.start()
    path = short_dir / "run" / uuid / PIDS_FILE

    def pids():
        try:
            return [e["host_pid"] for e in json.loads(path.read_text())["processes"]]
        except FileNotFoundError:
            return None

    try:
        until(lambda: pids() == [], "an empty map")
        backend.set_processes(uuid, [48213])
        until(lambda: pids() == [48213], "the tenant in the map")
    finally:
        plugin.stop()


def test_the_flags_reach_the_config(monkeypatch, tmp_path):
    seen = []

    class Capture:
        def __init__(self, config, backend):
            seen.append(config)
            raise OSError("captured")

    monkeypatch.setattr("valve.device_plugin.server.DevicePlugin", Capture)
    app = typer.Typer()
    register(app)
    app.command()(lambda: None)  # a second command: `device-plugin` stays a sub-command
    base = ["device-plugin", "--backend", "sim", "--runtime-root", str(tmp_path), "--state-dir", str(tmp_path),
            "--pod-resources-socket", "none", "--no-annotate", "--allow-nvidia-plugin"]
    CliRunner().invoke(app, base)
    CliRunner().invoke(app, [*base, "--pid-map", "--pid-map-interval", "0.5"])
    CliRunner().invoke(app, base, env={"VALVE_PID_MAP": "true"})
    assert [(c.pid_map, c.pid_map_interval_s) for c in seen] == [(False, 1.0), (True, 0.5), (True, 1.0)]
    bad = CliRunner().invoke(app, [*base, "--pid-map-interval", "0"])
    assert bad.exit_code == 2


def test_the_nvml_backend_lists_the_gpus_compute_pids():
    class Nvml:
        class NVMLError(Exception):
            pass

        def nvmlInit(self):
            pass

        def nvmlDeviceGetHandleByUUID(self, uuid):
            if uuid != "GPU-a":
                raise self.NVMLError("Not Found")
            return "h"

        def nvmlDeviceGetComputeRunningProcesses(self, handle):
            return [SimpleNamespace(pid=48213, usedGpuMemory=2**30), SimpleNamespace(pid=1234, usedGpuMemory=None)]

    backend = NvmlBackend(nvml=Nvml())
    assert backend.compute_pids("GPU-a") == [48213, 1234]
    assert backend.compute_pids("GPU-b") is None  # the pass leaves that GPU's file alone
