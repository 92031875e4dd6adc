"""Checks shared by the engine test files: a paged engine against its model's unpaged forward, and a run that
collects every sampled token's logits (on sys.path through pytest's pythonpath setting; needs torch)."""

from __future__ import annotations

import torch


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def check_against_reference(model, engine, prompts, max_tokens):
    """Run ``prompts`` through ``engine`` (``keep_logits=True``): every sampled row's logits match
    ``model.forward_reference`` over the sequence so far, and each greedy token is the reference argmax."""
    seqs = [engine.add_request(i, p, max_tokens) for i, p in enumerate(prompts)]
    seen = {i: [] for i in range(len(prompts))}
    while engine.has_work():
        res = engine.step()
        for seq, _tok in res.tokens:
            seen[seq.req_id].append(engine.last_logits[seq.req_id])
    for seq in seqs:
        assert len(seq.output) == max_tokens
        full = torch.tensor([seq.tokens[:-1]])
        ref = model.forward_reference(full)[0]
        n_prompt = len(seq.prompt)
        for j, got in enumerate(seen[seq.req_id]):
            want = ref[n_prompt - 1 + j]
            assert rel_err(got, want) < 1e-4, (seq.req_id, j)
            # greedy: the sampled token is the reference argmax
            assert seq.output[j] == int(want.argmax())


def run_engine(engine, prompts, max_tokens):
    """Prompt i with max_tokens[i] tokens, to completion -> ({id: output}, {id: [logits of each sampled row]})."""
    for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True)):
        engine.add_request(i, p, m)
    logits, outputs = {}, {}
    while engine.has_work():
        res = engine.step()
        for seq, _tok in res.tokens:
            logits.setdefault(seq.req_id, []).append(engine.last_logits[seq.req_id])
        for seq in res.finished:
            outputs[seq.req_id] = list(seq.output)
    return outputs, logits
