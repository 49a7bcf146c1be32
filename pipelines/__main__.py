"""python -m pipelines generate | run-local | init | schedule

    generate    write dvc.yaml and pipelines/finetune_pipeline.yaml from pipelines/dag.py and params.yaml
                (tests fail when either is stale)
    run-local   run the whole Kubeflow DAG on this machine through kfp.local; lightweight components run
                as subprocesses in this Python environment and log to the same MLflow store as DVC
    init        turn the demo into your project: your images, your pretrained weights (pipelines/own_data.py)
    schedule    create a recurring run of the compiled pipeline on a Kubeflow Pipelines server
"""

import argparse
import sys
from pathlib import Path

from pipelines import dvc_yaml
from pipelines import finetune_pipeline as fp


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write dvc.yaml and the compiled Kubeflow pipeline")
    gen.add_argument("--dvc-yaml", type=Path, default=dvc_yaml.DVC_YAML, help="where to write dvc.yaml")
    gen.add_argument("--compiled", type=Path, default=fp.COMPILED, help="where to write the Kubeflow YAML")
    local = sub.add_parser("run-local", help="run the DAG on this machine through kfp.local")
    local.add_argument("--params", type=Path, default=fp.ROOT / "params.yaml", help="parameters file")
    local.add_argument("--pipeline-root", type=Path, default=fp.ROOT / "local_outputs",
                       help="where kfp.local keeps the artifacts")
    init = sub.add_parser("init", help="point params.yaml at your images and pretrained weights")
    init.add_argument("--data", required=True, help="ImageFolder of your images: a folder or s3://bucket/prefix")
    init.add_argument("--weights", required=True,
                      help="pretrained URI, e.g. torchvision://resnet50?weights=IMAGENET1K_V2")
    init.add_argument("--arch", help="torchvision architecture (read from a torchvision:// URI when omitted)")
    init.add_argument("--name", help="registered model and experiment name (default: <data folder>-<arch>)")
    init.add_argument("--sha256", default="", help="pin of the weights file (required for https://)")
    sched = sub.add_parser("schedule", help="recurring run on a Kubeflow Pipelines server")
    sched.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow")
    sched.add_argument("--cron", default="0 0 3 * * *", help="KFP cron (with seconds): daily at 03:00 by default")
    sched.add_argument("--name", default="finetune-nightly", help="recurring run name")
    sched.add_argument("--experiment", default="finetune", help="KFP experiment to file the runs under")
    sched.add_argument("--data-source", help="override the pipeline's data_source parameter")
    args = parser.parse_args(argv)
    if args.command == "generate":
        print(f"generated {dvc_yaml.write(fp.PARAMS, args.dvc_yaml)} and {fp.compile_pipeline(args.compiled)}")
    elif args.command == "run-local":
        fp.run_local(args.params, args.pipeline_root)
    elif args.command == "init":
        return _init(args)
    else:
        import kfp

        params = {"data_source": args.data_source} if args.data_source else {}
        job = fp.schedule(kfp.Client(host=args.host), args.cron, args.name, args.experiment, params=params)
        print(f"scheduled {args.name} ({args.cron}): recurring run {job.recurring_run_id}")
    return 0


def _init(args) -> int:
    import subprocess

    from components.config import ConfigError
    from pipelines.own_data import init

    try:
        changes = init(args.data, args.weights, args.arch, args.name, args.sha256)
    except ConfigError as err:
        print(f"init: {err}", file=sys.stderr)
        return 2
    for key, value in changes.items():
        print(f"init: {key} = {value}")
    # the generated files follow params.yaml, which this process read before the change: regenerate afresh
    subprocess.run([sys.executable, "-m", "pipelines", "generate"], cwd=fp.ROOT, check=True)
    print("init: next: `make run` (fine-tunes on your images; `dvc add` the folder to version it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
