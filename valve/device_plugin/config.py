"""Settings of the device plugin (the CLI flags map one to one onto these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from valve.api.contract import (
    DEVICE_PLUGIN_DIR,
    KUBELET_SOCKET,
    OFFLINE,
    OFFLINE_RESOURCE,
    ONLINE,
    ONLINE_RESOURCE,
    POD_RESOURCES_SOCKET,
    RUNTIME_DIR,
)
from valve.device_plugin.health import XidPolicy

STATE_DIR = "/var/lib/valve/device-plugin"
METRICS_PORT = 9402


@dataclass
class PluginConfig:
    device_plugin_dir: Path = Path(DEVICE_PLUGIN_DIR)
    online_resource: str = ONLINE_RESOURCE
    offline_resource: str = OFFLINE_RESOURCE
    runtime_root: Path = Path(RUNTIME_DIR)
    runtime_dir_mode: int = 0o700
    # Not under device_plugin_dir: the kubelet deletes everything there but its checkpoint when it starts.
    state_dir: Path = Path(STATE_DIR)
    pod_resources_socket: Path | None = Path(POD_RESOURCES_SOCKET)
    xid_policy: XidPolicy = field(default_factory=XidPolicy)
    metrics_port: int | None = METRICS_PORT  # None: no metrics endpoint; 0: any free port
    metrics_addr: str = "0.0.0.0"
    metrics_interval_s: float = 5.0
    watch_interval_s: float = 0.25  # how often kubelet.sock and our sockets are checked
    register_retry_s: float = 1.0
    # Pod annotation (annotate.py): needs the PodResources socket and API access (get/patch pods).
    annotate: bool = False
    node_name: str | None = None  # NODE_NAME: pods bound elsewhere are left alone
    annotate_interval_s: float = 2.0
    # The pid map (pidmap.py): needs the host's pid namespace (hostPID) to read NVML's host pids in proc_root.
    pid_map: bool = False
    pid_map_interval_s: float = 1.0
    proc_root: Path = Path("/proc")

    @property
    def kubelet_socket(self) -> Path:
        return self.device_plugin_dir / KUBELET_SOCKET

    @property
    def roles(self) -> dict[str, str]:
        """Role -> resource name."""
        return {ONLINE: self.online_resource, OFFLINE: self.offline_resource}
