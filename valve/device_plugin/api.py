"""Constants of the kubelet device plugin API v1beta1 (k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1).

The kubelet's paths and socket names are in valve.api.contract."""

from __future__ import annotations

from valve.device_plugin.proto import deviceplugin_pb2 as pb
from valve.device_plugin.proto import deviceplugin_pb2_grpc as pb_grpc

VERSION = "v1beta1"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the trailing NUL

__all__ = [
    "HEALTHY",
    "UNHEALTHY",
    "UNIX_PATH_MAX",
    "VERSION",
    "pb",
    "pb_grpc",
]
