"""The few API calls the operator makes itself (kopf does the watching), through the kubernetes client."""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Any

from valve import __version__, kubeclient
from valve.api import colocation as c
from valve.api.contract import EVENT_COMPONENT

log = logging.getLogger(__name__)
USER_AGENT = f"valve-operator/{__version__}"
JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"


def load_api_client(host: str | None = None):
    """An ApiClient from in-cluster config, else KUBECONFIG (or a bare host, for tests)."""
    return kubeclient.load_api_client(host, USER_AGENT)


class Kube:
    """Pods, pair status and events. Blocking client calls run in threads."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    async def create_pod(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        """Create a pod and return it as stored; None if one with that name exists already."""
        from kubernetes.client.exceptions import ApiException

        try:
            created = await asyncio.to_thread(self.core.create_namespaced_pod, pod["metadata"]["namespace"],
                                              pod, _content_type=JSON)
        except ApiException as e:
            if e.status == 409:
                return None
            raise
        return self.core.api_client.sanitize_for_serialization(created)

    async def delete_pod(self, namespace: str, name: str, uid: str) -> bool:
        """Delete that pod only (uid precondition): a newer pod with the same name survives."""
        from kubernetes.client.exceptions import ApiException

        body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}} if uid else None
        try:
            await asyncio.to_thread(self.core.delete_namespaced_pod, name, namespace, body=body,
                                    _content_type=JSON)
            return True
        except ApiException as e:
            if e.status not in (404, 409):
                raise
            return False

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch the status subresource (None values remove fields)."""
        await asyncio.to_thread(
            self.custom.patch_namespaced_custom_object_status,
            c.GROUP, c.VERSION, namespace, c.PLURAL, name, {"status": status},
            _content_type=MERGE_PATCH,
        )

    async def post_event(self, pair: dict[str, Any], type: str, reason: str, message: str) -> None:
        """A core/v1 Event on the pair; failures are logged, never raised."""
        meta = pair["metadata"]
        now = datetime.datetime.now(datetime.UTC).isoformat()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": c.API_VERSION, "kind": c.KIND, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "valve-operator"},
            "reportingComponent": EVENT_COMPONENT,
            "reportingInstance": "valve-operator",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await asyncio.to_thread(self.core.create_namespaced_event, meta["namespace"], event,
                                    _content_type=JSON)
        except Exception as e:  # events are auxiliary
            log.warning("could not post event %s/%s on %s: %s", type, reason, meta["name"], e)
