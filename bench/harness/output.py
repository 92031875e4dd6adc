"""Result files: ``<stem>.json`` (strict JSON: NaN becomes null), ``<stem>.txt`` (the table), ``<stem>.png``."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path


def clean(x):
    """NaN and infinities -> None, recursively (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [clean(v) for v in x]
    return x


def fmt(x, spec: str = ".2f") -> str:
    """A figure for a table: "-" when there is none (None or NaN)."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def slug(name: str, sep: str = "_") -> str:
    return re.sub(r"[^A-Za-z0-9]+", sep, name).strip(sep).lower() or "unknown"


def pyplot():
    """matplotlib's pyplot on the Agg backend, imported only by the benchmarks that plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_json(path: Path, doc, indent: int | None = 1, strict: bool = True) -> Path:
    """``strict``: NaN -> null; otherwise as json.dumps writes it. Anything else unknown becomes str."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(doc) if strict else doc, indent=indent, default=str, allow_nan=not strict))
    return path


def write(out: Path, stem: str, doc: dict, table: str | None = None, plot: Callable[[Path], None] | None = None,
          strict: bool = True) -> list[Path]:
    """``out/stem.json``, and ``.txt`` with ``table`` and ``.png`` drawn by ``plot(path)`` when given."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    if plot is not None:
        plot(out / f"{stem}.png")
        files.append(out / f"{stem}.png")
    files.insert(0, write_json(out / f"{stem}.json", doc, strict=strict))
    if table is not None:
        (out / f"{stem}.txt").write_text(table if table.endswith("\n") else table + "\n")
        files.append(out / f"{stem}.txt")
    return files


def checked_out(ap, path, file: bool = False, option: str = "--out") -> Path:
    """`path` (an --out folder, or a file with ``file``) checked before the run: the parser's exit 2 with one
    line when it cannot be written (valve.outpath)."""
    from valve.outpath import check_dir, check_file

    try:
        return (check_file if file else check_dir)(path, option)
    except ValueError as e:
        ap.exit(2, f"{ap.prog}: {e}\n")
