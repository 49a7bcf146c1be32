"""The compiled pipeline, our Role and the TrainJob held to the rules of the code that runs them on a cluster.

No Kubernetes control plane, KFP backend, Argo controller or Trainer webhook can run here, so their rules are
ported from their source at the versions we pin, each citing repository, tag and path:line:
kubeflow/pipelines 2.17.0 (the driver, launcher and compiler), argoproj/argo-workflows v4.0.5 (the version
that tag's go.mod:10 pins), kubeflow/trainer v2.3.0 and kubernetes/apimachinery v0.36.2 (the version Trainer's
go.mod:15 pins). Each test also shows that the port catches the defect it guards against.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import uuid

import pytest
import yaml

from helpers import ROOT

COMPILED = ROOT / "pipelines" / "finetune_pipeline.yaml"


@pytest.fixture(scope="module")
def spec():
    return list(yaml.safe_load_all(COMPILED.read_text()))


# ---- Kubeflow's cache key ------------------------------------------------------------------------------

# Run-scoped placeholders the driver resolves before hashing (kubeflow/pipelines 2.17.0,
# backend/src/v2/driver/resolve.go:422-454; the SDK's names in sdk/python/kfp/dsl/__init__.py:75,90,106,136)
RUN_SCOPED = ("{{$.pipeline_job_uuid}}", "{{$.pipeline_job_name}}", "{{$.pipeline_job_resource_name}}",
              "{{$.pipeline_task_uuid}}", "{{$.pipeline_task_name}}", "{{$.pipeline_job_create_time_utc}}",
              "{{$.pipeline_job_schedule_time_utc}}")


def _tasks(spec) -> dict[str, dict]:
    """Every task of the DAG and of its condition's sub-DAG."""
    out = dict(spec[0]["root"]["dag"]["tasks"])
    for name, comp in spec[0]["components"].items():
        if "dag" in comp:
            out.update(comp["dag"]["tasks"])
    return out


def _topological(tasks: dict) -> list[str]:
    done: list[str] = []
    while len(done) < len(tasks):
        for name, task in tasks.items():
            if name not in done and all(d in done for d in task.get("dependentTasks", [])):
                done.append(name)
    return done


def _resolve(value, run: dict):
    if isinstance(value, str):
        for placeholder in RUN_SCOPED:
            value = value.replace(placeholder, run["id"])
    return value


class Cluster:
    """KFP's cache across runs: the key as backend/src/v2/cacheutils/cache.go:173-229 builds it (input artifacts
    by MLMD id, not URI (metadata/converter.go:186-187); input parameter values as resolved; output artifact
    names and types; output parameter types; image with the unresolved command and args; the mounted claims'
    names, sorted (driver/container.go:152-163, driver/cache.go:83-117)), hashed as cache.go:151-171 does; a hit
    reuses the earlier execution's outputs, and only tasks with caching enabled look (driver/cache.go:119-134)."""

    def __init__(self, spec):
        self.spec, self.seen = spec, {}
        self.tasks = spec[0]["root"]["dag"]["tasks"]  # the condition's tasks are never cached (test below)
        self.platform = spec[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]

    def key(self, name: str, run: dict, outputs: dict) -> str:
        task = self.tasks[name]
        comp = self.spec[0]["components"][task["componentRef"]["name"]]
        executor = comp["executorLabel"]
        inputs = task.get("inputs", {})
        params = {}
        for param, source in inputs.get("parameters", {}).items():
            if "componentInputParameter" in source:
                params[param] = run["arguments"][source["componentInputParameter"]]
            elif "taskOutputParameter" in source:
                src = source["taskOutputParameter"]
                params[param] = outputs[src["producerTask"]][src["outputParameterKey"]]
            else:
                params[param] = _resolve(source["runtimeValue"]["constant"], run)
        artifacts = {a: outputs[s["taskOutputArtifact"]["producerTask"]][s["taskOutputArtifact"]["outputArtifactKey"]]
                     for a, s in inputs.get("artifacts", {}).items()}
        container = self.spec[0]["deploymentSpec"]["executors"][executor]["container"]
        claims = sorted({_resolve(m.get("constant") or m["pvcNameParameter"]["runtimeValue"]["constant"], run)
                         for m in self.platform.get(executor, {}).get("pvcMount", [])})
        out_defs = comp.get("outputDefinitions", {})
        key = {"inputArtifactNames": artifacts, "inputParameterValues": params,
               "outputArtifactsSpec": {k: v["artifactType"] for k, v in out_defs.get("artifacts", {}).items()},
               "outputParametersSpec": {k: v["parameterType"] for k, v in out_defs.get("parameters", {}).items()},
               "containerSpec": {"image": container["image"],
                                 "cmdArgs": container.get("command", []) + container.get("args", []),
                                 "pvcNames": claims}}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def run(self, arguments: dict, resolved: dict) -> dict[str, bool]:
        """One run: which tasks hit the cache. `resolved`: what the uncached resolve task returns this time."""
        run = {"id": str(uuid.uuid4()), "arguments": arguments}
        outputs, hits = {}, {}
        for name in _topological(self.tasks):
            task = self.tasks[name]
            if name.startswith("condition"):
                outputs[name] = {}
                continue
            cached = task.get("cachingOptions", {}).get("enableCache", False)
            key = self.key(name, run, outputs)
            hits[name] = cached and key in self.seen
            if hits[name]:
                outputs[name] = self.seen[key]
            else:
                comp = self.spec[0]["components"][task["componentRef"]["name"]]
                defs = comp.get("outputDefinitions", {})
                new = {k: str(uuid.uuid4()) for k in defs.get("artifacts", {})}  # a new MLMD artifact each
                new.update({k: resolved.get(k, str(uuid.uuid4())) for k in defs.get("parameters", {})})
                outputs[name] = new
                if cached:
                    self.seen[key] = new
        return hits


