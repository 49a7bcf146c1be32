"""The Kubeflow DAG: the steps of pipelines/dag.py, as lightweight components on the project's image.

    python -m pipelines generate     # writes dvc.yaml and pipelines/finetune_pipeline.yaml
    python -m pipelines run-local    # runs this DAG on this machine through kfp.local

Each component body only unpacks Kubeflow's inputs, calls the step's `run` (or core function) from
components/ and describes the result for the Kubeflow UI. The DAG is not written here: `make_pipeline`
walks pipelines/dag.py and wires each `<step>_op` by its argument names (an artifact from the step
that writes it, a pipeline parameter of the same name, or the run id). The pipeline's parameters
are the params.yaml sections the components take, with their values as defaults, baked in at
compile time, so DVC and Kubeflow start from the same values.
(No `from __future__ import annotations` here: the KFP SDK reads the real type annotations.)
"""

import inspect
from pathlib import Path
from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components.config import ConfigError, Params, load_params
from components.redaction import redact
from pipelines import image
from pipelines.dag import Step, producers, steps_for

ROOT = Path(__file__).resolve().parent.parent
PARAMS = load_params(ROOT / "params.yaml")
IMAGE = image.reference(PARAMS.pipeline.image)  # repository:code-<hash>, the tag `make image` builds
PIPELINE_NAME = "finetune-image-classifier"


def _defaults(section) -> dict:
    return section.model_dump(mode="json", by_alias=True)


# ---- components: each argument is an artifact of dag.ARTIFACTS, a value a step returns (dag.Step.values),
# a params.yaml section, or a run id

