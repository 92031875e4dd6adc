"""``valve::gate``: the gate as a PyTorch custom op, so compiled and graph-captured models keep their gates.

``torch.ops.valve.gate_(x, gate_id)`` runs ``Gate.gate()`` of the registered Gate ``gate_id`` and returns nothing.
It is declared to mutate ``x`` (it does not touch the data): that makes it an ordered side effect on the tensor
the gated module reads, so Dynamo keeps it in the graph (no graph break, ``fullgraph=True`` works) and neither
Dynamo nor Inductor moves it past the kernels that read ``x``. (Inductor drops it, as dead code, if nothing reads
``x`` after it: gate modules that use their input, as attention and MLP blocks do.) Custom ops are opaque: the Python
implementation runs each time the compiled graph runs, so hooks, queue-ahead and the lease still apply; under
CUDA-graph capture (``mode="reduce-overhead"``, ``torch.cuda.graph``) ``Gate.gate()`` sees the capture and
records only the wait on the live gate word, which every replay then performs. Imports torch: loaded lazily by
``attach``.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import torch

Gate = Any  # a valve.runtime.gate.offline.Gate; not imported: offline imports this module (in attach)

_gates: dict[int, Gate] = {}  # op argument -> Gate (ops take plain values, not Python objects)
_ids = itertools.count(1)
_lock = threading.Lock()


def register(gate: Gate) -> int:
    """The op argument that names ``gate`` (the same number for the same Gate)."""
    with _lock:
        for gid, g in _gates.items():
            if g is gate:
                return gid
        gid = next(_ids)
        _gates[gid] = gate
        return gid


@torch.library.custom_op("valve::gate_", mutates_args=("x",))
def gate_(x: torch.Tensor, gate_id: int) -> None:
    """One sub-layer boundary of Gate ``gate_id`` before the work that reads ``x``."""
    g = _gates.get(gate_id)
    if g is None:
        raise RuntimeError(f"valve::gate_: no Gate registered as {gate_id} in this process")
    g.gate()


@gate_.register_fake
def _(x: torch.Tensor, gate_id: int) -> None:
    return None



def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The tensor a gated module reads first (its hidden states), positional or keyword."""
    for v in itertools.chain(args, kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    return None
