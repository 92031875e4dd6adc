"""README's layout table names paths that exist, and every package and module of valve/ appears in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layout_paths() -> list[str]:
    text = (ROOT / "README.md").read_text()
    table = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = [ln.split("|")[1] for ln in table.splitlines() if ln.startswith("| `")]
    return [p for row in rows for p in re.findall(r"`([^`]+)`", row)]


def test_every_path_in_the_layout_table_exists():
    missing = [p for p in layout_paths() if not (ROOT / p.rstrip("/")).exists()]
    assert missing == []


def test_every_part_of_valve_is_in_the_layout_table():
    listed = {p.rstrip("/") for p in layout_paths()}
    parts = {f"valve/{p.name}" for p in (ROOT / "valve").iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")}
    assert parts - listed == set()
