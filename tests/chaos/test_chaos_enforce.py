"""Chaos: a tenant that skips the gate, on the simulated GPU (the arbiter's clock is the simulator's), and a
well-behaved one over many gate cycles. Records how fast the skipping tenant is caught after each closure."""

from __future__ import annotations

from sim_tenants import SimTenants

from valve.runtime.arbiter.policy import MS
from valve.stats import percentile

GRACE_MS, PERIOD_MS = 10.0, 2.0


def test_gate_skipping_tenant_caught_after_every_long_closure_and_a_gated_one_never(figures):
    rogue = SimTenants("skip", mode="pause", seed=11, grace_ms=GRACE_MS, period_ms=PERIOD_MS)
    rogue.gpu.run_until(rogue.random_bursts(60) + 100 * MS)
    closures = [t for t, a in rogue.enforce.events if a.kind == "violation"]
    starts = [b for b, _ in rogue.bursts]
    delays = [(v - max(s for s in starts if s <= v)) / MS for v in closures]
    assert len(delays) >= 40 and max(delays) <= GRACE_MS + 3 * PERIOD_MS + 1
    kinds = [a.kind for _, a in rogue.enforce.events]
    assert kinds.count("pause") == kinds.count("resume") == len(delays) and not rogue.paused

    good = SimTenants("gated", mode="pause", seed=11, grace_ms=GRACE_MS, period_ms=PERIOD_MS)
    good.gpu.run_until(good.random_bursts(300) + 100 * MS)
    assert good.violations() == [] and good.pauses == []
    figures.update(grace_ms=GRACE_MS, sample_period_ms=PERIOD_MS, skipping_bursts=len(rogue.bursts),
                   caught=len(delays), detect_p50_ms=round(percentile(delays, 50), 1),
                   detect_max_ms=round(max(delays), 1), gated_closures=good.arbiter.policy.preemptions,
                   gated_false_positives=len(good.violations()))
