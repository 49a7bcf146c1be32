"""A small Kubeflow Pipelines API server (the v2beta1 endpoints `python -m pipelines` uses), on loopback.

No KFP backend can run here (it needs a cluster, MySQL and Argo), so the tests point the real kfp.Client at
this server: the SDK's own HTTP requests are made and recorded, and the server answers as KFP's does. Each
behaviour below names the place in kubeflow/pipelines at tag 2.17.0 it copies (KFP: path:line); what the
real server does and this one does not (authorization by SubjectAccessReview, MLMD, Argo) is not imitated.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import yaml

API = "/apis/v2beta1"
# robfig/cron v1.2.0 (KFP go.mod:43), parser.go:66-104,174-185: a descriptor, or 5 or 6 fields, seconds first,
# day of week optional. The server refuses anything else (KFP backend/src/apiserver/server/api_converter.go:2087-2092).
CRON_DESCRIPTOR = re.compile(r"^@(yearly|annually|monthly|weekly|daily|midnight|hourly|every \S+)$")
CRON_FIELD = re.compile(r"^(\*|\?|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?(,(\*|\?|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?)*$")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class State:
    def __init__(self, multi_user: bool = False):
        self.multi_user = multi_user
        self.requests: list[dict] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring: dict[str, dict] = {}

    def namespace(self, value: str | None) -> str:
        """Single-user mode stores and lists everything under "" (KFP resource/resource_manager.go:2456-2462)."""
        return (value or "") if self.multi_user else ""


def _matches(item: dict, raw_filter: str | None) -> bool:
    if not raw_filter:
        return True
    for p in json.loads(raw_filter).get("predicates", []):
        key = p["key"]
        if p["operation"] in ("EQUALS", 1) and str(item.get(key)) != str(p.get("stringValue", p.get("string_value"))):
            return False
    return True


def _page(items: list[dict], q: dict) -> list[dict]:
    """sort_by "field" or "field desc" (KFP backend/src/apiserver/list/list.go:243-266; the default is
    created_at ascending, model/pipeline_version.go:72-74), page_size default 20, at most 200 (list.go:483-501)."""
    field, _, direction = (q.get("sort_by") or "created_at").lower().partition(" ")
    ordered = sorted(items, key=lambda i: i.get(field) or "", reverse=direction.strip() == "desc")
    return ordered[: min(int(q.get("page_size") or 20), 200)]


class Handler(BaseHTTPRequestHandler):
    state: State

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        """grpc-gateway's error body: code (gRPC), message, details."""
        code = {400: 3, 404: 5, 409: 6}.get(status, 2)
        return self._send(status, {"error_message": message, "code": code, "message": message, "details": []})

    def _record(self, body) -> tuple[str, dict]:
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.state.requests.append({"method": self.command, "path": url.path, "query": query, "body": body,
                                    "authorization": self.headers.get("Authorization")})
        return url.path, query

    def _json_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else None

    def _upload(self) -> tuple[str, bytes]:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        message = email.message_from_bytes(f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body,
                                           policy=email.policy.default)
        part = next(p for p in message.iter_parts()
                    if p.get_param("name", header="content-disposition") == "uploadfile")
        return part.get_filename(), part.get_payload(decode=True)

    # ---- GET
    def do_GET(self):
        path, q = self._record(None)
        s = self.state
        if path == f"{API}/healthz":  # KFP backend/src/apiserver/main.go:465-491
            return self._send(200, {"commit_sha": "fake", "tag_name": "2.17.0", "multi_user": s.multi_user})
        if path == f"{API}/pipelines":
            # only the namespace asked for; multi-user with none: the shared pipelines only
            # (KFP server/pipeline_server.go:430-460, storage/pipeline_store.go:319-331)
            ns = s.namespace(q.get("namespace"))
            found = [p for p in s.pipelines.values() if p["namespace"] == ns and _matches(p, q.get("filter"))]
            return self._send(200, {"pipelines": _page(found, q), "total_size": len(found)} if found else {})
        if path.startswith(f"{API}/pipelines/") and path.endswith("/versions"):
            versions = s.versions.get(path.split("/")[4], [])
            return self._send(200, {"pipeline_versions": _page(versions, q), "total_size": len(versions)}
                              if versions else {})
        if path == f"{API}/experiments":
            ns = s.namespace(q.get("namespace"))
            found = [e for e in s.experiments.values() if _matches(e, q.get("filter")) and e["namespace"] == ns]
            return self._send(200, {"experiments": _page(found, q), "total_size": len(found)} if found else {})
        if path == f"{API}/recurringruns":
            ns = s.namespace(q.get("namespace"))
            found = [r for r in s.recurring.values() if _matches(r, q.get("filter"))
                     and (not q.get("experiment_id") or r["experiment_id"] == q["experiment_id"])
                     and r["namespace"] == ns]
            return self._send(200, {"recurringRuns": _page(found, q), "total_size": len(found)} if found else {})
        return self._error(404, f"not implemented: GET {path}")

    # ---- POST
    def do_POST(self):
        s = self.state
        if self.path.startswith(f"{API}/pipelines/upload"):
            filename, content = self._upload()
            path, q = self._record({"file": filename, "spec": list(yaml.safe_load_all(content))})
            # name: name, else display_name, else the file's name (KFP server/pipeline_server.go:1320-1330)
            name = q.get("name") or q.get("display_name") or filename
            if path == f"{API}/pipelines/upload":  # KFP server/pipeline_upload_server.go:96-231
                ns = s.namespace(q.get("namespace"))
                if any(p["display_name"] == name and p["namespace"] == ns for p in s.pipelines.values()):
                    # unique per namespace (KFP model/pipeline.go:44,54): 409 (pipeline_upload_server.go:183-186)
                    return self._error(409, f"Failed to create a pipeline and a pipeline version: The name {name} "
                                            f"already exist. Please specify a new name")
                pipeline = {"pipeline_id": str(uuid.uuid4()), "display_name": name,
                            "description": q.get("description", ""), "namespace": ns, "created_at": _now()}
                s.pipelines[pipeline["pipeline_id"]] = pipeline
                self._add_version(pipeline["pipeline_id"], name, content)  # the same name (l.167-172)
                return self._send(200, pipeline)
            pipeline_id = q.get("pipelineid")  # required (pipeline_upload_server.go:268-273)
            if not pipeline_id:
                return self._error(400, "Failed to create a pipeline version: pipelineid is required")
            if pipeline_id not in s.pipelines:
                return self._error(404, f"no pipeline {pipeline_id}")
            if any(v["display_name"] == name for v in s.versions.get(pipeline_id, [])):
                # unique per pipeline (KFP model/pipeline_version.go:37,46): 409 (pipeline_upload_server.go:338-341)
                return self._error(409, f"Failed to create a pipeline version: The name {name} already exist")
            return self._send(200, self._add_version(pipeline_id, name, content))
        body = self._json_body()
        path, _ = self._record(body)
        if path == f"{API}/experiments":
            exp = {**body, "namespace": s.namespace(body.get("namespace")), "experiment_id": str(uuid.uuid4()),
                   "created_at": _now()}
            s.experiments[exp["experiment_id"]] = exp
            return self._send(200, exp)
        if path == f"{API}/runs":
            if body.get("experiment_id") not in s.experiments:
                return self._error(404, f"no experiment {body.get('experiment_id')}")
            run = {**body, "run_id": str(uuid.uuid4()), "state": "PENDING", "created_at": _now()}
            s.runs[run["run_id"]] = run
            return self._send(200, run)
        if path == f"{API}/recurringruns":
            problem = self._recurring_problem(body)
            if problem:
                return self._error(400, problem)
            job = {**body, "recurring_run_id": str(uuid.uuid4()), "created_at": _now(),
                   "namespace": s.experiments[body["experiment_id"]]["namespace"],
                   "status": "ENABLED" if body.get("mode", "ENABLE") == "ENABLE" else "DISABLED"}
            s.recurring[job["recurring_run_id"]] = job
            return self._send(200, job)
        for action, status in ((":disable", "DISABLED"), (":enable", "ENABLED")):
            if path.startswith(f"{API}/recurringruns/") and path.endswith(action):
                job_id = path.split("/")[-1].removesuffix(action)
                if job_id not in s.recurring:
                    return self._error(404, f"no recurring run {job_id}")
                s.recurring[job_id]["status"] = status
                return self._send(200, {})
        return self._error(404, f"not implemented: POST {path}")

    def _recurring_problem(self, body: dict) -> str:
        """KFP backend/src/apiserver/server/api_converter.go:2084-2092: max_concurrency in 1..10 (unset is 0,
        refused), a cron that robfig/cron v1 parses."""
        if body.get("experiment_id") not in self.state.experiments:
            return f"no experiment {body.get('experiment_id')}"
        concurrency = int(body.get("max_concurrency") or 0)
        if not 1 <= concurrency <= 10:
            return f"Max concurrency of a recurring run must be at least 1 and at most 10. Received {concurrency}"
        cron = ((body.get("trigger") or {}).get("cron_schedule") or {}).get("cron")
        if cron is not None:
            fields = cron.split()
            if not (CRON_DESCRIPTOR.match(cron.strip()) or (len(fields) in (5, 6)
                                                            and all(CRON_FIELD.match(f) for f in fields))):
                return ("Schedule cron is not a supported format(https://godoc.org/github.com/robfig/cron). "
                        f"Error: Expected 5 or 6 fields, found {len(fields)}: {cron}")
        return ""

    def _add_version(self, pipeline_id: str, name: str, content: bytes) -> dict:
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": str(uuid.uuid4()), "display_name": name,
                   "created_at": _now(), "pipeline_spec": list(yaml.safe_load_all(content))[0]}
        self.state.versions.setdefault(pipeline_id, []).append(version)
        return version

    # ---- DELETE
    def do_DELETE(self):
        path, _ = self._record(None)
        if path.startswith(f"{API}/recurringruns/"):
            if self.state.recurring.pop(path.split("/")[-1], None) is None:
                return self._error(404, "no such recurring run")
            return self._send(200, {})
        return self._error(404, f"not implemented: DELETE {path}")


def serve(port: int, multi_user: bool = False) -> tuple[ThreadingHTTPServer, State]:
    state = State(multi_user)
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state
