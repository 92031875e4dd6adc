"""Runtime options shared by the operator (CRD `spec.runtime`), the arbiter and the offline client."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

# Upper bounds: beyond them a value is a typo, and byte counts must fit the control block's u64 words
MAX_BYTES = 1 << 40  # 1 TiB: more than any one GPU's memory
MAX_RATE = 10_000.0  # per second


class EvictionPolicy(StrEnum):
    selective = "selective"
    fifo = "fifo"


class GateGranularity(StrEnum):
    block = "block"
    linear = "linear"


class ReservePolicy(BaseModel):
    """How much free GPU memory the arbiter keeps for online bursts."""

    model_config = ConfigDict(extra="forbid")

    min_bytes: int = Field(1 << 30, ge=0, le=MAX_BYTES, description="Reserve floor in bytes.")
    margin_ratio: float = Field(0.1, ge=0.0, le=4.0, description="Margin over the online recent peak.")
    decay_seconds: float = Field(60.0, gt=0.0, le=86_400.0, description="Half-life of the recent-peak tracker.")
    hysteresis_bytes: int = Field(512 << 20, ge=0, le=MAX_BYTES,
                                  description="Free memory above reserve before offline may grow.")


class ReclaimLimits(BaseModel):
    """Rate limits on reclaim (shrink) and regrow requests sent to the offline client."""

    model_config = ConfigDict(extra="forbid")

    bytes_per_second: int = Field(64 << 30, gt=0, le=MAX_BYTES)
    requests_per_second: float = Field(50.0, gt=0.0, le=MAX_RATE)
    grow_bytes_per_second: int = Field(8 << 30, gt=0, le=MAX_BYTES)


class NearOnlinePolicy(BaseModel):
    """Smaller offline steps while online is active or was within ``window_ms``: a request that arrives in a
    burst then finds less offline work queued or running ahead of it. Costs offline throughput (smaller batches)."""

    model_config = ConfigDict(extra="forbid")

    # the default: on an H200 it lowered online TTFT p99 in every repeat of llama-1b and llama-8b at no harvest cost
    # (docs/engine.md, "Settings sweep")
    window_ms: float = Field(200.0, ge=0.0, le=60_000.0,
                             description="How long after the gate last reopened offline steps stay small; 0: off.")
    max_batch_tokens: int = Field(512, ge=1, le=1 << 20, description="The offline step's token budget meanwhile.")


class RuntimeSpec(BaseModel):
    """Arbiter and client settings; the CRD's `spec.runtime` and the arbiter's config file."""

    model_config = ConfigDict(extra="forbid")

    idle_hysteresis_ms: float = Field(5.0, ge=0.0, le=10_000.0, description="Online idleness before the gate reopens.")
    max_preemptions_per_second: float = Field(100.0, gt=0.0, le=MAX_RATE,
                                              description="Hard cap on gate closures per second.")
    # below 10 ms a busy arbiter looks dead (offline reopens mid-request); above 60 s offline stalls on a dead one
    heartbeat_lease_ms: float = Field(1000.0, ge=10.0, le=60_000.0,
                                      description="Stale arbiter heartbeat after which offline opens its gate.")
    queue_ahead: int = Field(2, ge=1, le=64, description="Sub-layers the offline CPU may enqueue past the last gate.")
    gate_granularity: GateGranularity = Field(
        GateGranularity.block,
        description="Where the offline gate goes (attach()'s default): before each attention and MLP block, or "
        "before each linear layer (a shorter wait for online, less offline throughput: docs/preemption.md).")
    near_online: NearOnlinePolicy = Field(default_factory=NearOnlinePolicy)
    reserve: ReservePolicy = Field(default_factory=ReservePolicy)
    reclaim: ReclaimLimits = Field(default_factory=ReclaimLimits)
    eviction_policy: EvictionPolicy = EvictionPolicy.selective
