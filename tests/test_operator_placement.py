"""Placement: hand-checked cases and a property test over random clusters.

The property: whatever the cluster looks like (GPUs with an online tenant, an offline tenant, both or none,
GPU reported or not), placing pairs and then letting each node's device plugin put every new pair on a GPU
with both slots free never puts two online or two offline tenants on one GPU.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from valve.operator.capacity import NodeView, build_nodes
from valve.operator.placement import Node, PairRequest, place
from valve.operator.pods import PodView


def test_best_fit_is_deterministic():
    nodes = [Node("big", 4, 4), Node("small", 1, 1), Node("busy", 2, 2, 2, 2)]
    out = place([PairRequest("ns/a"), PairRequest("ns/b"), PairRequest("ns/c")], nodes)
    assert [p.node for p in out] == ["small", "big", "big"]


def test_no_fit_and_unschedulable():
    out = place([PairRequest("ns/a")], [Node("off", 2, 2, schedulable=False), Node("full", 1, 1, 1, 1)])
    assert out[0].node is None and "no node" in out[0].reason


def test_lower_load_wins_between_equal_nodes():
    nodes = [Node("hot", 2, 2, gpu_load=(0.9, 0.9)), Node("cool", 2, 2, gpu_load=(0.1, 0.1))]
    assert place([PairRequest("ns/a")], nodes)[0].node == "cool"


def test_single_tenants_take_their_gpus():
    # 3 GPUs: one online-only, one offline-only: one GPU is left with both slots free.
    assert Node("n", 3, 3, online_used=1, offline_used=1, paired=0).free_pairs == 1
    assert Node("n", 3, 3, online_used=1, offline_used=1, paired=1).free_pairs == 2


gpu_state = st.sampled_from(["free", "online", "offline", "both"])
node_gpus = st.lists(gpu_state, min_size=0, max_size=6)


def _pods(node: str, gpus: list[str], reported: bool) -> list[PodView]:
    out = []
    for i, state in enumerate(gpus):
        for role in ("online", "offline"):
            if state in (role, "both"):
                out.append(PodView(
                    name=f"{node}-{i}-{role}", uid=f"{node}-{i}-{role}", role=role, phase="Running", ready=True,
                    node=node, target=node, gpu=f"{node}-gpu{i}" if reported or state != "both" else None,
                    deleting=False, hash=None, online=role == "online", offline=role == "offline"))
    return out


@settings(max_examples=300, deadline=None)
@given(
    cluster=st.lists(st.tuples(node_gpus, st.booleans(), st.booleans()), min_size=1, max_size=6),
    n_pairs=st.integers(0, 12),
)
def test_placement_never_doubles_a_slot_on_a_gpu(cluster, n_pairs):
    views, pods, gpus = [], [], {}
    for i, (states, ready, reported) in enumerate(cluster):
        name = f"n{i}"
        views.append(NodeView(name, len(states), len(states), ready))
        pods += _pods(name, states, reported)
        gpus[name] = list(states)

    result = place([PairRequest(f"ns/p{k}") for k in range(n_pairs)], build_nodes(views, pods))
    assert len(result) == n_pairs

    # Each node's device plugin puts each new pair on a GPU with both slots free (preferred allocation).
    for p in result:
        if p.node is None:
            continue
        assert views[int(p.node[1:])].schedulable
        states = gpus[p.node]
        assert "free" in states, f"{p.key} placed on {p.node} without a GPU free for both tenants: {states}"
        states[states.index("free")] = "both"
    # A pair is refused only when no schedulable node has a free GPU left.
    if any(p.node is None for p in result):
        assert all("free" not in gpus[v.name] for v in views if v.schedulable)
