"""Settings of the device plugin (the CLI flags map one to one onto these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from valve.device_plugin.api import DEVICE_PLUGIN_DIR, POD_RESOURCES_SOCKET
from valve.device_plugin.health import XidPolicy

ONLINE_RESOURCE = "valve.io/online-gpu"
OFFLINE_RESOURCE = "valve.io/offline-gpu"
RUNTIME_ROOT = "/var/run/valve"
STATE_DIR = "/var/lib/valve/device-plugin"
METRICS_PORT = 9402


@dataclass
class PluginConfig:
    device_plugin_dir: Path = Path(DEVICE_PLUGIN_DIR)
    online_resource: str = ONLINE_RESOURCE
    offline_resource: str = OFFLINE_RESOURCE
    runtime_root: Path = Path(RUNTIME_ROOT)
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

    @property
    def kubelet_socket(self) -> Path:
        from valve.device_plugin.api import KUBELET_SOCKET

        return self.device_plugin_dir / KUBELET_SOCKET

    @property
    def roles(self) -> dict[str, str]:
        """Role -> resource name."""
        return {"online": self.online_resource, "offline": self.offline_resource}

    @staticmethod
    def endpoint(resource: str) -> str:
        """Socket file name for a resource: valve.io/online-gpu -> valve.io-online-gpu.sock."""
        return resource.replace("/", "-") + ".sock"
