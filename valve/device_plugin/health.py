"""Device health: which XID errors make a GPU unhealthy, and how backend events change health.

Follows the NVIDIA k8s-device-plugin convention: XIDs caused by applications (13, 31, 43, 45, 68, 109)
leave the GPU healthy; every other XID marks it unhealthy until the plugin restarts. `disable` adds XIDs to
ignore ("all" ignores every XID); `enable` forces XIDs to count even if ignored by default ("all" makes
every XID count). The CLI reads both from DP_DISABLE_HEALTHCHECKS / DP_ENABLE_HEALTHCHECKS too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Application errors: the GPU stays usable (docs.nvidia.com/deploy/xid-errors).
DEFAULT_IGNORED_XIDS = frozenset(
    {
        13,  # graphics engine exception
        31,  # GPU memory page fault
        43,  # GPU stopped processing
        45,  # preemptive cleanup, due to previous errors
        68,  # video processor exception
        109,  # context switch timeout
    }
)
ALL = "all"


def parse_xids(text: str | None) -> tuple[bool, frozenset[int]]:
    """Parse a comma-separated XID list; returns (all, ids). "all" or "xids" means every XID."""
    ids: set[int] = set()
    for part in (text or "").lower().split(","):
        part = part.strip()
        if not part:
            continue
        if part in ("all", "xids"):
            return True, frozenset()
        try:
            ids.add(int(part))
        except ValueError:
            raise ValueError(f"bad XID {part!r}: use integers separated by commas, or 'all'") from None
    return False, frozenset(ids)


@dataclass(frozen=True)
class XidPolicy:
    ignored: frozenset[int] = DEFAULT_IGNORED_XIDS
    ignore_all: bool = False
    enabled: frozenset[int] = frozenset()
    enable_all: bool = False

    @classmethod
    def from_strings(cls, disable: str | None = None, enable: str | None = None) -> XidPolicy:
        ignore_all, disabled = parse_xids(disable)
        enable_all, enabled = parse_xids(enable)
        return cls(DEFAULT_IGNORED_XIDS | disabled, ignore_all, enabled, enable_all)

    @property
    def watches_xids(self) -> bool:
        """False when no XID can ever mark a GPU unhealthy (XID watching may be skipped)."""
        return not self.ignore_all or self.enable_all or bool(self.enabled)

    def is_critical(self, xid: int) -> bool:
        if self.enable_all or xid in self.enabled:
            return True
        if self.ignore_all:
            return False
        return xid not in self.ignored


@dataclass(frozen=True)
class DeviceEvent:
    """Something a backend saw. uuid None means every GPU (e.g. the NVML event wait failed)."""

    kind: Literal["xid", "lost", "health"]
    uuid: str | None
    xid: int = 0
    healthy: bool = False
    detail: str = ""


@dataclass(frozen=True)
class HealthChange:
    uuid: str | None
    healthy: bool
    reason: str = field(default="")


def health_change(event: DeviceEvent, policy: XidPolicy) -> HealthChange | None:
    """The health change an event causes under the policy, or None if it changes nothing."""
    if event.kind == "xid":
        if not policy.is_critical(event.xid):
            return None
        return HealthChange(event.uuid, False, f"critical XID {event.xid}")
    if event.kind == "lost":
        return HealthChange(event.uuid, False, event.detail or "device lost")
    return HealthChange(event.uuid, event.healthy, event.detail or "health set")