@dsl.component(base_image=IMAGE, install_kfp_package=False)
def resolve_op(data_source: str, data_repo: str, data_rev: str, data: dict, pretrained: dict) -> NamedTuple(
        "Resolved", data_version=str, pretrained_uri=str, pretrained_version=str):
    """Pin the dataset source and the pretrained URI to what they hold now (never cached)."""
    from components.storage.s3_env import adopt

    adopt()  # the task's S3 settings, under their usual names in this process only
    from components.config import DataConfig, PretrainedConfig, parse_section
    from components.resolve import resolve

    values = {**data, "source": data_source, "repo": data_repo, "rev": data_rev}
    resolved = resolve(parse_section(DataConfig, values, "data"),
                       parse_section(PretrainedConfig, pretrained, "pretrained"))
    return tuple(resolved[k] for k in ("data_version", "pretrained_uri", "pretrained_version"))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def data_op(data_source: str, data_repo: str, data_rev: str, data_version: str, data: dict,
            dataset: Output[Dataset], report: Output[Markdown]):
    """Fetch `data_version` of the source (a folder, s3://, or a DVC-tracked path of `repo`; for
    DVC, the commit `rev` pointed at when the run started), validate and split the dataset."""
    from components.storage.s3_env import adopt

    adopt()  # the task's S3 settings, under their usual names in this process only
    from pathlib import Path

    from components.config import DataConfig, parse_section
    from components.data import prepare
    from pipelines.views import data_report_markdown

    values = {**data, "source": data_source, "repo": data_repo, "rev": data_rev}
    result = prepare(data_source, dataset.path, parse_section(DataConfig, values, "data"), data_version)
    dataset.metadata.update({"fingerprint": result["fingerprint"], "num_images": result["num_images"],
                             "classes": result["classes"], "source": result["source"],
                             "source_version": data_version})
    Path(report.path).write_text(data_report_markdown(result))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def augment_op(dataset: Input[Dataset], augment: dict, policy: Output[Artifact], preview: Output[HTML]):
    """Build the augmentation policy and its preview grid."""
    from components.storage.s3_env import adopt

    adopt()  # the task's S3 settings, under their usual names in this process only
    from pathlib import Path

    from components.artifacts import policy as policy_artifact
    from components.augment import augment as build_policy
    from components.config import AugmentConfig, parse_section
    from pipelines.views import png_html

    build_policy(dataset.path, policy.path, parse_section(AugmentConfig, augment, "augment"))
    Path(preview.path).write_text(png_html("Augmentation: originals and draws of the policy",
                                           policy_artifact.preview(policy.path)))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def fetch_pretrained_op(pretrained: dict, pretrained_uri: str, pretrained_version: str, weights: Output[Model]):
    """Fetch `pretrained_uri` (immutable, from resolve), checksum and safely load the weights."""
    from components.storage.s3_env import adopt

    adopt()  # the task's S3 settings, under their usual names in this process only
    from components.config import PretrainedConfig, parse_section
    from components.fetch_pretrained import fetch

    cfg = parse_section(PretrainedConfig, {**pretrained, "uri": pretrained_uri}, "pretrained")
    info = fetch(cfg, weights.path, pretrained_version)
    weights.metadata.update({k: info[k] for k in ("uri", "sha256", "arch", "num_classes")})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finetune_op(dataset: Input[Dataset], policy: Input[Artifact], weights: Input[Model], finetune: dict,
                tracking: dict, model: Output[Model], metrics: Output[Metrics], curves: Output[HTML]):
    """Fine-tune with frozen layers and early stopping on validation loss, as a live MLflow run: in one
    process per GPU when the task has several (finetune.devices: auto). Checkpoints go to the namespace's
    claim (mounted at /checkpoints), so a retried pod resumes. No run id among the inputs: Kubeflow's cache key
    holds every input value, and this task is the one worth reusing; validate links the run."""
    from components.storage.s3_env import adopt

    adopt()  # the task's S3 settings, under their usual names in this process only
    import os
    from pathlib import Path

    from components import finetune as step
    from components.artifacts import model as model_artifact
    from components.config import FinetuneConfig, TrackingConfig, parse_section
    from pipelines.views import png_html

    cfg = parse_section(FinetuneConfig, finetune, "finetune")
    # on the cluster, on the claim mounted at CHECKPOINTS, a folder per content (runs of other inputs keep
    # theirs); elsewhere (kfp.local) where finetune.checkpoint_dir says
    if cfg.checkpoint_dir and os.path.ismount("/checkpoints"):
        key = step.run_key(dataset.path, policy.path, weights.path, cfg)
        cfg = cfg.model_copy(update={"checkpoint_dir": f"/checkpoints/{key[:16]}"})
    summary = step.run_data_parallel(dataset.path, policy.path, weights.path, model.path, cfg,
                                     parse_section(TrackingConfig, tracking, "tracking"), "kfp", "")
    model.metadata.update({"arch": summary["arch"], "best_epoch": summary["best_epoch"],
                           "mlflow_run_id": summary["run_id"]})
    for key in ("best_epoch", "epochs_run", "best_val_loss", "best_val_accuracy"):
        metrics.log_metric(key, summary[key])
    Path(curves.path).write_text(png_html("Training curves", model_artifact.curves(model.path)))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate_op(dataset: Input[Dataset], policy: Input[Artifact], weights: Input[Model], model: Input[Model],
                validate: dict, register: dict, tracking: dict, pipeline_run_id: str, reports: Output[Artifact],
                metrics: Output[Metrics], confusion: Output[ClassificationMetrics],
                decision: Output[Markdown], report: Output[HTML]) -> bool:
    """Test-split metrics and the gate against thresholds and the champion; completes the MLflow run.
    Returns whether the gate passed."""
    from components.storage.s3_env import adopt

    adopt()  # the task's S3 settings, under their usual names in this process only
    from pathlib import Path

    from components import validate as step
    from components.artifacts import reports as reports_artifact
    from components.config import RegisterConfig, TrackingConfig, ValidateConfig, parse_section
    from pipelines.views import gate_markdown, validation_html

    gate, run = step.run(dataset.path, policy.path, weights.path, model.path, reports.path,
                         parse_section(ValidateConfig, validate, "validate"),
                         parse_section(RegisterConfig, register, "register"),
                         parse_section(TrackingConfig, tracking, "tracking"), "kfp", pipeline_run_id)
    result = reports_artifact.read_metrics(reports.path)
    for key in ("accuracy", "macro_f1", "min_class_recall", "ece"):
        metrics.log_metric(key, result[key])
    confusion.log_confusion_matrix(result["class_names"], result["confusion_matrix"])
    reports.metadata.update({"mlflow_run_id": run.run_id, "passed": gate["passed"]})
    Path(decision.path).write_text(gate_markdown(gate, run))
    Path(report.path).write_text(validation_html(Path(reports.path)))
    return bool(gate["passed"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register_op(reports: Input[Artifact], register: dict, registration: Output[Artifact]) -> int:
    """Register the validated model and point the alias at it. Returns the version (0: none)."""
    from components.storage.s3_env import adopt

    adopt()  # the task's S3 settings, under their usual names in this process only
    from components.config import RegisterConfig, parse_section
    from components.register import register as register_model

    result = register_model(reports.path, registration.path, parse_section(RegisterConfig, register, "register"))
    registration.metadata.update(result)
    return int(result.get("version", 0))


OPS = {"resolve": resolve_op, "data": data_op, "augment": augment_op, "fetch_pretrained": fetch_pretrained_op,
       "finetune": finetune_op, "validate": validate_op, "register": register_op}
RUN_ID = "pipeline_run_id"  # a component argument that receives the Kubeflow run id


# ---- pipeline, built from pipelines/dag.py ------------------------------------------------

# The keys of the Secret pipeline.mlflow_secret, each the name of the variable it becomes.
SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


# ... and the variable each becomes in a task: AWS_* under another name, since KFP's launcher in the same
# container reads AWS_* for its own uploads (components/storage/s3_env.py gives them back their names)
TASK_ENV = {key: f"FINETUNE_{key}" if key.startswith("AWS_") else key for key in SECRET_KEYS}


def _with_credentials(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """MLflow's address from a ConfigMap; MLflow's, S3's and the DVC remote's credentials from a
    Secret. Never pipeline parameters, which the Kubeflow UI shows to anyone."""
    kubernetes.use_config_map_as_env(task, PARAMS.pipeline.mlflow_config_map,
                                     {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"})
    kubernetes.use_secret_as_env(task, PARAMS.pipeline.mlflow_secret, TASK_ENV, optional=True)
    return task


NETRC_DIR = "/var/run/secrets/finetune"   # pipeline.credentials_secret, mounted where the netrc is read
CHECKPOINTS = "/checkpoints"              # pipeline.checkpoint_volume's claim, on the fine-tune
RUN_AS = 10001                            # the image's user (infra/Dockerfile)


def retry_window_s(settings, backoff_s: int) -> int:
    """Argo measures a retry strategy's backoff.maxDuration from the first attempt's start, not per wait
    (argo-workflows v4.0.5, workflow/controller/operator.go:1028-1040): the window must hold every
    attempt at its timeout and every wait between them, or the last retries are never made."""
    return (settings.retries + 1) * settings.timeout_s + sum(backoff_s * 2 ** i for i in range(settings.retries))


def _configure(task: dsl.PipelineTask, step: Step, pipeline) -> None:
    """Name, caching and credentials from the declaration; size, timeout, retries and GPU scheduling
    from params.yaml's `pipeline` section; the restricted profile's identity on every pod."""
    task.set_display_name(step.name).set_caching_options(step.cache)
    kubernetes.set_security_context(task, run_as_user=RUN_AS, run_as_group=RUN_AS, run_as_non_root=True)
    # what the pipeline namespace's NetworkPolicy selects (infra/k8s/pipeline/network-policy.yaml)
    kubernetes.add_pod_label(task, "app.kubernetes.io/part-of", "finetune-pipeline")
    if step.credentials:
        _with_credentials(task)
        # logins for https weights and git repositories: a netrc file from an optional Secret (requests and
        # components/storage/sources.git_url read $NETRC), never a parameter
        kubernetes.use_secret_as_volume(task, pipeline.credentials_secret, NETRC_DIR, optional=True)
        task.set_env_variable("NETRC", f"{NETRC_DIR}/netrc")
    settings = pipeline.tasks[step.name]
    task.set_cpu_request(settings.cpu).set_cpu_limit(settings.cpu)
    task.set_memory_request(settings.memory).set_memory_limit(settings.memory)
    kubernetes.set_timeout(task, settings.timeout_s)
    if settings.retries:
        task.set_retry(settings.retries, backoff_duration=f"{pipeline.retry_backoff_s}s", backoff_factor=2,
                       backoff_max_duration=f"{retry_window_s(settings, pipeline.retry_backoff_s)}s")
    if step.gpu and pipeline.finetune_gpus:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(pipeline.finetune_gpus)
        for label, value in pipeline.gpu_node_selector.items():
            kubernetes.add_node_selector(task, label, value)
        for t in pipeline.gpu_tolerations:
            kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
        # one process per GPU (finetune.devices: auto): NCCL between them goes through /dev/shm, 64 MiB in a pod
        kubernetes.empty_dir_mount(task, "dshm", "/dev/shm", medium="Memory")  # nosec B108 - a pod's mount point


def _checkpoint_claim(task: dsl.PipelineTask, pipeline) -> None:
    """The namespace's checkpoint claim (infra/k8s/pipeline/checkpoint-claim.yaml), mounted at CHECKPOINTS. Argo
    retries a failed task in a new pod, which finds the last epoch there and resumes. One claim by name, not one
    per run (kfp-kubernetes' CreatePVC): the driver puts the mounted claims' names into the cache key
    (kubeflow/pipelines 2.17.0, backend/src/v2/driver/container.go:152-163), so a per-run name would retrain
    every run."""
    kubernetes.mount_pvc(task, pvc_name=pipeline.checkpoint_volume.claim, mount_path=CHECKPOINTS)


def pipeline_parameters(params=PARAMS) -> dict[str, object]:
    """Every pipeline parameter with its default: the components' non-artifact arguments, in order."""
    values = {"data_source": params.data.source, "data_repo": params.data.repo, "data_rev": params.data.rev,
              **{name: section for name, section in params.model_dump(mode="json", by_alias=True).items()}}
    made = producers()
    names = [name for step in steps_for("kubeflow", demo=False) for name in OPS[step.name].component_spec.inputs
             if name not in made and name != RUN_ID]
    return {name: values[name] for name in dict.fromkeys(names)}


def no_credentials(params: Params) -> Params:
    """`params`, unless a pipeline parameter would carry a credential, which the Kubeflow UI, the run's API
    object and every pod's arguments show to anyone who can see the run. Tokens for https
    weights and git repositories come from the Secret pipeline.credentials_secret instead (README)."""
    def walk(prefix: str, value):
        if isinstance(value, dict):
            for key, item in value.items():
                yield from walk(f"{prefix}.{key}" if prefix else key, item)
        elif isinstance(value, list):
            for item in value:
                yield from walk(prefix, item)
        elif isinstance(value, str):
            yield prefix, value

    for key, value in walk("", pipeline_parameters(params)):
        key = key.replace("data_", "data.", 1) if key.startswith("data_") else key  # the setting's own name
        if redact(value) != value:
            raise ConfigError(f"{key}: '{redact(value)}' carries a credential (user information or a token in the "
                              "URI), which would become a pipeline parameter anyone with access to Kubeflow can "
                              f"read: remove it and put it in the Secret {params.pipeline.credentials_secret} "
                              "as a netrc entry (README, \"Run on a cluster\")")
    return params


def make_pipeline(params=PARAMS):
    """The pipeline for `params` (params.yaml's values as defaults, its `pipeline` section applied)."""
    def build(*channels):
        values = dict(zip(pipeline_parameters(params), channels))
        writer, tasks = producers(), {}
        for step in steps_for("kubeflow", demo=False):
            op = OPS[step.name]
            kwargs = {name: tasks[writer[name].name].outputs[name] if name in writer
                      else dsl.PIPELINE_JOB_ID_PLACEHOLDER if name == RUN_ID else values[name]
                      for name in op.component_spec.inputs}
            if step.when:
                with dsl.If(tasks[step.when].outputs["Output"] == True, name=f"{step.when}-passed"):  # noqa: E712
                    task = op(**kwargs)
            else:
                task = op(**kwargs)
            _configure(task, step, params.pipeline)
            if step.name == "finetune" and params.finetune.checkpoint_dir:
                _checkpoint_claim(task, params.pipeline)
            tasks[step.name] = task

    build.__name__ = "finetune_pipeline"
    # KFP reads the parameters from the signature: one per params.yaml section the components take
    build.__signature__ = inspect.Signature([
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=type(default))
        for name, default in pipeline_parameters(params).items()])
    return dsl.pipeline(name=PIPELINE_NAME, description="Fine-tune a pretrained image classifier; "
                        "register it in MLflow when it passes validation.")(build)


finetune_pipeline = make_pipeline()


# ---- compile, run locally -------------------------------------------------------

COMPILED = ROOT / "pipelines" / "finetune_pipeline.yaml"


def compile_pipeline(out: Path = COMPILED, pipeline=finetune_pipeline) -> Path:
    from kfp import compiler

    compiler.Compiler().compile(pipeline, str(out))
    out.write_text(stable_header(out.read_text()))
    return out


def stable_header(text: str) -> str:
    """The compiled file with the dict defaults of its header comment in sorted order. KFP writes them in
    protobuf's map order (kfp 2.17.0, compiler/pipeline_spec_builder.py, the "# PIPELINE DEFINITION"
    comment), which changes from one process to the next; the spec below it is sorted already. So a
    `generate` that changes nothing changes no byte."""
    import ast
    import re

    def ordered(value):
        if isinstance(value, dict):
            return {k: ordered(value[k]) for k in sorted(value)}
        return [ordered(v) for v in value] if isinstance(value, list) else value

    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            break
        match = re.fullmatch(r"(#    \w+: dict \[Default: )(\{.*\})\]", line)
        if match:
            lines[i] = f"{match.group(1)}{ordered(ast.literal_eval(match.group(2)))}]"
    return "\n".join(lines)


def _existing_path(value: str, what: str) -> str:
    """Paths in params.yaml are relative to the repository; kfp.local needs them absolute."""
    path = Path(value) if Path(value).is_absolute() else ROOT / value
    if not path.exists():
        raise SystemExit(f"{what}: {path} does not exist (for the demo, run `make demo-inputs` first)")
    return str(path)


def run_local(params_file: Path, pipeline_root: Path):
    """Run the DAG with every section of `params_file` through kfp.local, in this Python environment."""
    import os

    import kfp.local

    from components.tracking.store import DEFAULT_STORE

    params = load_params(params_file)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / DEFAULT_STORE}")  # the store DVC runs use
    arguments = pipeline_parameters(params)
    uri = arguments["pretrained"]["uri"]
    if "://" not in uri or uri.startswith("file://"):
        arguments["pretrained"]["uri"] = _existing_path(uri.removeprefix("file://"), "pretrained.uri")
    if not (params.data.repo or "://" in params.data.source):
        arguments["data_source"] = _existing_path(params.data.source, "data.source")
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    return finetune_pipeline(**arguments)
