"""python -m pipelines compile | run-local | schedule

    compile     write pipelines/finetune_pipeline.yaml (a test fails when it is stale)
    run-local   run the whole DAG on this machine through kfp.local; lightweight components run as
                subprocesses in this Python environment and log to the same MLflow store as DVC
    schedule    create a recurring run of the compiled pipeline on a Kubeflow Pipelines server
"""

import argparse
import sys
from pathlib import Path

from pipelines import finetune_pipeline as fp


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="write the compiled pipeline YAML")
    comp.add_argument("--out", type=Path, default=fp.COMPILED, help="where to write it")
    local = sub.add_parser("run-local", help="run the DAG on this machine through kfp.local")
    local.add_argument("--params", type=Path, default=fp.ROOT / "params.yaml", help="parameters file")
    local.add_argument("--pipeline-root", type=Path, default=fp.ROOT / "local_outputs",
                       help="where kfp.local keeps the artifacts")
    sched = sub.add_parser("schedule", help="recurring run on a Kubeflow Pipelines server")
    sched.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow")
    sched.add_argument("--cron", default="0 0 3 * * *", help="KFP cron (with seconds): daily at 03:00 by default")
    sched.add_argument("--name", default="finetune-nightly", help="recurring run name")
    sched.add_argument("--experiment", default="finetune", help="KFP experiment to file the runs under")
    sched.add_argument("--data-source", help="override the pipeline's data_source parameter")
    args = parser.parse_args(argv)
    if args.command == "compile":
        print(f"compiled {fp.compile_pipeline(args.out)}")
    elif args.command == "run-local":
        fp.run_local(args.params, args.pipeline_root)
    else:
        import kfp

        params = {"data_source": args.data_source} if args.data_source else {}
        job = fp.schedule(kfp.Client(host=args.host), args.cron, args.name, args.experiment, params=params)
        print(f"scheduled {args.name} ({args.cron}): recurring run {job.recurring_run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
