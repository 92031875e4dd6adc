"""bench/pidmap_gpu.py: without what it needs (NVML here) it says so in one line before it starts anything."""

import subprocess
import sys

from bench.pidmap_gpu import ROOT


def test_without_nvml_it_stops_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "pidmap_gpu.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "pidmap_gpu.py: needs" in line
    assert not list(tmp_path.iterdir())



def test_the_h200_run_in_the_docs_is_the_result_file():
    from tests.support.markdown import result

    doc = result("pidmap_gpu_h200.json")
    assert all(doc["checks"].values())
    text = " ".join((ROOT / "docs/runtime.md").read_text().split())
    (entry,) = doc["pid_map"]["processes"]
    assert entry == {"host_pid": doc["host_pid"], "ns_pid": doc["ns_pid"], "pod_uid": doc["pod_uid"]}
    for figure in (f"in its own pid namespace (`unshare --pid`, where it is pid {doc['ns_pid']})",
                   f"NVML reported it as host pid {doc['host_pid']} (`NSpid` {' '.join(map(str, doc['nspid_chain']))})",
                   f"turned the published pid {doc['ns_pid']} into {doc['host_pid']}",
                   f"found {doc['samples_mapped']} busy samples through the map (up to {doc['busy_max_mapped']:.0%} SM)",
                   f"and none for pid {doc['ns_pid']} alone", f"driver {doc['driver']}"):
        assert figure in text, figure
    assert doc["samples_published_pid_alone"] == 0
