"""python -m pipelines compile | run-local

    compile     write the compiled pipeline spec (pipelines/finetune_pipeline.yaml by default)
    run-local   run the whole DAG on this machine through kfp.local (lightweight components run
                as subprocesses in this Python environment); same MLflow store as `dvc repro`
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPILED = ROOT / "pipelines" / "finetune_pipeline.yaml"


def compile_pipeline(out: Path = COMPILED) -> Path:
    from kfp import compiler

    from pipelines.finetune_pipeline import finetune_pipeline

    compiler.Compiler().compile(finetune_pipeline, str(out))
    return out


def _local_path(value: str, what: str) -> str:
    """Paths in params.yaml are relative to the repository; kfp.local needs them absolute."""
    path = Path(value) if Path(value).is_absolute() else ROOT / value
    if not path.exists():
        raise SystemExit(f"{what}: {path} does not exist (for the demo, run `make demo-inputs` first)")
    return str(path)


def run_local(params_file: Path, pipeline_root: Path) -> dict:
    """Run the DAG with every section of `params_file` through kfp.local; returns the task outputs."""
    import kfp.local

    from components.config import load_params
    from pipelines.finetune_pipeline import finetune_pipeline

    params = load_params(params_file)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlflow.db'}")
    pretrained = params.pretrained.model_dump(mode="json")
    if "://" not in pretrained["uri"] or pretrained["uri"].startswith("file://"):
        pretrained["uri"] = _local_path(pretrained["uri"].removeprefix("file://"), "pretrained.uri")
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    run = finetune_pipeline(
        data_source=_local_path(params.data.source, "data.source"),
        data=params.data.model_dump(mode="json"),
        augment=params.augment.model_dump(mode="json"),
        pretrained=pretrained,
        finetune=params.finetune.model_dump(mode="json"),
        validate=params.gate.model_dump(mode="json"),
        register=params.registry.model_dump(mode="json"),
        experiment=params.tracking.experiment,
    )
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="write the compiled pipeline YAML")
    comp.add_argument("--out", type=Path, default=COMPILED, help="where to write it")
    local = sub.add_parser("run-local", help="run the DAG on this machine through kfp.local")
    local.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="parameters file")
    local.add_argument("--pipeline-root", type=Path, default=ROOT / "local_outputs",
                       help="where kfp.local keeps the artifacts")
    args = parser.parse_args(argv)
    if args.command == "compile":
        print(f"compiled {compile_pipeline(args.out)}")
    else:
        run_local(args.params, args.pipeline_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
