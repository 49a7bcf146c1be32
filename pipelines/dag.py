"""The pipeline, declared once: its steps, the artifacts between them, what each reads.

    python -m pipelines generate     # writes dvc.yaml and pipelines/finetune_pipeline.yaml from this

dvc.yaml (pipelines/dvc_yaml.py) and the Kubeflow DAG (pipelines/finetune_pipeline.py) are both
derived from STEPS; tests fail when either generated file is stale. A step's command line for DVC
is `python -m <module> [args] --<input> PATH ... --out PATH`; its Kubeflow component is
`<name>_op` in finetune_pipeline.py, wired by name: artifacts by the names below, pipeline
parameters by params.yaml section.
"""

from __future__ import annotations

from dataclasses import dataclass

from components.artifacts import model, policy, reports

# Artifacts by name: where DVC keeps them in the workspace. `cached: False` for outputs that name
# an MLflow run or registry version, which restoring them from DVC's cache would not bring back.
ARTIFACTS = {
    "dataset": "data/prepared",
    "policy": "artifacts/augment",
    "weights": "artifacts/pretrained",
    "model": "artifacts/model",
    "tracking_target": "artifacts/tracking.json",
    "reports": "artifacts/validate",
    "registration": "artifacts/registration.json",
}
UNCACHED = {"tracking_target", "reports", "registration"}


@dataclass(frozen=True)
class Step:
    name: str                           # DVC stage and Kubeflow task name
    module: str                         # what `python -m` runs
    inputs: tuple[str, ...] = ()        # artifacts passed to it, by name
    output: str = ""                    # the artifact it writes
    params: tuple[str, ...] = ()        # params.yaml keys whose change reruns it under DVC
    args: str = ""                      # fixed words after the module (a subcommand)
    depends_on: tuple[str, ...] = ()    # DVC: artifacts (by name) or paths it depends on without taking
                                        #   them as artifact arguments
    path_params: tuple[str, ...] = ()   # DVC: parameters naming what it reads: a dependency when a local
                                        #   path, else (s3://, a git repository) the stage always runs
    always_changed: bool = False        # DVC: runs every time (it resolves something outside the workspace)
    runners: tuple[str, ...] = ("dvc", "kubeflow")
    values: tuple[str, ...] = ()        # Kubeflow: parameters it returns; later steps take them by name
    cache: bool = True                  # Kubeflow: may a run reuse an earlier run's result
    when: str = ""                      # Kubeflow: runs only when this step's boolean output is true
    credentials: bool = False           # Kubeflow: MLflow address and MLflow/S3 credentials as env
    gpu: bool = False                   # Kubeflow: gets params.yaml's pipeline.finetune_gpus and GPU scheduling
    demo: bool = False                  # DEMO ONLY: generated only while params.yaml has `demo`
    outs: tuple[str, ...] = ()          # DVC: what a demo stage writes (it has no artifact of the six)
    headline: str = ""                  # DVC: also its headline figures in this git-tracked file (the metrics)
    plots: str = ""                     # DVC: also what the plots draw of its output, in this cached folder


STEPS = (
    # ---- DEMO ONLY: the default's data and source checkpoint, made offline from scikit-learn's digits.
    Step("demo_digits", "demo.digits", args="data/raw/digits-0-4 data/raw/digits-5-9",
         params=("demo.source_classes", "demo.target_classes"), runners=("dvc",), demo=True,
         outs=("data/raw/digits-0-4", "data/raw/digits-5-9")),
    Step("demo_zoo", "demo.zoo", args="data/raw/digits-0-4 zoo/resnet18-digits-0-4.pt",
         params=("demo",), runners=("dvc",), demo=True, depends_on=("data/raw/digits-0-4",),
         outs=("zoo/resnet18-digits-0-4.pt",)),
    # ---- Kubeflow only: moving inputs (an S3 prefix, a git branch, a registry alias) pinned to
    # immutable values that the steps after it take as inputs, so Kubeflow's cache follows content.
    # DVC needs no such step: it hashes local dependencies itself, and a stage reading a remote
    # source always runs.
    Step("resolve", "components.resolve", params=("data", "pretrained"), runners=("kubeflow",), cache=False,
         credentials=True, values=("data_version", "pretrained_uri", "pretrained_version")),
    # ---- the six steps
    Step("data", "components.data", output="dataset", params=("data",), path_params=("data.source",), credentials=True),
    Step("augment", "components.augment", inputs=("dataset",), output="policy", params=("augment",), credentials=True),
    Step("fetch_pretrained", "components.fetch_pretrained", output="weights", params=("pretrained",),
         path_params=("pretrained.uri",), credentials=True),
    Step("finetune", "components.finetune", inputs=("dataset", "policy", "weights"), output="model", params=("finetune",),
         credentials=True, gpu=True),
    Step("tracking", "components.tracking", args="target", output="tracking_target", params=("tracking",),
         always_changed=True, runners=("dvc",)),
    Step("validate", "components.validate", inputs=("dataset", "policy", "weights", "model"), output="reports",
         params=("validate", "register.model_name", "register.alias"), depends_on=("tracking_target",),
         cache=False, credentials=True, headline="metrics/headline.json",
         plots="artifacts/plots"),
    Step("register", "components.register", inputs=("reports",), output="registration", params=("register",),
         cache=False, when="validate", credentials=True),
)



def _in(artifact: str, name: str) -> str:
    """A file of an artifact in the DVC workspace (its name from the artifact's module)."""
    return f"{ARTIFACTS[artifact]}/{name}"


def _plotted(name: str) -> str:
    """A reports file as DVC's plots read it: from the cached copy (Step.plots), which experiments keep."""
    return f"{next(s.plots for s in STEPS if s.plots)}/{name}"


# DVC metrics and plots (`dvc metrics show`, `dvc plots show`), from the artifacts above. The metrics are the
# headline file git keeps, so every experiment commit has them (`dvc exp show`, `dvc metrics diff`).
METRICS = tuple(s.headline for s in STEPS if s.headline)
PLOTS = (
    {"loss": {"template": "linear", "x": "epoch", "y": {_in("model", model.HISTORY): ["train_loss", "val_loss"]}}},
    {"accuracy": {"template": "linear", "x": "epoch",
                  "y": {_in("model", model.HISTORY): ["train_accuracy", "val_accuracy"]}}},
    {"confusion": {"template": "confusion", "x": "actual", "y": {_plotted(reports.PREDICTIONS): "predicted"}}},
    {"calibration": {"template": "simple", "x": "confidence", "y": {_plotted(reports.CALIBRATION): "accuracy"}}},
    *(_plotted(name) for _, name in reports.PICTURES),
    _in("policy", policy.PREVIEW),
    _in("model", model.CURVES),
)


def steps_for(runner: str, demo: bool) -> list[Step]:
    return [s for s in STEPS if runner in s.runners and (demo or not s.demo)]


def producers() -> dict[str, Step]:
    """The step that writes each artifact or returns each value."""
    return {name: s for s in STEPS for name in (s.output, *s.values) if name}
