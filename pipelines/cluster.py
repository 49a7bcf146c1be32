"""The pipeline on a Kubeflow Pipelines server: versions, one-off runs and schedules.

    python -m pipelines upload    --host URL [--params FILE] [--param KEY=VALUE ...] [--image REF]
    python -m pipelines run       --host URL [--experiment NAME] [--params FILE] [--param KEY=VALUE ...]
    python -m pipelines schedule  --host URL --name NAME [--cron "0 0 3 * * *"] [--params ...] [--param ...]
    python -m pipelines schedules --host URL
    python -m pipelines pause|resume|delete --host URL NAME

`upload` compiles the pipeline with your values as its defaults and adds it as a new version of
the pipeline `finetune-image-classifier` (created the first time). `run` and `schedule` start the
latest version (or `--version ID`) with every parameter set from params.yaml, `--params FILE`
(a params.yaml of your own) and `--param section.key=value` overrides, in that order. `schedule`
is create-or-update by name: running it twice leaves one schedule. Values that name a path in
this repository (the demo's `data/raw/...`, `zoo/...`) are refused: the cluster has no checkout.

Auth is what kfp.Client supports: `--namespace` for multi-user Kubeflow, a bearer token from the
environment variable named by `--token-env` (never a command-line argument, which `ps` shows),
or `--in-cluster` for a pod's service-account token.
"""

from __future__ import annotations

import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import yaml

from components.config import ConfigError, Params, load_params
from pipelines import finetune_pipeline as fp

SCHEMES = ("s3://", "gs://", "https://", "http://", "file://", "torchvision://", "models:/")


# ---- parameters -----------------------------------------------------------------------------

def _set(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for key in parents:
        if not isinstance(node.get(key), dict):
            raise ConfigError(f"--param {dotted}: params.yaml has no section '{key}'")
        node = node[key]
    if last not in node:
        raise ConfigError(f"--param {dotted}: params.yaml has no setting '{dotted}'")
    node[last] = value


def load(params_file: Path, overrides: list[str]) -> Params:
    """params.yaml (or `params_file`) with `section.key=value` overrides (values read as YAML), validated."""
    raw = yaml.safe_load(Path(params_file).read_text())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--param {item}: expected section.key=value")
        _set(raw, key.strip(), yaml.safe_load(value))
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(raw, f)
    try:
        return load_params(f.name)
    finally:
        os.unlink(f.name)


def cluster_ready(params: Params) -> Params:
    """`params`, unless a value names a path inside this repository, which no pod has."""
    data = params.data
    checks = {"pretrained.uri": params.pretrained.uri}
    if not data.repo:  # with data.repo, data.source is a path inside that git repository: fine
        checks["data.source"] = data.source
    for key, value in checks.items():
        if not value.startswith(SCHEMES) and not Path(value).is_absolute():
            raise ConfigError(f"{key}: '{value}' is a path in this repository, which the cluster does not have: "
                              f"set it to s3://..., models:/..., torchvision://... or an absolute path on a "
                              f"mounted volume (--param {key}=...)")
    return params


def compile_for(params: Params, out: Path, image: str = "") -> Path:
    """The pipeline with `params` as its defaults; `image` (a digest or tag) replaces the component image."""
    fp.compile_pipeline(out, fp.make_pipeline(params))
    if image:
        docs = list(yaml.safe_load_all(out.read_text()))
        for executor in docs[0]["deploymentSpec"]["executors"].values():
            executor["container"]["image"] = image
        out.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return out


# ---- the server -----------------------------------------------------------------------------

def client(host: str | None, namespace: str | None, token_env: str, in_cluster: bool):
    import kfp

    kwargs = {"host": host}
    if namespace:
        kwargs["namespace"] = namespace
    if in_cluster:
        kwargs["credentials"] = kfp.client.ServiceAccountTokenVolumeCredentials()
    elif os.environ.get(token_env):
        kwargs["existing_token"] = os.environ[token_env]
    return kfp.Client(**kwargs)


def _namespace(client) -> str | None:
    return client.get_user_namespace() or None


def upload(client, package: Path, version_name: str = "") -> tuple[str, str]:
    """Add `package` as a new version of the pipeline (created the first time): (pipeline id, version id)."""
    version_name = version_name or f"{fp.IMAGE.rsplit(':', 1)[-1]}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    pipeline_id = client.get_pipeline_id(fp.PIPELINE_NAME)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(str(package), pipeline_name=fp.PIPELINE_NAME,
                                          description="Fine-tune a pretrained image classifier; register it in "
                                          "MLflow when it passes validation.", namespace=_namespace(client))
        return pipeline.pipeline_id, latest_version(client, pipeline.pipeline_id)
    version = client.upload_pipeline_version(str(package), version_name, pipeline_id=pipeline_id)
    return pipeline_id, version.pipeline_version_id