def _arguments(spec) -> dict:
    return {k: v.get("defaultValue") for k, v in spec[0]["root"]["inputDefinitions"]["parameters"].items()}


RESOLVED = {"data_version": "s3:" + "1" * 64, "pretrained_uri": "s3://zoo/r18.pt", "pretrained_version": "etag:abc"}


def test_no_cached_task_takes_a_run_scoped_value(spec):
    for name, task in _tasks(spec).items():
        if not task.get("cachingOptions", {}).get("enableCache"):
            continue
        for param, source in task.get("inputs", {}).get("parameters", {}).items():
            constant = str(source.get("runtimeValue", {}).get("constant", ""))
            assert not any(p in constant for p in RUN_SCOPED), f"{name}.{param} = {constant}: never cached across runs"


def test_the_tasks_under_the_gate_are_never_cached(spec):
    for name, comp in spec[0]["components"].items():
        for task_name, task in comp.get("dag", {}).get("tasks", {}).items():
            assert not task.get("cachingOptions", {}).get("enableCache"), task_name


def test_unchanged_content_hits_the_cache_in_every_cached_task_the_fine_tune_included(spec):
    cluster = Cluster(spec)
    first = cluster.run(_arguments(spec), RESOLVED)
    assert not any(first.values())
    second = cluster.run(_arguments(spec), RESOLVED)
    assert {t for t, hit in second.items() if hit} == {"data-op", "augment-op", "fetch-pretrained-op", "finetune-op"}


def test_new_data_or_new_weights_rerun_what_depends_on_them_and_nothing_else(spec):
    cluster = Cluster(spec)
    cluster.run(_arguments(spec), RESOLVED)
    new_data = cluster.run(_arguments(spec), {**RESOLVED, "data_version": "s3:" + "2" * 64})
    assert {t for t, hit in new_data.items() if hit} == {"fetch-pretrained-op"}
    new_weights = cluster.run(_arguments(spec), {**RESOLVED, "pretrained_version": "etag:def"})
    assert {t for t, hit in new_weights.items() if hit} == {"data-op", "augment-op"}


