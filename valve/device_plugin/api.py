"""Constants of the kubelet device plugin API v1beta1 (k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1)."""

from __future__ import annotations

from valve.device_plugin.proto import deviceplugin_pb2 as pb
from valve.device_plugin.proto import deviceplugin_pb2_grpc as pb_grpc

VERSION = "v1beta1"
DEVICE_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
KUBELET_SOCKET = "kubelet.sock"
POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the trailing NUL

__all__ = [
    "DEVICE_PLUGIN_DIR",
    "HEALTHY",
    "KUBELET_SOCKET",
    "POD_RESOURCES_SOCKET",
    "UNHEALTHY",
    "UNIX_PATH_MAX",
    "VERSION",
    "pb",
    "pb_grpc",
]
