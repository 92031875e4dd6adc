"""The kubernetes client configuration shared by the operator and the device plugin."""

from __future__ import annotations


def load_api_client(host: str | None = None, user_agent: str | None = None):
    """An ApiClient from in-cluster config, else KUBECONFIG (or a bare host, for tests)."""
    from kubernetes import client, config

    if host is not None:
        cfg = client.Configuration(host=host)
    else:
        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            config.load_kube_config(client_configuration=cfg)
    api = client.ApiClient(cfg)
    if user_agent:
        api.user_agent = user_agent
    return api
