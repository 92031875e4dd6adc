"""End-to-end colocation benchmark: online LLM serving next to offline batch inference on one GPU.

    python3 bench/colocation.py [--quick] [--out bench/results] [--device cuda|cpu] [--variants ...]

The same as ``valve bench colocation`` (see ``valve/engine/colocation.py`` and docs/engine.md). Variants:
online alone, offline alone, time-slicing, Valve (gate + KV pool), MPS (root only, last). Writes
``colocation_<gpu>.json``, ``.png`` and ``.txt`` under --out; ratios to the solo runs with p50 and p99.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import typer  # noqa: E402

from valve.engine.cli import colocation  # noqa: E402

if __name__ == "__main__":
    typer.run(colocation)
