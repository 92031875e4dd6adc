"""What each pip extra of valve installs: a fresh venv per extra, `pip install 'valve-*.whl[extra]'` (the wheel built
once from this checkout), then the distributions in the venv and the disk space of its site-packages, pip and
setuptools left out of both. CPU only; needs the package index (or a pip cache that holds every wheel).

    python3 bench/install_size.py [--extras base,cuda,node,...] [--out bench/results]

Writes <out>/install_size.json: the Python version, and per extra pip's version, the distributions (name, version, bytes
on disk of the files in their RECORD), their count (valve included) and the bytes on disk of site-packages (file
blocks, as du counts them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import output  # noqa: E402

EXTRAS = ("base", "cuda", "node", "demo", "simulate", "plots", "engine", "bench", "all", "dev")
LEFT_OUT = {"pip", "setuptools"}
# run inside each venv: its distributions and the bytes on disk of the files each one's RECORD lists
LIST = """
import json, os
from importlib.metadata import distributions
out = []
for d in distributions():
    size = 0
    for f in d.files or []:
        try:
            size += os.stat(d.locate_file(f)).st_blocks * 512
        except OSError:
            pass
    out.append({"name": d.metadata["Name"], "version": d.version, "bytes": size})
print(json.dumps(out))
"""


def disk_bytes(path: Path, skip: set[str]) -> int:
    """Bytes on disk (file blocks) under `path`, leaving out the top-level entries whose names start with one of
    `skip` (pip's and setuptools' own folders)."""
    total = 0
    for entry in path.iterdir():
        if any(entry.name.lower().startswith(s) for s in skip):
            continue
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file() and not p.is_symlink()]
        total += sum(p.stat().st_blocks * 512 for p in files)
    return total


def measure(wheel: Path, extra: str, work: Path) -> dict:
    venv = work / f"venv-{extra}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    target = str(wheel) if extra == "base" else f"{wheel}[{extra}]"
    # nothing of this checkout on the venv's path (PYTHONPATH, the working directory): pip would take it as installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"}

    def run(*args: str) -> str:
        return subprocess.run([str(py), *args], check=True, env=env, cwd=work, capture_output=True, text=True).stdout

    run("-m", "pip", "install", "-q", target)
    dists = json.loads(run("-c", LIST))
    dists = sorted((d for d in dists if d["name"].lower() not in LEFT_OUT), key=lambda d: d["name"].lower())
    site = next((venv / "lib").glob("python*/site-packages"))
    skip = {"pip", "setuptools", "_distutils_hack", "distutils-precedence.pth", "pkg_resources"}
    size = disk_bytes(site, skip)
    pip = run("-m", "pip", "--version")
    subprocess.run(["rm", "-rf", str(venv)], check=True)
    return {"pip": pip.split()[1], "packages": len(dists), "site_packages_bytes": size, "distributions": dists}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extras", default=",".join(EXTRAS), help="comma-separated; base = no extra")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args(argv)
    output.checked_out(ap, a.out)
    with tempfile.TemporaryDirectory(prefix="valve-install-size-") as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work), str(ROOT)],
                       check=True)
        wheel = next(work.glob("valve-*.whl"))
        doc = {"bench": "install_size", "python": platform.python_version(), "platform": platform.platform(),
               "wheel": wheel.name, "left_out": sorted(LEFT_OUT), "extras": {}}
        for extra in a.extras.split(","):
            doc["extras"][extra] = measure(wheel, extra, work)
            print(f"{extra}: {doc['extras'][extra]['packages']} packages, "
                  f"{doc['extras'][extra]['site_packages_bytes'] / 2**20:.0f} MiB", flush=True)
    table = "\n".join(f"{e:10s} {r['packages']:4d} {r['site_packages_bytes'] / 2**20:6.0f} MiB"
                      for e, r in doc["extras"].items())
    output.write(a.out, "install_size", doc, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
