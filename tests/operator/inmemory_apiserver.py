"""An in-memory Kubernetes API server on loopback, for the handler tests of this tier.

It speaks the same HTTP protocol as kube-apiserver for what kopf and the kubernetes client use here: discovery,
list/watch with resource versions, create, get, merge-patch, delete with preconditions, the status subresource
(status ignored on create and on main-resource patches, generation bumped on spec changes), finalizers, and
owner-reference garbage collection. The cluster tier (tests/cluster) runs the same handler tests against a real
kube-apiserver; nothing in the operator knows which one it talks to.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from aiohttp import web


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    has_status: bool
    short_names: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


KINDS = (
    Kind("", "v1", "namespaces", "Namespace", False, True),
    Kind("", "v1", "configmaps", "ConfigMap", True, False),
    Kind("", "v1", "events", "Event", True, False),
    Kind("", "v1", "pods", "Pod", True, True),
    Kind("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False, True),
    Kind("jobset.x-k8s.io", "v1alpha2", "jobsets", "JobSet", True, True),
    Kind("batch", "v1", "jobs", "Job", True, True),
    Kind("simpo.dev", "v1alpha1", "simpointerleavejobs", "SimpoInterleaveJob", True, True, ("sij",)),
)
VERBS = ["create", "delete", "get", "list", "patch", "watch"]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    return web.json_response(body, status=code)


def _matches(obj: dict[str, Any], selector: str) -> bool:
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, selector.split(",")):
        if term.startswith("!"):
            if term[1:] in labels:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term not in labels:
            return False
    return True


class ApiServer:
    def __init__(self) -> None:
        self.objects: dict[tuple[Kind, Optional[str], str], dict[str, Any]] = {}
        self.history: list[tuple[int, Kind, Optional[str], str, dict[str, Any]]] = []
        self.watchers: list[tuple[Kind, Optional[str], asyncio.Queue]] = []
        self.revision = 1
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self._runner: Optional[web.AppRunner] = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    # ---- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> "ApiServer":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(timeout=30)
        return self

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        async def shutdown() -> None:
            for _, _, queue in self.watchers:
                queue.put_nowait(None)
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)

    def kubeconfig(self) -> str:
        return json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        })

    # ---- routing --------------------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if parts == ["version"]:
            return web.json_response({"major": "1", "minor": "36", "gitVersion": "v1.36.0-inmemory"})
        if parts == ["api"]:
            return web.json_response({"kind": "APIVersions", "versions": ["v1"]})
        if parts == ["apis"]:
            return web.json_response(self._groups())
        if parts[:1] == ["api"] and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return _status(404, "NotFound", f"no route {request.path}")
        if not rest:
            return web.json_response(self._resource_list(group, version))
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        kind = next((k for k in KINDS if (k.group, k.version, k.plural) == (group, version, rest[0])), None)
        if kind is None:
            return _status(404, "NotFound", f"the server could not find the requested resource {request.path}")
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        if subresource not in (None, "status") or (subresource == "status" and not kind.has_status):
            return _status(404, "NotFound", f"no subresource {subresource}")
        if name is None:
            if request.method == "GET":
                if request.query.get("watch") in ("true", "1"):
                    return await self._watch(request, kind, namespace)
                return web.json_response(self._list(kind, namespace, request.query.get("labelSelector", "")))
            if request.method == "POST":
                return self._create(kind, namespace, await request.json())
        else:
            key = (kind, namespace, name)
            if request.method == "GET":
                obj = self.objects.get(key)
                return web.json_response(obj) if obj else _status(404, "NotFound", f'{kind.plural} "{name}" not found')
            if request.method == "PATCH":
                content_type = request.headers.get("Content-Type", "")
                if content_type != "application/merge-patch+json":
                    return _status(415, "UnsupportedMediaType", f"patch type {content_type} not served here")
                return self._patch(key, await request.json(), status_only=subresource == "status")
            if request.method == "DELETE":
                text = await request.text()
                body = json.loads(text) if text else {}
                return self._delete(key, (body.get("preconditions") or {}).get("uid"))
        return _status(405, "MethodNotAllowed", f"{request.method} {request.path}")

    def _groups(self) -> dict[str, Any]:
        groups = sorted({(k.group, k.version) for k in KINDS if k.group})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": group, "versions": [{"groupVersion": f"{group}/{version}", "version": version}],
             "preferredVersion": {"groupVersion": f"{group}/{version}", "version": version}}
            for group, version in groups]}

    def _resource_list(self, group: str, version: str) -> dict[str, Any]:
        resources = []
        for k in KINDS:
            if (k.group, k.version) != (group, version):
                continue
            resources.append({"name": k.plural, "singularName": k.kind.lower(), "namespaced": k.namespaced,
                              "kind": k.kind, "verbs": VERBS, "shortNames": list(k.short_names)})
            if k.has_status:
                resources.append({"name": f"{k.plural}/status", "singularName": "", "namespaced": k.namespaced,
                                  "kind": k.kind, "verbs": ["get", "patch"]})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version, "resources": resources}

    # ---- storage --------------------------------------------------------------------------------------------

    def _record(self, kind: Kind, namespace: Optional[str], event: str, obj: dict[str, Any]) -> None:
        snapshot = copy.deepcopy(obj)
        self.history.append((int(obj["metadata"]["resourceVersion"]), kind, namespace, event, snapshot))
        for watched_kind, watched_namespace, queue in self.watchers:
            if watched_kind == kind and watched_namespace in (None, namespace):
                queue.put_nowait((event, snapshot))

    def _bump(self, obj: dict[str, Any]) -> None:
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)

    def _list(self, kind: Kind, namespace: Optional[str], selector: str) -> dict[str, Any]:
        items = [copy.deepcopy(obj) for (k, ns, _), obj in sorted(self.objects.items(), key=lambda kv: kv[0][2])
                 if k == kind and namespace in (None, ns) and _matches(obj, selector)]
        return {"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": str(self.revision)}, "items": items}

    def _create(self, kind: Kind, namespace: Optional[str], obj: dict[str, Any]) -> web.Response:
        obj = copy.deepcopy(obj)
        metadata = obj.setdefault("metadata", {})
        if "name" not in metadata and "generateName" in metadata:
            metadata["name"] = metadata["generateName"] + uuid.uuid4().hex[:5]
        key = (kind, namespace, metadata.get("name"))
        if key in self.objects:
            return _status(409, "AlreadyExists", f'{kind.plural} "{metadata["name"]}" already exists')
        if kind.has_status:
            obj.pop("status", None)  # the status subresource ignores status on create
        obj.update(apiVersion=kind.api_version, kind=kind.kind)
        metadata.update(uid=str(uuid.uuid4()), generation=1,
                        creationTimestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        if namespace is not None:
            metadata["namespace"] = namespace
        self._bump(obj)
        self.objects[key] = obj
        self._record(kind, namespace, "ADDED", obj)
        return web.json_response(obj, status=201)

    def _patch(self, key: tuple[Kind, Optional[str], str], patch: dict[str, Any], status_only: bool) -> web.Response:
        kind, namespace, name = key
        obj = self.objects.get(key)
        if obj is None:
            return _status(404, "NotFound", f'{kind.plural} "{name}" not found')
        if status_only:
            patched = merge_patch(obj, {"status": patch.get("status")}) if "status" in patch else obj
        else:
            patch = {k: v for k, v in patch.items() if not (kind.has_status and k == "status")}
            patched = merge_patch(obj, patch)
            for fixed in ("name", "namespace", "uid", "creationTimestamp"):
                patched["metadata"][fixed] = obj["metadata"].get(fixed)
            if patched.get("spec") != obj.get("spec"):
                patched["metadata"]["generation"] = obj["metadata"]["generation"] + 1
        if patched == obj:
            return web.json_response(obj)
        self._bump(patched)
        self.objects[key] = patched
        if patched["metadata"].get("deletionTimestamp") and not patched["metadata"].get("finalizers"):
            self._remove(key)
        else:
            self._record(kind, namespace, "MODIFIED", patched)
        return web.json_response(patched)

    def _delete(self, key: tuple[Kind, Optional[str], str], uid: Optional[str]) -> web.Response:
        kind, namespace, name = key
        obj = self.objects.get(key)
        if obj is None:
            return _status(404, "NotFound", f'{kind.plural} "{name}" not found')
        if uid is not None and obj["metadata"]["uid"] != uid:
            return _status(409, "Conflict", f"Precondition failed: UID in precondition: {uid}, "
                                            f"UID in object meta: {obj['metadata']['uid']}")
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj["metadata"]["deletionTimestamp"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                self._bump(obj)
                self._record(kind, namespace, "MODIFIED", obj)
            return web.json_response(obj, status=202)
        self._remove(key)
        return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Success"})

    def _remove(self, key: tuple[Kind, Optional[str], str]) -> None:
        kind, namespace, _ = key
        obj = self.objects.pop(key)
        self._bump(obj)
        self._record(kind, namespace, "DELETED", obj)
        # Garbage collection: dependents whose owner is gone go too (kube-controller-manager's job in a cluster).
        uid = obj["metadata"]["uid"]
        for dependent in [k for k, o in self.objects.items()
                          if any(ref.get("uid") == uid for ref in o["metadata"].get("ownerReferences") or [])]:
            if dependent in self.objects:
                self._delete(dependent, None)

    async def _watch(self, request: web.Request, kind: Kind, namespace: Optional[str]) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or 0)
        timeout = float(request.query.get("timeoutSeconds") or 300)
        selector = request.query.get("labelSelector", "")
        queue: asyncio.Queue = asyncio.Queue()
        if since:
            for revision, k, ns, event, obj in self.history:
                if revision > since and k == kind and namespace in (None, ns):
                    queue.put_nowait((event, obj))
        else:
            for item in self._list(kind, namespace, "")["items"]:
                queue.put_nowait(("ADDED", item))
        watcher = (kind, namespace, queue)
        self.watchers.append(watcher)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        deadline = self.loop.time() + timeout
        try:
            while True:
                remaining = deadline - self.loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=remaining)
                except asyncio.TimeoutError:
                    break
                if item is None:
                    break
                event, obj = item
                if _matches(obj, selector):
                    await response.write(json.dumps({"type": event, "object": obj}).encode() + b"\n")
        except ConnectionResetError:
            pass  # the client went away: the watch ends, as in a real server
        finally:
            self.watchers.remove(watcher)
        return response
