"""The Kubeflow DAG: the six steps of components/, as lightweight components on the project's image.

    python -m pipelines compile      # writes pipelines/finetune_pipeline.yaml
    python -m pipelines run-local    # runs this DAG on this machine through kfp.local

Each component body only unpacks Kubeflow's inputs, calls the step's function from components/
and describes the result for the Kubeflow UI. The defaults of every pipeline parameter are the
sections of params.yaml, baked in at compile time, so DVC and Kubeflow start from the same values.
(No `from __future__ import annotations` here: the KFP SDK reads the real type annotations.)
"""

from pathlib import Path

from kfp import dsl, kubernetes
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components.config import load_params

PARAMS = load_params(Path(__file__).resolve().parent.parent / "params.yaml")
IMAGE = PARAMS.pipeline.image
PIPELINE_NAME = "finetune-image-classifier"


def _defaults(section) -> dict:
    return section.model_dump(mode="json", by_alias=True)


# ---- components ---------------------------------------------------------------------------

@dsl.component(base_image=IMAGE, install_kfp_package=False)
def data_op(source: str, repo: str, rev: str, params: dict, dataset: Output[Dataset], report: Output[Markdown]):
    """Fetch (a folder, s3://, or a DVC-tracked path of `repo` at `rev`), validate and split the dataset."""
    from pathlib import Path

    from components.config import DataConfig, parse_section
    from components.data import prepare
    from pipelines.views import data_report_markdown

    cfg = parse_section(DataConfig, {**params, "source": source, "repo": repo, "rev": rev}, "data")
    result = prepare(source, dataset.path, cfg)
    dataset.metadata.update({"fingerprint": result["fingerprint"], "num_images": result["num_images"],
                             "classes": result["classes"], "source": result["source"]})
    Path(report.path).write_text(data_report_markdown(result))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def augment_op(dataset: Input[Dataset], params: dict, policy: Output[Artifact], preview: Output[HTML]):
    """Build the augmentation policy and its preview grid."""
    from pathlib import Path

    from components.augment import augment
    from components.config import AugmentConfig, parse_section
    from pipelines.views import png_html

    augment(dataset.path, policy.path, parse_section(AugmentConfig, params, "augment"))
    Path(preview.path).write_text(png_html("Augmentation: originals and draws of the policy",
                                           Path(policy.path) / "preview.png"))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def fetch_pretrained_op(params: dict, weights: Output[Model]):
    """Fetch, checksum and safely load the pretrained weights."""
    from components.config import PretrainedConfig, parse_section
    from components.fetch_pretrained import fetch

    info = fetch(parse_section(PretrainedConfig, params, "pretrained"), weights.path)
    weights.metadata.update({k: info[k] for k in ("uri", "sha256", "arch", "num_classes")})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finetune_op(dataset: Input[Dataset], policy: Input[Artifact], weights: Input[Model], params: dict,
                model: Output[Model], metrics: Output[Metrics], curves: Output[HTML]):
    """Fine-tune with frozen layers and early stopping on validation loss."""
    from pathlib import Path

    from components.config import FinetuneConfig, parse_section
    from components.finetune import finetune
    from pipelines.views import png_html

    summary = finetune(dataset.path, policy.path, weights.path, model.path,
                       parse_section(FinetuneConfig, params, "finetune"))
    model.metadata.update({"arch": summary["arch"], "best_epoch": summary["best_epoch"]})
    for key in ("best_epoch", "epochs_run", "best_val_loss", "best_val_accuracy"):
        metrics.log_metric(key, summary[key])
    Path(curves.path).write_text(png_html("Training curves", Path(model.path) / "training_curves.png"))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate_op(dataset: Input[Dataset], policy: Input[Artifact], weights: Input[Model], model: Input[Model],
                params: dict, register: dict, experiment: str, pipeline_run_id: str, reports: Output[Artifact],
                metrics: Output[Metrics], confusion: Output[ClassificationMetrics],
                decision: Output[Markdown], report: Output[HTML]) -> bool:
    """Test-split metrics and the gate against thresholds and the champion; logs the MLflow run.
    Returns whether the gate passed."""
    import json
    from pathlib import Path

    from components.config import RegisterConfig, ValidateConfig, parse_section
    from components.tracking import log_pipeline_run
    from components.validate import find_champion, validate
    from pipelines.views import gate_markdown, validation_html

    cfg = parse_section(ValidateConfig, params, "validate")
    champion = find_champion(parse_section(RegisterConfig, register, "register")) if cfg.compare_with_champion \
        else None
    gate = validate(dataset.path, model.path, reports.path, cfg, champion)
    run = log_pipeline_run(dataset.path, policy.path, weights.path, model.path, reports.path, experiment,
                           runner="kfp", pipeline_run_id=pipeline_run_id)
    result = json.loads((Path(reports.path) / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "min_class_recall", "ece"):
        metrics.log_metric(key, result[key])
    confusion.log_confusion_matrix(result["class_names"], result["confusion_matrix"])
    reports.metadata.update({"mlflow_run_id": run["run_id"], "passed": gate["passed"]})
    Path(decision.path).write_text(gate_markdown(gate, run))
    Path(report.path).write_text(validation_html(Path(reports.path)))
    return bool(gate["passed"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register_op(reports: Input[Artifact], params: dict, registration: Output[Artifact]) -> int:
    """Register the validated model and point the alias at it. Returns the version."""
    from components.config import RegisterConfig, parse_section
    from components.register import register

    result = register(reports.path, registration.path, parse_section(RegisterConfig, params, "register"))
    registration.metadata.update(result)
    return int(result["version"])


# ---- pipeline -----------------------------------------------------------------------------

def _with_credentials(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """MLflow's address from a ConfigMap; MLflow's, S3's and the DVC remote's credentials from a
    Secret. Never pipeline parameters, which the Kubeflow UI shows to anyone."""
    kubernetes.use_config_map_as_env(task, PARAMS.pipeline.mlflow_config_map,
                                     {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"})
    kubernetes.use_secret_as_env(task, PARAMS.pipeline.mlflow_secret, {
        "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
        "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
        "MLFLOW_S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL",
    }, optional=True)
    return task


@dsl.pipeline(name=PIPELINE_NAME, description="Fine-tune a pretrained image classifier; register it in "
              "MLflow when it passes validation.")
def finetune_pipeline(
    data_source: str = PARAMS.data.source,
    data_repo: str = PARAMS.data.repo,
    data_rev: str = PARAMS.data.rev,
    data: dict = _defaults(PARAMS.data),
    augment: dict = _defaults(PARAMS.augment),
    pretrained: dict = _defaults(PARAMS.pretrained),
    finetune: dict = _defaults(PARAMS.finetune),
    validate: dict = _defaults(PARAMS.gate),
    register: dict = _defaults(PARAMS.registry),
    experiment: str = PARAMS.tracking.experiment,
):
    data_task = _with_credentials(data_op(source=data_source, repo=data_repo, rev=data_rev, params=data))
    data_task.set_display_name("data")
    augment_task = augment_op(dataset=data_task.outputs["dataset"], params=augment).set_display_name("augment")
    fetch_task = _with_credentials(fetch_pretrained_op(params=pretrained)).set_display_name("fetch_pretrained")
    finetune_task = finetune_op(dataset=data_task.outputs["dataset"], policy=augment_task.outputs["policy"],
                                weights=fetch_task.outputs["weights"], params=finetune).set_display_name("finetune")
    finetune_task.set_cpu_request(PARAMS.pipeline.finetune_cpu).set_cpu_limit(PARAMS.pipeline.finetune_cpu)
    finetune_task.set_memory_request(PARAMS.pipeline.finetune_memory)
    finetune_task.set_memory_limit(PARAMS.pipeline.finetune_memory)
    if PARAMS.pipeline.finetune_gpus:
        finetune_task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(PARAMS.pipeline.finetune_gpus)
    # validate and register write to MLflow: never skip them as cache hits
    validate_task = _with_credentials(validate_op(
        dataset=data_task.outputs["dataset"], policy=augment_task.outputs["policy"],
        weights=fetch_task.outputs["weights"], model=finetune_task.outputs["model"], params=validate,
        register=register, experiment=experiment, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER))
    validate_task.set_display_name("validate").set_caching_options(False)
    with dsl.If(validate_task.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (a KFP condition)
        register_task = _with_credentials(register_op(reports=validate_task.outputs["reports"], params=register))
        register_task.set_display_name("register").set_caching_options(False)


# ---- compile, run locally, schedule -------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
COMPILED = ROOT / "pipelines" / "finetune_pipeline.yaml"


def compile_pipeline(out: Path = COMPILED) -> Path:
    from kfp import compiler

    compiler.Compiler().compile(finetune_pipeline, str(out))
    return out


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

    params = load_params(params_file)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlflow.db'}")  # the store DVC runs use
    pretrained = _defaults(params.pretrained)
    if "://" not in pretrained["uri"] or pretrained["uri"].startswith("file://"):
        pretrained["uri"] = _existing_path(pretrained["uri"].removeprefix("file://"), "pretrained.uri")
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    remote = params.data.repo or "://" in params.data.source
    return finetune_pipeline(
        data_source=params.data.source if remote else _existing_path(params.data.source, "data.source"),
        data_repo=params.data.repo, data_rev=params.data.rev, data=_defaults(params.data),
        augment=_defaults(params.augment), pretrained=pretrained, finetune=_defaults(params.finetune),
        validate=_defaults(params.gate), register=_defaults(params.registry), experiment=params.tracking.experiment)


def schedule(client, cron: str, job_name: str, experiment: str, package: Path = COMPILED,
             params: dict | None = None):
    """A recurring run of the compiled pipeline on a Kubeflow Pipelines server (`client`: kfp.Client)."""
    exp = client.create_experiment(name=experiment)
    return client.create_recurring_run(
        experiment_id=exp.experiment_id, job_name=job_name, cron_expression=cron,
        pipeline_package_path=str(package), params=params or {},
        max_concurrency=1,  # two trainings racing for the champion alias help nobody
        no_catchup=True)    # after downtime, run once, not once per missed slot
