"""Run the operator: kopf with Valve's registry and settings."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from valve.operator.pods import OperatorConfig


def login_from_client(api_client: Any) -> Callable[..., Any]:
    """A kopf login handler that uses the same server and credentials as a kubernetes ApiClient."""
    import kopf

    cfg = api_client.configuration

    def login(**_: Any) -> kopf.ConnectionInfo:
        auth = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
        scheme, token = None, None
        if auth:
            scheme, _, token = auth.partition(" ") if " " in auth else ("Bearer", "", auth)
        return kopf.ConnectionInfo(
            server=cfg.host,
            ca_path=cfg.ssl_ca_cert,
            insecure=not cfg.verify_ssl,
            scheme=scheme,
            token=token,
            certificate_path=cfg.cert_file,
            private_key_path=cfg.key_file,
            default_namespace=None,
        )

    return login


async def run_operator(
    *,
    cfg: OperatorConfig | None = None,
    namespaces: Sequence[str] = (),
    api_client: Any = None,
    login: Callable[..., Any] | None = None,
    resync_seconds: float = 30.0,
    liveness_endpoint: str | None = None,
    peering: str | None = None,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
    webhook: Any = None,
) -> None:
    """Run until stop_flag is set (or a signal arrives). All namespaces unless `namespaces` is given.

    `peering`: None runs standalone (one replica); a name makes replicas coordinate through kopf's
    peering objects (needs kopf's peering CRDs and the extra RBAC in `rbac.PEERING_RULES`).
    """
    import kopf

    from valve.operator import kopfgate
    from valve.operator.handlers import Operator, build_registry, make_settings
    from valve.operator.kube import Kube, load_api_client

    kopfgate.install()  # kopf's index readiness gate, linear instead of quadratic in the objects seen at start

    api_client = api_client or load_api_client()
    op = Operator(Kube(api_client), cfg or OperatorConfig(), resync_seconds)
    settings = make_settings(peering)
    settings.admission.server = webhook
    await kopf.operator(
        registry=build_registry(op, login or login_from_client(api_client), webhook=webhook is not None),
        settings=settings,
        standalone=peering is None,
        peering_name=peering,
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        liveness_endpoint=liveness_endpoint,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def webhook_server(port: int, cert_dir: str | None, addr: str = "0.0.0.0") -> Any:
    """The admission webhook's HTTPS server: the certificate and key from `cert_dir` (tls.crt, tls.key: the
    Secret cert-manager or the chart writes; kopf re-reads them when they change). kopf does not manage the
    MutatingWebhookConfiguration (the chart does), so the operator needs no RBAC on it."""
    import os

    import kopf

    if cert_dir is None:
        raise ValueError("the webhook needs --webhook-cert-dir (tls.crt and tls.key)")
    cert, key = os.path.join(cert_dir, "tls.crt"), os.path.join(cert_dir, "tls.key")
    for path in (cert, key):
        if not os.path.isfile(path):
            raise ValueError(f"no {path}")
    return kopf.WebhookServer(addr=addr, port=port, certfile=cert, pkeyfile=key)
