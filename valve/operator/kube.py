"""The few API calls the operator makes itself (kopf does the watching), through the kubernetes client."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from typing import Any

from valve import __version__, kubeclient
from valve.api import colocation as c
from valve.api import dra
from valve.api.contract import EVENT_COMPONENT

log = logging.getLogger(__name__)
USER_AGENT = f"valve-operator/{__version__}"
JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"


def load_api_client(host: str | None = None):
    """An ApiClient from in-cluster config, else KUBECONFIG (or a bare host, for tests)."""
    return kubeclient.load_api_client(host, USER_AGENT)


class CreateRefused(Exception):
    """The API server refused a pod create (403 from admission such as PodSecurity, 422 invalid, ...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


def api_message(e: Any) -> str:
    """The Status message of an ApiException, else its reason."""
    try:
        return json.loads(e.body).get("message") or str(e.reason)
    except (TypeError, ValueError, AttributeError):
        return str(e.reason)


class Kube:
    """Pods, pair status and events, as plain JSON through a kubernetes ApiClient (its configuration, auth and
    connection pool, not its typed API classes). Blocking client calls run in threads."""

    def __init__(self, api_client: Any) -> None:
        self.client = api_client

    def send(self, method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None,
             content_type: str = JSON) -> Any:
        """One request with a plain JSON body, answered with the plain JSON (blocking; run it in a thread).

        The client's typed methods validate a dict into its pydantic models, dump it back for the request and
        build models from the answer (more CPU per pod create than the rest of a pair's reconcile), and importing
        them costs a second at start. Errors raise ApiException as the typed methods do."""
        from kubernetes.client.exceptions import ApiException

        client = self.client
        request = client.param_serialize(method=method, resource_path=path, query_params=query or [],
                                         header_params={"Content-Type": content_type, "Accept": JSON}, body=body,
                                         auth_settings=["BearerToken"])
        resp = client.call_api(*request)
        resp.read()
        if not 200 <= resp.status <= 299:
            raise ApiException.from_response(http_resp=resp, body=None, data=None)
        return json.loads(resp.data) if resp.data else None

    async def create_pod(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        """Create a pod and return it as stored; None if one with that name exists already.

        Strict field validation: a field the API server does not know fails the create instead of being
        dropped. Other refusals raise `CreateRefused` with the API's message."""
        from kubernetes.client.exceptions import ApiException

        try:
            return await asyncio.to_thread(self.send, "POST", f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods",
                                           pod, [("fieldValidation", "Strict")])
        except ApiException as e:
            if e.status == 409:
                return None
            if e.status is not None and 400 <= e.status < 500:
                raise CreateRefused(e.status, api_message(e)) from None
            raise

    async def get_claim(self, namespace: str, name: str) -> dict[str, Any] | None:
        """placement dra: the pair's ResourceClaim, None if there is none."""
        return await self.get(f"/apis/{dra.RESOURCE_GROUP}/{dra.RESOURCE_VERSION}/namespaces/{namespace}"
                              f"/resourceclaims/{name}")

    async def get(self, path: str) -> dict[str, Any] | None:
        """GET an object, None if there is none."""
        from kubernetes.client.exceptions import ApiException

        try:
            return await asyncio.to_thread(self.send, "GET", path)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    async def create_claim(self, claim: dict[str, Any]) -> None:
        """placement dra: create the pair's ResourceClaim (one that exists already is fine); other refusals
        raise `CreateRefused` with the API's message (e.g. a cluster without resource.k8s.io/v1)."""
        from kubernetes.client.exceptions import ApiException

        try:
            await asyncio.to_thread(self.send, "POST", f"/apis/{dra.RESOURCE_GROUP}/{dra.RESOURCE_VERSION}"
                                    f"/namespaces/{claim['metadata']['namespace']}/resourceclaims", claim)
        except ApiException as e:
            if e.status == 409:
                return
            if e.status is not None and 400 <= e.status < 500:
                raise CreateRefused(e.status, api_message(e)) from None
            raise

    async def pair_exists(self, namespace: str, name: str, uid: str | None) -> bool:
        """Whether that pair (same uid) is still there and not being deleted: asked before recreating a pod,
        since its pods' deletions may be seen before the pair's."""
        pair = await self.get(f"/apis/{c.GROUP}/{c.VERSION}/namespaces/{namespace}/{c.PLURAL}/{name}")
        if pair is None:
            return False
        meta = pair.get("metadata") or {}
        return (uid is None or meta.get("uid") == uid) and not meta.get("deletionTimestamp")

    async def delete_pod(self, namespace: str, name: str, uid: str) -> bool:
        """Delete that pod only (uid precondition): a newer pod with the same name survives."""
        from kubernetes.client.exceptions import ApiException

        body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}} if uid else None
        try:
            await asyncio.to_thread(self.send, "DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", body)
            return True
        except ApiException as e:
            if e.status not in (404, 409):
                raise
            return False

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any], plural: str = c.PLURAL) -> None:
        """Merge-patch the status subresource (None values remove fields)."""
        await asyncio.to_thread(self.send, "PATCH", f"/apis/{c.GROUP}/{c.VERSION}/namespaces/{namespace}/{plural}/{name}"
                                "/status", {"status": status}, content_type=MERGE_PATCH)

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A Job (a policy's offline workload), None if there is none."""
        return await self.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")

    async def post_event(self, pair: dict[str, Any], type: str, reason: str, message: str) -> None:
        """A core/v1 Event on the pair; failures are logged, never raised."""
        meta = pair["metadata"]
        now = datetime.datetime.now(datetime.UTC).isoformat()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": pair.get("apiVersion") or c.API_VERSION,
                               "kind": pair.get("kind") or c.KIND, "name": meta["name"],
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
            await asyncio.to_thread(self.send, "POST", f"/api/v1/namespaces/{meta['namespace']}/events", event)
        except Exception as e:  # events are auxiliary
            log.warning("could not post event %s/%s on %s: %s", type, reason, meta["name"], e)
