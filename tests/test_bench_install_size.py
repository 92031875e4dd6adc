"""bench/install_size.py counts what an extra brings, not pip's and setuptools' own files; its committed result is
consistent with itself."""

from __future__ import annotations

from bench.install_size import LEFT_OUT, disk_bytes
from tests.support.markdown import result


def test_disk_bytes_leaves_out_pip_and_setuptools(tmp_path):
    for name in ("pip/__init__.py", "setuptools-65.5.0.dist-info/RECORD", "valve/__init__.py", "six.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * 10_000)
    one = (tmp_path / "six.py").stat().st_blocks * 512
    assert disk_bytes(tmp_path, {"pip", "setuptools"}) == 2 * one


def test_the_committed_result_counts_its_distributions():
    doc = result("install_size.json")
    for extra, r in doc["extras"].items():
        names = [d["name"].lower() for d in r["distributions"]]
        assert r["packages"] == len(names) == len(set(names)), extra
        assert "valve" in names and not LEFT_OUT & set(names), extra
    assert doc["extras"]["base"]["packages"] == 1
