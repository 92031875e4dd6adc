"""Output paths are checked before a long run: a file where a folder is expected, a folder under a file, or a place
nothing can be written (/proc) is one stderr line and exit 2 at once, not a traceback when the results are
written (valve/outpath.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from valve.outpath import check_dir, check_file

ROOT = Path(__file__).resolve().parent.parent
UNWRITABLE = Path("/proc/valve-results")  # even root cannot create anything there


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "results"
    path.write_text("keep me\n")
    return path


def test_check_dir(tmp_path: Path, a_file: Path) -> None:
    made = check_dir(tmp_path / "new" / "deeper")
    assert made.is_dir() and list(made.iterdir()) == []  # created, and the probe file is gone
    with pytest.raises(ValueError, match=r"^--out '.*results': is a file, not a folder$"):
        check_dir(a_file)
    with pytest.raises(ValueError, match=r"^--out '.*results/sub': cannot write there: Not a directory"):
        check_dir(a_file / "sub")
    with pytest.raises(ValueError, match=r"^--out '/proc/valve-results': cannot write there: "):
        check_dir(UNWRITABLE)
    assert a_file.read_text() == "keep me\n"


def test_check_file(tmp_path: Path, a_file: Path) -> None:
    assert check_file(a_file, "--json") == a_file and a_file.read_text() == "keep me\n"  # opened, not changed
    assert check_file(tmp_path / "d" / "x.json") == tmp_path / "d" / "x.json"
    assert not (tmp_path / "d" / "x.json").exists()
    with pytest.raises(ValueError, match=r"^--json '.*': is a folder, not a file$"):
        check_file(tmp_path, "--json")
    with pytest.raises(ValueError, match="cannot write there"):
        check_file(UNWRITABLE / "x.json")


def one_line(args: list[str], prefix: str) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr, proc.stdout)
    assert lines[0].startswith(prefix) and "Traceback" not in proc.stdout, lines[0]
    return lines[0]


def test_colocation_benchmark_refuses_a_file_as_its_out_folder(a_file: Path) -> None:
    line = one_line(["bench/colocation.py", "--device", "cpu", "--quick", "--out", str(a_file)], "colocation: --out ")
    assert line.endswith("is a file, not a folder")
    assert a_file.read_text() == "keep me\n"


def test_chaos_benchmark_refuses_an_unwritable_out_folder() -> None:
    # before the suite runs (minutes): the parser's exit 2 with one line
    one_line(["bench/chaos.py", "--out", str(UNWRITABLE)], "chaos.py: --out '/proc/valve-results': cannot write there")


def test_operator_scale_benchmark_refuses_a_folder_as_its_out_file(tmp_path: Path) -> None:
    one_line(["bench/operator_scale.py", "--out", str(tmp_path)], f"operator_scale.py: --out '{tmp_path}': is a folder")


def test_simulate_refuses_an_out_folder_under_a_file(a_file: Path) -> None:
    one_line(["-m", "valve.cli", "simulate", "cluster", "--out", str(a_file / "sim")],
             f"valve simulate cluster: --out '{a_file / 'sim'}': cannot write there: Not a directory")


def test_demo_refuses_a_folder_as_its_json_file(tmp_path: Path) -> None:
    one_line(["-m", "valve.cli", "demo", "--json", str(tmp_path)], f"valve demo: --json '{tmp_path}': is a folder")


def test_crds_generate_refuses_an_unwritable_out_folder() -> None:
    one_line(["-m", "valve.cli", "crds", "generate", "--out", str(UNWRITABLE)], "valve crds generate: --out ")


def test_pidmap_benchmark_refuses_a_file_as_its_out_folder(a_file: Path) -> None:
    one_line(["bench/pidmap_gpu.py", "--out", str(a_file)], "pidmap_gpu.py: --out ")