def latest_version(client, pipeline_id: str) -> str:
    versions = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc").pipeline_versions
    if not versions:
        raise ConfigError(f"pipeline {fp.PIPELINE_NAME} has no version: run `python -m pipelines upload` first")
    return versions[0].pipeline_version_id


def _pipeline(client, version: str) -> tuple[str, str]:
    pipeline_id = client.get_pipeline_id(fp.PIPELINE_NAME)
    if pipeline_id is None:
        raise ConfigError(f"no pipeline {fp.PIPELINE_NAME} on the server: run `python -m pipelines upload` first")
    return pipeline_id, version or latest_version(client, pipeline_id)


def run(client, experiment: str, params: Params, version: str = "", name: str = "", service_account: str = ""):
    """One run of the pipeline version with every parameter from `params`."""
    pipeline_id, version_id = _pipeline(client, version)
    exp = client.create_experiment(experiment, namespace=_namespace(client))
    name = name or f"{fp.PIPELINE_NAME} {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S}"
    return client.run_pipeline(exp.experiment_id, name, params=fp.pipeline_parameters(params),
                               pipeline_id=pipeline_id, version_id=version_id, service_account=service_account or None)


def _by_name(client, name: str) -> list:
    import json

    found, token = [], ""
    flt = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    while True:
        page = client.list_recurring_runs(page_token=token, page_size=100, namespace=_namespace(client), filter=flt)
        found += [r for r in page.recurring_runs or [] if r.display_name == name]
        token = page.next_page_token
        if not token:
            return found


def schedule(client, name: str, cron: str, experiment: str, params: Params, version: str = "",
             max_concurrency: int = 1, catchup: bool = False, service_account: str = ""):
    """Create the recurring run `name`, or replace the one of that name (KFP cannot edit one in place).
    Returns (recurring run, whether one was replaced)."""
    pipeline_id, version_id = _pipeline(client, version)
    old = _by_name(client, name)
    exp = client.create_experiment(experiment, namespace=_namespace(client))
    job = client.create_recurring_run(
        experiment_id=exp.experiment_id, job_name=name, cron_expression=cron,
        params=fp.pipeline_parameters(params), pipeline_id=pipeline_id, version_id=version_id,
        max_concurrency=max_concurrency,  # two trainings racing for the champion alias help nobody
        no_catchup=not catchup,            # after downtime, run once, not once per missed slot
        service_account=service_account or None)
    for previous in old:  # only once the new one exists: a failure above leaves the old schedule running
        client.delete_recurring_run(previous.recurring_run_id)
    return job, bool(old)


def schedules(client) -> list[dict]:
    token, rows = "", []
    while True:
        page = client.list_recurring_runs(page_token=token, page_size=100, namespace=_namespace(client))
        for r in page.recurring_runs or []:
            cron = r.trigger.cron_schedule.cron if r.trigger and r.trigger.cron_schedule else ""
            rows.append({"name": r.display_name, "id": r.recurring_run_id, "cron": cron, "status": r.status,
                         "max_concurrency": r.max_concurrency, "version": r.pipeline_version_reference
                         and r.pipeline_version_reference.pipeline_version_id})
        token = page.next_page_token
        if not token:
            return rows


def change(client, name: str, action: str) -> int:
    """pause, resume or delete every schedule called `name`; how many there were."""
    found = _by_name(client, name)
    if not found:
        raise ConfigError(f"no schedule named '{name}' (python -m pipelines schedules lists them)")
    call = {"pause": client.disable_recurring_run, "resume": client.enable_recurring_run,
            "delete": client.delete_recurring_run}[action]
    for job in found:
        call(job.recurring_run_id)
    return len(found)
