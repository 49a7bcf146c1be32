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

def _set(tree: dict, dotted: str, text: str) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for key in parents:
        if not isinstance(node.get(key), dict):
            raise ConfigError(f"--param {dotted}: params.yaml has no section '{key}'")
        node = node[key]
    if last not in node:
        raise ConfigError(f"--param {dotted}: params.yaml has no setting '{dotted}'")
    value = yaml.safe_load(text)
    # a string setting keeps the text as typed: a digits-only hash or version is not a number
    node[last] = text if isinstance(node[last], str) and not isinstance(value, str) else value


def load(params_file: Path, overrides: list[str], compiled_in: bool = True) -> Params:
    """params.yaml (or `params_file`) with `section.key=value` overrides (values read as YAML, a string
    setting's as typed), validated. `compiled_in=False` (run, schedule): the `pipeline` section is compiled
    into the version at upload, so overriding it then is refused rather than ignored."""
    raw = yaml.safe_load(Path(params_file).read_text())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--param {item}: expected section.key=value")
        if not compiled_in and key.strip().split(".")[0] == "pipeline":
            raise ConfigError(f"--param {key.strip()}: the pipeline section (image, sizes, timeouts, retries, GPUs) "
                              "is compiled into the version at upload: pass it to `python -m pipelines upload`")
        _set(raw, key.strip(), value)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(raw, f)
    try:
        return load_params(f.name)
    except ConfigError as err:  # named after the file and overrides the user gave, not the temporary copy
        raise ConfigError(str(err).replace(f.name, f"{params_file}{' with --param' if overrides else ''}")) from None
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
            if executor["container"]["image"] == fp.IMAGE:  # not kfp-kubernetes' argostub/createpvc and the like
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


def find_pipeline(client) -> str | None:
    """The pipeline's id in the client's namespace. kfp.Client.get_pipeline_id sends no namespace, and the
    server lists only shared pipelines then (multi-user), so a namespaced pipeline is never found by it."""
    import json

    flt = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": fp.PIPELINE_NAME}]})
    found = client.list_pipelines(filter=flt, namespace=_namespace(client), page_size=2).pipelines or []
    found = [p for p in found if p.display_name == fp.PIPELINE_NAME]
    if len(found) > 1:
        raise ConfigError(f"{len(found)} pipelines named {fp.PIPELINE_NAME} on the server: delete all but one")
    return found[0].pipeline_id if found else None


def upload(client, package: Path, version_name: str = "") -> tuple[str, str]:
    """Add `package` as a new version of the pipeline (created the first time): (pipeline id, version id)."""
    version_name = version_name or f"{fp.IMAGE.rsplit(':', 1)[-1]}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    found = find_pipeline(client)
    if found is None:
        pipeline = client.upload_pipeline(str(package), pipeline_name=fp.PIPELINE_NAME,
                                          description="Fine-tune a pretrained image classifier; register it in "
                                          "MLflow when it passes validation.", namespace=_namespace(client))
        return pipeline.pipeline_id, latest_version(client, pipeline.pipeline_id)
    version = client.upload_pipeline_version(str(package), version_name, pipeline_id=found)
    return found, version.pipeline_version_id


def latest_version(client, pipeline_id: str) -> str:
    versions = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc").pipeline_versions
    if not versions:
        raise ConfigError(f"pipeline {fp.PIPELINE_NAME} has no version: run `python -m pipelines upload` first")
    return versions[0].pipeline_version_id


def _pipeline(client, version: str) -> tuple[str, str]:
    found = find_pipeline(client)
    if found is None:
        where = f" in namespace {_namespace(client)}" if _namespace(client) else ""
        raise ConfigError(f"no pipeline {fp.PIPELINE_NAME} on the server{where}: run `python -m pipelines upload` "
                          "first")
    return found, version or latest_version(client, found)


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


# The server parses a schedule with github.com/robfig/cron v1 (see check_schedule): six fields, seconds
# first, or a descriptor. A field is a comma-separated list of `*`, `?`, `N` or `N-M`, each with `/step`.
CRON_FIELDS = (("second", 0, 59, {}), ("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day of month", 1, 31, {}),
               ("month", 1, 12, {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec"
                                                                   .split())}),
               ("day of week", 0, 6, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}))
CRON_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
MAX_CONCURRENCY = (1, 10)  # the server's bounds on a recurring run's max_concurrency


def _cron_field(text: str, what: str, low: int, high: int, names: dict) -> None:
    def number(word: str) -> int:
        value = names.get(word.lower(), int(word) if word.isdigit() else None)
        if value is None or not low <= value <= high:
            raise ValueError(f"{what} '{word}' is not in {low}-{high}")
        return value

    for part in text.split(","):
        span, _, step = part.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            raise ValueError(f"{what} step '{step}' is not a positive number")
        if span in ("*", "?"):
            continue
        first, dash, last = span.partition("-")
        if number(first) > (number(last) if dash else high if step else number(first)):
            raise ValueError(f"{what} range '{span}' runs backwards")


def check_schedule(cron: str, max_concurrency: int) -> None:
    """Refuse what the KFP server refuses, and a five-field cron, which robfig/cron v1 accepts as
    seconds-first with any day of the week: `0 3 * * *` would run at minute 3 of every hour."""
    lo, hi = MAX_CONCURRENCY
    if not lo <= max_concurrency <= hi:
        raise ConfigError(f"--max-concurrency {max_concurrency}: the KFP server takes {lo} to {hi}")
    fields = cron.split()
    if cron.strip() in CRON_DESCRIPTORS or (fields[:1] == ["@every"] and len(fields) == 2):
        return
    if len(fields) == 5:
        meaning = ", ".join(f"{what} {text}" for text, (what, *_) in zip(fields, CRON_FIELDS))
        raise ConfigError(f"--cron '{cron}': KFP reads six fields, seconds first, so this is {meaning}"
                          f"; for the five-field meaning (minute hour day month weekday) write '0 {cron}'")
    if len(fields) != 6:
        raise ConfigError(f"--cron '{cron}': expected six fields (second minute hour day-of-month month "
                          f"day-of-week), e.g. '0 0 3 * * *' for 03:00 every day, or one of {', '.join(CRON_DESCRIPTORS)}")
    try:
        for text, (what, low, high, names) in zip(fields, CRON_FIELDS):
            _cron_field(text, what, low, high, names)
    except ValueError as err:
        raise ConfigError(f"--cron '{cron}': {err}") from None


def schedule(client, name: str, cron: str, experiment: str, params: Params, version: str = "",
             max_concurrency: int = 1, catchup: bool = False, service_account: str = ""):
    """Create the recurring run `name`, or replace the one of that name (KFP cannot edit one in place).
    Returns (recurring run, whether one was replaced)."""
    check_schedule(cron, max_concurrency)
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
