"""The chaos suite (tests/chaos/) as a benchmark: one pytest run of it with ``$VALVE_CHAOS_OUT`` set, so every test
records its figures (times to recover, counts), written with the environment to one file. CPU and the simulated
backend only: no GPU.

    python3 bench/chaos.py [--out bench/results]

Writes <out>/chaos.json: ``env``, ``command``, ``cpus``, and ``tests``: per test (pytest's name) its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import env, output  # noqa: E402


def run(out: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        figures = Path(tmp) / "figures.json"
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/chaos"],
                              cwd=ROOT, env={**os.environ, "VALVE_CHAOS_OUT": str(figures)})
        if done.returncode != 0:
            raise SystemExit(f"bench/chaos.py: the chaos suite failed (exit {done.returncode}); no result written")
        tests = json.loads(figures.read_text())
    doc = {"env": env.record("cpu", gpu="sim"), "cpus": os.cpu_count(), "command": "python3 bench/chaos.py",
           "tests": tests}
    return output.write(out, "chaos", doc)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    print(run(output.checked_out(ap, ap.parse_args().out)))


if __name__ == "__main__":
    main()