def test_the_port_sees_a_run_id_input_and_a_per_run_claim_defeat_the_cache(spec):
    """What finetune_op took before (the run id) and what kfp-kubernetes' CreatePVC would give (a claim per run)."""
    for change in ("run id", "claim"):
        bad = copy.deepcopy(spec)
        root_task = bad[0]["root"]["dag"]["tasks"]["finetune-op"]
        if change == "run id":
            root_task["inputs"]["parameters"]["pipeline_run_id"] = {"runtimeValue": {"constant": RUN_SCOPED[0]}}
        else:
            mount = bad[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-finetune-op"]["pvcMount"][0]
            mount.pop("constant", None)
            mount["pvcNameParameter"] = {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}-finetune-checkpoints"}}
        cluster = Cluster(bad)
        cluster.run(_arguments(bad), RESOLVED)
        assert not cluster.run(_arguments(bad), RESOLVED)["finetune-op"], change


# ---- Argo's retry window --------------------------------------------------------------------------------

def argo_attempts(limit: int, duration_s: int, factor: float, max_duration_s: int, attempt_s: int) -> int:
    """How many attempts Argo makes of a node whose every attempt fails after `attempt_s`, as
    processNodeRetries decides (argoproj/argo-workflows v4.0.5, workflow/controller/operator.go): the window
    runs from the first attempt's start (:1028-1040), the wait is duration * factor^(attempts-1) from the last
    attempt's end (:1054-1079), a wait that would end past the window fails the node (:1081-1085), and more
    than `limit` retries is "No more retries left" (:1132-1139). KFP compiles set_retry into exactly these
    fields, without `cap` (kubeflow/pipelines 2.17.0, backend/src/v2/compiler/argocompiler/container.go:667-685)."""
    start, now, attempts = 0, 0, 0
    deadline = start + max_duration_s
    while True:
        attempts += 1
        now += attempt_s                       # the attempt fails
        if now > deadline:
            return attempts                    # "Max duration limit exceeded"
        wait = duration_s * factor ** (attempts - 1)
        if now + wait > deadline:
            return attempts                    # "Backoff would exceed max duration limit"
        if attempts > limit:
            return attempts                    # "No more retries left"
        now += wait


def _seconds(text: str) -> int:
    return int(text.removesuffix("s"))


def test_every_retry_is_made_even_when_each_attempt_runs_to_its_timeout(spec, params):
    platform = spec[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = _tasks(spec)
    checked = 0
    for name, task in tasks.items():
        retry = task.get("retryPolicy")
        if not retry:
            continue
        timeout = int(platform[task["componentRef"]["name"].replace("comp-", "exec-")]["activeDeadlineSeconds"])
        made = argo_attempts(retry["maxRetryCount"], _seconds(retry["backoffDuration"]), retry["backoffFactor"],
                             _seconds(retry["backoffMaxDuration"]), timeout)
        assert made == retry["maxRetryCount"] + 1, f"{name}: {made} of {retry['maxRetryCount'] + 1} attempts"
        checked += 1
    assert checked == sum(1 for t in params.pipeline.tasks.values() if t.retries)


def test_the_port_sees_that_a_half_hour_window_never_retries_a_long_fine_tune(params):
    """The window we compiled before: backoffMaxDuration 1800s on every task."""
    finetune = params.pipeline.tasks["finetune"]
    assert argo_attempts(finetune.retries, params.pipeline.retry_backoff_s, 2, 1800, 3600) == 1
    assert argo_attempts(finetune.retries, params.pipeline.retry_backoff_s, 2, 1800, 600) == finetune.retries + 1


# ---- what the run's service account must be allowed --------------------------------------------------

# (who, verb, API group, resource, name, where): the Kubernetes API calls a run of this pipeline makes as the
# workflow's service account, which every pod of the run uses (kubeflow/pipelines 2.17.0,
# backend/src/v2/compiler/argocompiler/argo.go:178).
CALLS = [
    ("root driver", "get", "", "configmaps", "kfp-launcher",
     "backend/src/v2/config/env.go:72-83; a 403 fails the run: backend/src/v2/driver/root_dag.go:99-106"),
    ("launcher", "get", "", "secrets", "mlpipeline-minio-artifact",
     "backend/src/v2/objectstore/object_store.go:391; the name: backend/src/v2/config/env.go:41-44"),
    ("Argo executor", "create", "argoproj.io", "workflowtaskresults", "", "argo-workflows v4.0.5"),
    ("Argo executor", "patch", "argoproj.io", "workflowtaskresults", "", "argo-workflows v4.0.5"),
]


def _allows(rules: list[dict], verb: str, group: str, resource: str, name: str) -> bool:
    """Kubernetes RBAC: a rule allows a request when its groups, resources and verbs hold it (or `*`), and
    its resourceNames, when given, hold the name (a create has none, so resourceNames cannot limit it)."""
    def has(values, value):
        return "*" in values or value in values

    return any(has(r.get("apiGroups", []), group) and has(r.get("resources", []), resource)
               and has(r.get("verbs", []), verb) and (not r.get("resourceNames") or name in r["resourceNames"])
               for r in rules)


def _role() -> list[dict]:
    docs = list(yaml.safe_load_all((ROOT / "infra" / "k8s" / "pipeline" / "rbac.yaml").read_text()))
    return next(d for d in docs if d["kind"] == "Role")["rules"]


def test_the_service_account_may_make_every_call_a_run_makes():
    rules = _role()
    for who, verb, group, resource, name, where in CALLS:
        assert _allows(rules, verb, group, resource, name), f"{who}: {verb} {resource}/{name} ({where}) is refused"


def test_it_holds_nothing_a_run_does_not_use():
    for rule in _role():
        assert any(_allows([rule], verb, group, resource, name) for _, verb, group, resource, name, _ in CALLS), rule


def test_the_pipeline_makes_no_call_that_would_need_more(spec):
    """The driver reads its own pod and creates or deletes claims only for kfp-kubernetes' platform tasks
    (backend/src/v2/driver/k8s.go:967,1087,1093,1198), and gets the workflow only for the create and schedule
    time placeholders (backend/src/v2/cmd/driver/main.go:166-183): the pipeline has none of them."""
    images = {e["container"]["image"] for e in spec[0]["deploymentSpec"]["executors"].values()}
    assert not any(i.startswith("argostub/") for i in images)
    text = COMPILED.read_text()
    assert "pipeline_job_create_time_utc" not in text and "pipeline_job_schedule_time_utc" not in text


def test_the_port_sees_the_role_we_had_fail_the_first_step():
    before = [{"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]},
              {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["mlflow"], "verbs": ["get"]}]
    refused = [c[0] for c in CALLS if not _allows(before, *c[1:5])]
    assert refused == ["root driver", "launcher"]


# ---- Trainer's admission webhook ----------------------------------------------------------------------

# kubernetes/apimachinery v0.36.2, pkg/util/validation/validation.go:88,184,191
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
PATH_SEGMENT = re.compile(r"^[A-Za-z0-9/\-._~%!$&'()*+,;=:]+$")
# pkg/constants/constants.go:190-203 (kubeflow/trainer v2.3.0): what torchrun gets from Trainer itself
RESERVED_ENV = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
# manifests/base/runtimes/torch_distributed.yaml:28-37: the runtime's replicated job and its container
RUNTIME_JOBS = {"node": {"node"}}


def is_domain_prefixed_path(value: str) -> bool:
    """apimachinery v0.36.2 validation.go:92-118: host/path, the host a DNS-1123 subdomain of at most 253."""
    host, sep, path = value.partition("/")
    return bool(sep and host and path and len(host) <= 253 and DNS1123_SUBDOMAIN.match(host)
                and PATH_SEGMENT.match(path))


def trainer_webhook_errors(job: dict) -> list[str]:
    """What kubeflow/trainer v2.3.0's TrainJob webhook refuses on create (pkg/webhooks/trainjob_webhook.go:110-121
    runs the plugins' Validate; failurePolicy Fail, :94)."""
    errors = []
    spec = job["spec"]
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"]) or len(job["metadata"]["name"]) > 63:
        errors.append("metadata.name")  # pkg/apis/trainer/v1alpha1/trainjob_types.go:36-37
    patches = spec.get("runtimePatches", [])
    if len(patches) > 16 or len({p["manager"] for p in patches}) != len(patches):
        errors.append("runtimePatches: at most 16, one per manager")  # trainjob_types.go:118-124
    for patch in patches:
        if not is_domain_prefixed_path(patch["manager"]):  # pkg/runtime/framework/plugins/jobset/jobset.go:175-176
            errors.append(f"runtimePatches.manager {patch['manager']!r}: must be a domain-prefixed path")
        jobs = patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", [])
        for rjob in jobs:
            if rjob["name"] not in RUNTIME_JOBS:  # jobset.go:181-186
                errors.append(f"replicatedJobs {rjob['name']}: not in the runtime")
                continue
            pod = rjob.get("template", {}).get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("containers", []):
                if c["name"] not in RUNTIME_JOBS[rjob["name"]]:  # jobset.go:199-202
                    errors.append(f"container {c['name']}: not in the runtime")
                if c["name"] == "node" and c.get("env"):  # jobset.go:203-205
                    errors.append("container node: env belongs in spec.trainer.env")
    if RESERVED_ENV & {e["name"] for e in spec.get("trainer", {}).get("env", [])}:  # plugins/torch/torch.go:67-77
        errors.append("trainer.env: reserved PET_* name")
    if spec.get("activeDeadlineSeconds", 1) < 1:  # trainjob_types.go:131-139
        errors.append("activeDeadlineSeconds")
    return errors


def test_the_trainjob_passes_trainers_webhook(params):
    from pipelines import trainjob

    committed = yaml.safe_load((ROOT / "infra" / "k8s" / "trainjob" / "trainjob.yaml").read_text())
    assert trainer_webhook_errors(committed) == []
    assert trainer_webhook_errors(trainjob.manifest(params, nodes=8, name="finetune-2026-12-02")) == []


@pytest.mark.parametrize("change, error", [
    (lambda j: j["spec"]["runtimePatches"][0].update(manager="finetune-pipeline"), "domain-prefixed path"),
    (lambda j: _node(j).update(env=[{"name": "X", "value": "1"}]), "env belongs in spec.trainer.env"),
    (lambda j: j["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "2"}), "reserved PET_"),
    (lambda j: _node(j).update(name="trainer"), "container trainer: not in the runtime"),
])
def test_the_port_refuses_what_the_webhook_refuses(change, error):
    job = yaml.safe_load((ROOT / "infra" / "k8s" / "trainjob" / "trainjob.yaml").read_text())
    change(job)
    assert any(error in e for e in trainer_webhook_errors(job)), trainer_webhook_errors(job)


def _node(job: dict) -> dict:
    rjob = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    return rjob["template"]["spec"]["template"]["spec"]["containers"][0]


# ---- the task pods -------------------------------------------------------------------------------------

def _platform(spec) -> dict:
    return spec[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_no_task_sets_a_variable_kfps_launcher_reads_for_its_own_uploads(spec):
    """The launcher is the task's parent process in the same container and opens its artifact store with the
    container's AWS_* when kfp-launcher's providers say fromEnv (kubeflow/pipelines 2.17.0,
    backend/src/v2/config/s3.go:87-95) and through the AWS SDK's default configuration otherwise
    (backend/src/v2/objectstore/object_store.go:318-330, where AWS_ENDPOINT_URL is read): our S3 settings
    arrive as FINETUNE_AWS_* (components/storage/s3_env.py)."""
    for name, executor in _platform(spec).items():
        env = [e["envVar"] for s in executor.get("secretAsEnv", []) for e in s["keyToEnv"]]
        env += [e["envVar"] for c in executor.get("configMapAsEnv", []) for e in c["keyToEnv"]]
        assert not [v for v in env if v.startswith("AWS_")], name
    containers = spec[0]["deploymentSpec"]["executors"].values()
    assert not [e for c in containers for e in c["container"].get("env", []) if e["name"].startswith("AWS_")]


def test_every_task_pod_runs_as_the_images_non_root_user(spec):
    """kfp-kubernetes' set_security_context, which the driver applies to the task's container
    (backend/src/v2/driver/k8s.go:749-786; the compiler adds no privilege escalation, drop ALL and
    RuntimeDefault: backend/src/v2/compiler/argocompiler/security_context.go:163-198)."""
    for name, executor in _platform(spec).items():
        assert executor.get("securityContext") == {"runAsUser": "10001", "runAsGroup": "10001",
                                                   "runAsNonRoot": True}, name


# (what, port, where): the endpoints a task pod reaches with KFP 2.17.0's defaults, besides DNS
TASK_ENDPOINTS = [
    ("KFP API server's gRPC: the launcher writes the cache entry", 8887,
     "backend/src/v2/config/env.go:48,195-200; backend/src/v2/cacheutils/cache.go:140-149"),
    ("ML Metadata", 8080, "backend/src/v2/metadata/env.go:14-19"),
    ("the artifact store", 9000, "backend/src/v2/objectstore/config.go:29"),
    ("the Kubernetes API: Argo's executor reports task results", 443, "argo-workflows v4.0.5"),
]


def test_the_pipeline_namespaces_policy_selects_every_task_pod_and_lets_it_reach_what_it_must(spec):
    docs = list(yaml.safe_load_all((ROOT / "infra" / "k8s" / "pipeline" / "network-policy.yaml").read_text()))
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for name, executor in _platform(spec).items():
        labels = executor.get("podMetadata", {}).get("labels", {})
        assert selector.items() <= labels.items(), f"{name}: not selected, so not limited"
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"} and "ingress" not in policy["spec"]
    ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    for what, port, where in TASK_ENDPOINTS:
        assert port in ports, f"{what} ({where}) is blocked"
    mlflow = [r for r in policy["spec"]["egress"] if any(p["port"] == 5000 for p in r["ports"])]
    assert mlflow and mlflow[0]["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "mlflow"}
