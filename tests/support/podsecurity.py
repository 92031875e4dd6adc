"""The Pod Security Standards' checks (https://kubernetes.io/docs/concepts/security/pod-security-standards/, as
the PodSecurity admission controller applies them, latest version) over a pod spec: what would refuse a pod in a
namespace labelled ``pod-security.kubernetes.io/enforce=baseline`` or ``=restricted``. Pure functions, for the
tests that hold the chart, the operator's pods and docs/install.md's "PodSecurity" section together.

Not implemented: Windows-only fields beyond hostProcess, and the AppArmor annotations (Valve sets none)."""

from __future__ import annotations

from typing import Any

LEVELS = ("restricted", "baseline", "privileged")  # strictest first

BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for key in ("initContainers", "containers", "ephemeralContainers") for c in spec.get(key) or []]


def _sc(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("securityContext") or {}


def baseline_violations(spec: dict[str, Any]) -> list[str]:
    """Why the Baseline level refuses this pod spec (empty: it allows it)."""
    out: list[str] = []
    pod = _sc(spec)
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            out.append(f"{field}: true")
    out += [f"volume {v.get('name')}: hostPath" for v in spec.get("volumes") or [] if "hostPath" in v]
    if (pod.get("windowsOptions") or {}).get("hostProcess"):
        out.append("pod: windowsOptions.hostProcess")
    out += _seccomp_and_selinux("pod", pod)
    for name, _ in ((s.get("name"), s.get("value")) for s in pod.get("sysctls") or []):
        if name not in SAFE_SYSCTLS:
            out.append(f"pod: sysctl {name}")
    for c in _containers(spec):
        sc, who = _sc(c), f"container {c.get('name')}"
        if sc.get("privileged"):
            out.append(f"{who}: privileged")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{who}: windowsOptions.hostProcess")
        extra = set((sc.get("capabilities") or {}).get("add") or []) - BASELINE_CAPABILITIES
        if extra:
            out.append(f"{who}: capabilities.add {sorted(extra)}")
        out += [f"{who}: hostPort {p['hostPort']}" for p in c.get("ports") or [] if p.get("hostPort")]
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{who}: procMount {sc['procMount']}")
        out += _seccomp_and_selinux(who, sc)
    return out


def _seccomp_and_selinux(who: str, sc: dict[str, Any]) -> list[str]:
    out = []
    if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
        out.append(f"{who}: seccompProfile Unconfined")
    if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        out.append(f"{who}: appArmorProfile Unconfined")
    se = sc.get("seLinuxOptions") or {}
    if se.get("type", "") not in SELINUX_TYPES or se.get("user") or se.get("role"):
        out.append(f"{who}: seLinuxOptions {se}")
    return out


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """Why the Restricted level refuses this pod spec: Baseline's reasons and its own."""
    out = baseline_violations(spec)
    pod = _sc(spec)
    out += [f"volume {v.get('name')}: type {sorted(set(v) - {'name'})}" for v in spec.get("volumes") or []
            if not (set(v) - {"name"}) <= RESTRICTED_VOLUMES and "hostPath" not in v]
    if pod.get("runAsUser") == 0:
        out.append("pod: runAsUser 0")
    for c in _containers(spec):
        sc, who = _sc(c), f"container {c.get('name')}"
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{who}: allowPrivilegeEscalation not false")
        if sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
            out.append(f"{who}: runAsNonRoot not true")
        if sc.get("runAsUser") == 0:
            out.append(f"{who}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{who}: seccompProfile {seccomp or 'unset'}")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{who}: capabilities.drop lacks ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{who}: capabilities.add {sorted(set(caps['add']) - {'NET_BIND_SERVICE'})}")
    return out


def violations(spec: dict[str, Any], level: str) -> list[str]:
    if level == "privileged":
        return []
    return restricted_violations(spec) if level == "restricted" else baseline_violations(spec)


def strictest_level(spec: dict[str, Any]) -> str:
    """The strictest level whose enforcement admits this pod spec."""
    return next(level for level in LEVELS if not violations(spec, level))
