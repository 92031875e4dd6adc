"""What the benchmarks share: child processes (`procs`), the MPS daemon (`mps`), the environment record (`env`),
result files (`output`) and the open-loop HTTP load generator (`loadgen`).

The scripts in bench/ put the repository root on sys.path, so `from bench.harness import procs` works from a
checkout (bench/ is a namespace package; nothing here is installed with valve).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
