"""GPU check: the CUDA gate follows a control block that was replaced under it (arbiter restart on a new file).

    python3 bench/gate_reattach.py [--out DIR]

A Gate on the CUDA backend holds work while the gate word is closed and releases it when opened; then the file
is replaced by a new one (a new inode, as an arbiter re-creating it does). The client must notice at a later
boundary, map the new file, register its page with CUDA again, and wait on the new word: closed there, the work
is held; opened, released. JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from valve.runtime.control import GATE_CLOSED, GATE_OPEN, ControlBlock  # noqa: E402


def held_then_released(gate, block: ControlBlock, x) -> dict:
    """Close the word in `block`, pass one boundary and add 1; see it held, open the word, see it released."""
    import torch

    torch.cuda.synchronize()
    x.zero_()
    block.fields.gate = GATE_CLOSED
    s = torch.cuda.current_stream()
    gate.gate(s)
    x.add_(1)
    ev = torch.cuda.Event()
    ev.record(s)
    time.sleep(0.1)  # the GPU had time to run it if nothing held it
    held = not ev.query()
    block.fields.gate = GATE_OPEN
    ev.synchronize()
    return {"held_while_closed": held, "released": float(x.item()) == 1.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/gate_reattach")
    args = ap.parse_args(argv)
    from bench.harness.output import checked_out

    checked_out(ap, args.out)
    import torch

    from valve.runtime.gate.cuda import CudaGateBackend
    from valve.runtime.gate.offline import Gate

    path = Path(tempfile.mkdtemp(dir="/dev/shm")) / "GPU-reattach" / "control"
    arbiter = ControlBlock.create(path)
    blocks = {"now": arbiter}
    stop = threading.Event()

    def heartbeat():  # a live arbiter: the lease must not open the gate
        while not stop.is_set():
            blocks["now"].fields.heartbeat_ns = time.monotonic_ns()
            stop.wait(0.005)

    threading.Thread(target=heartbeat, daemon=True).start()
    client = ControlBlock.open(path)
    gate = Gate(client, backend=CudaGateBackend(client), queue_ahead=64, lease_ms=60_000)
    x = torch.zeros(1, device="cuda")
    gate.gate(torch.cuda.current_stream())  # an open pass first: loads the kernels
    x.add_(1)
    torch.cuda.synchronize()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "before": held_then_released(gate, arbiter, x)}
    blocks["now"] = ControlBlock.create(path)  # the arbiter re-creates the file: a new inode
    time.sleep(0.25)  # past the client's inode check interval
    res["after_replace"] = held_then_released(gate, blocks["now"], x)
    res["client_generation"] = client.generation
    res["ungated_boundaries"] = gate.ungated
    stop.set()
    gate.close()
    ok = all(res[k]["held_while_closed"] and res[k]["released"] for k in ("before", "after_replace"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gate_reattach.json").write_text(json.dumps(res, indent=2))
    print(f"[gate_reattach] {'OK' if ok else 'NOT OK'}: {json.dumps(res)}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
