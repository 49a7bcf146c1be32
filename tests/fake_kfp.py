"""A small Kubeflow Pipelines API server (the v2beta1 endpoints `python -m pipelines` uses), on loopback.

No KFP backend can run here (it needs a cluster, MySQL and Argo), so the tests point the real
kfp.Client at this server: the SDK's own HTTP requests are made and recorded, and the server
keeps enough state (pipelines, versions, experiments, runs, recurring runs) to answer as KFP does.
"""

from __future__ import annotations

import email
import email.policy
import json
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import yaml

API = "/apis/v2beta1"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class State:
    def __init__(self):
        self.requests: list[dict] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring: dict[str, dict] = {}


def _matches(item: dict, raw_filter: str | None) -> bool:
    if not raw_filter:
        return True
    for p in json.loads(raw_filter).get("predicates", []):
        key = p["key"]
        if p["operation"] in ("EQUALS", 1) and str(item.get(key)) != str(p.get("stringValue", p.get("string_value"))):
            return False
    return True


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
        if path == f"{API}/healthz":
            return self._send(200, {"multi_user": False})
        if path == f"{API}/pipelines":
            found = [p for p in s.pipelines.values() if _matches(p, q.get("filter"))]
            return self._send(200, {"pipelines": found, "total_size": len(found)} if found else {})
        if path.startswith(f"{API}/pipelines/") and path.endswith("/versions"):
            versions = sorted(s.versions.get(path.split("/")[4], []), key=lambda v: v["created_at"], reverse=True)
            return self._send(200, {"pipeline_versions": versions[: int(q.get("page_size", 10))]} if versions else {})
        if path == f"{API}/experiments":
            found = [e for e in s.experiments.values() if _matches(e, q.get("filter"))
                     and (not q.get("namespace") or e.get("namespace") == q["namespace"])]
            return self._send(200, {"experiments": found, "total_size": len(found)} if found else {})
        if path == f"{API}/recurringruns":
            found = [r for r in s.recurring.values() if _matches(r, q.get("filter"))
                     and (not q.get("experiment_id") or r["experiment_id"] == q["experiment_id"])
                     and (not q.get("namespace") or r.get("namespace") == q["namespace"])]
            return self._send(200, {"recurringRuns": found, "total_size": len(found)} if found else {})
        return self._send(404, {"error": f"not implemented: GET {path}"})

    # ---- POST
    def do_POST(self):
        s = self.state
        if self.path.startswith(f"{API}/pipelines/upload"):
            filename, content = self._upload()
            path, q = self._record({"file": filename, "spec": list(yaml.safe_load_all(content))})
            if path == f"{API}/pipelines/upload":
                pipeline = {"pipeline_id": str(uuid.uuid4()), "display_name": q["name"],
                            "description": q.get("description", ""), "namespace": q.get("namespace", ""),
                            "created_at": _now()}
                s.pipelines[pipeline["pipeline_id"]] = pipeline
                self._add_version(pipeline["pipeline_id"], q["name"], content)
                return self._send(200, pipeline)
            pipeline_id = q["pipelineid"]
            if pipeline_id not in s.pipelines:
                return self._send(404, {"error": f"no pipeline {pipeline_id}"})
            return self._send(200, self._add_version(pipeline_id, q["name"], content))
        body = self._json_body()
        path, _ = self._record(body)
        if path == f"{API}/experiments":
            exp = {**body, "experiment_id": str(uuid.uuid4()), "created_at": _now()}
            s.experiments[exp["experiment_id"]] = exp
            return self._send(200, exp)
        if path == f"{API}/runs":
            run = {**body, "run_id": str(uuid.uuid4()), "state": "PENDING", "created_at": _now()}
            s.runs[run["run_id"]] = run
            return self._send(200, run)
        if path == f"{API}/recurringruns":
            job = {**body, "recurring_run_id": str(uuid.uuid4()), "created_at": _now(),
                   "status": "ENABLED" if body.get("mode", "ENABLE") == "ENABLE" else "DISABLED"}
            s.recurring[job["recurring_run_id"]] = job
            return self._send(200, job)
        for action, status in ((":disable", "DISABLED"), (":enable", "ENABLED")):
            if path.startswith(f"{API}/recurringruns/") and path.endswith(action):
                job_id = path.split("/")[-1].removesuffix(action)
                if job_id not in s.recurring:
                    return self._send(404, {"error": f"no recurring run {job_id}"})
                s.recurring[job_id]["status"] = status
                return self._send(200, {})
        return self._send(404, {"error": f"not implemented: POST {path}"})

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
                return self._send(404, {"error": "no such recurring run"})
            return self._send(200, {})
        return self._send(404, {"error": f"not implemented: DELETE {path}"})


def serve(port: int) -> tuple[ThreadingHTTPServer, State]:
    state = State()
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state
