"""finetune: pretrained backbone, new output layer, frozen layers, early stopping on validation loss.

    python -m components.finetune --params params.yaml --dataset data/prepared \
        --policy artifacts/augment --weights artifacts/pretrained --out artifacts/model

Freezing by name patterns and by depth, gradual unfreezing with its own learning rates,
discriminative learning rates, warm-up then a cosine or step schedule, and a checkpoint every
epoch: a run killed mid-epoch resumes from the last finished epoch and ends with the same weights
(components/training/). Writes the model artifact (components/artifacts/model.py): the best epoch's
weights with the class names, the preprocessing and the configuration that produced it, the history,
a summary and the training curves. Run as the pipeline runs it (`run`), the fine-tune is a live MLflow
run (components/tracking/runs.py): parameters when it starts, each epoch's metrics when it ends.
Devices, precision and data-parallel processes (finetune.devices): components/training/distributed.py;
`run_data_parallel` starts them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import joblib
import torch

from components.artifacts import dataset, model as model_artifact, policy as policy_artifact, weights
from components.artifacts.checkpoint import Checkpoint
from components.artifacts.lineage import training_inputs
from components.config import FinetuneConfig, TrackingConfig, load_params, parse_section
from components.models import architectures
from components.storage.atomic import atomic_file, read_json, write_json
from components.tracking import runs
from components.training import diagnosis, distributed, resume
from components.training.curves import save_curves
from components.training.loaders import make_loaders
from components.training.loop import TrainingError, fit, range_test
from components.training.lr_find import save_plot
from components.training.transforms import device_transform

__all__ = ["TrainingError", "finetune", "run", "run_data_parallel"]


def run_key(dataset_dir, augment_dir, pretrained_dir, cfg: FinetuneConfig) -> str:
    """What a checkpoint must match to be resumed: the data, policy, weights and settings."""
    parts = {"data": dataset.read_report(dataset_dir)["fingerprint"],
             "policy": policy_artifact.read_raw(augment_dir),
             "weights": weights.read_info(pretrained_dir)["sha256"],
             "config": cfg.model_dump(mode="json", exclude={"checkpoint_dir"})}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def pretrained_model(pretrained_dir, class_names: list[str], cfg: FinetuneConfig):
    """The fetched network with its weights, a new output layer where the old one cannot serve these
    classes, and finetune.reinit's modules started afresh. Returns (model, arch, replaced head or None,
    library)."""
    info, source = weights.read_info(pretrained_dir), weights.load(pretrained_dir)
    model = architectures.build(source.arch, info["num_classes"], source.library)
    architectures.load_weights(model, source.state_dict, source.arch)
    torch.manual_seed(cfg.seed)  # the new output layer's initial weights are part of the run's recipe
    # A new output layer when the old one cannot or should not be reused: another class
    # count, or known classes that differ (digits 0-4 -> 5-9 has 5 outputs either way).
    head = None
    source_classes = info.get("class_names")
    if info["num_classes"] != len(class_names) or (source_classes and source_classes != class_names):
        head = architectures.replace_head(model, len(class_names))
    if cfg.reinit:  # keep the generic lower layers, start the task-specific top afresh
        architectures.reinit(model, source.arch, cfg.reinit, source.library)
    return model, source.arch, head, source.library


def finetune(dataset_dir, augment_dir, pretrained_dir, out, cfg: FinetuneConfig, on_epoch=None,
             run_record=None, fabric=None, on_lr_found=None) -> dict:
    """Fine-tune the fetched weights on the dataset artifact; write the best model to `out`.

    `on_epoch` and `on_lr_found` are fit's callbacks; `run_record` (which MLflow run trained it) goes into
    `out`. Of data-parallel processes (`fabric`), only rank 0 writes. The summary holds the run's diagnosis
    (components/training/diagnosis.py) and, with finetune.lr auto, the range test's finding.
    """
    started = time.time()
    fabric = fabric or distributed.fabric_for(cfg)
    # a pod's CPU limit (joblib reads the cgroup quota), not the node's, shared by the processes on this node
    torch.set_num_threads(max(1, min(torch.get_num_threads(), joblib.cpu_count() // distributed.local_processes())))
    class_names = dataset.classes(dataset_dir)
    policy = policy_artifact.read(augment_dir)
    model, arch, head, library = pretrained_model(pretrained_dir, class_names, cfg)
    architectures.check_input(model, policy.image_size, arch)  # a size the network cannot take: now

    on_device = cfg.gpu_augment and fabric.device.type == "cuda"
    train_loader, val_loader = make_loaders(dataset_dir, policy, cfg, class_names, augment_on_device=on_device)
    found = []

    def lr_found(finding):
        found.append(finding)
        if on_lr_found:
            on_lr_found(finding)

    best_state, history, best_epoch = fit(model, train_loader, val_loader, cfg,
                                          run_key(dataset_dir, augment_dir, pretrained_dir, cfg), on_epoch, fabric,
                                          augment=device_transform(policy) if on_device else None,
                                          on_lr_found=lr_found)
    counts_per_class = Counter(image.label for image in dataset.images(dataset_dir, "train"))
    used = {**cfg.model_dump(mode="json"), "lr": found[0].suggestion if found else cfg.lr}
    findings = diagnosis.diagnose(history, dict(counts_per_class), used, found[0].suggestion if found else None)
    counts = architectures.parameter_counts(model)
    best = next(r for r in history if r["epoch"] == best_epoch)  # the saved epoch, whatever came after
    summary = {
        "library": library,
        "arch": arch,
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "best_val_accuracy": best["val_accuracy"],
        "epochs_run": len(history),
        "stopped_early": len(history) < cfg.max_epochs,
        "head_replaced": head,
        "parameters": {"trainable_at_start": history[0]["trainable_parameters"], **counts},
        "training_seconds": round(time.time() - started, 3),  # this process; a resumed run counts its part
        "device": fabric.device.type,
        "processes": fabric.world_size,
        "precision": distributed.precision(cfg.precision, fabric.device.type),
        "compile_seconds": next((r["compile_seconds"] for r in history if "compile_seconds" in r), None),
        "weights_sha256": architectures.weights_digest(best_state),  # register refuses a copy of a version
        "config": cfg.model_dump(mode="json"),
        "lr_find": found[0].summary() if found else None,
        "diagnosis": {"tag": diagnosis.names(findings), "findings": [asdict(f) for f in findings],
                      "report": diagnosis.report(findings)},
    }
    if fabric.global_rank != 0:  # rank 0 writes the model and ends the run
        return summary
    print(f"finetune: {arch}, {len(class_names)} classes, output layer "
          f"{'replaced: ' + head if head else 'kept'}; trainable parameters {history[0]['trainable_parameters']:,} "
          f"at the start, {counts['trainable']:,} of {counts['total']:,} at the end", file=sys.stderr)
    for line in [f.line() for f in findings] or [diagnosis.HEALTHY]:
        print(f"finetune: diagnosis: {line}", file=sys.stderr)
    preprocessing = {"image_size": policy.image_size, "mean": list(policy.mean), "std": list(policy.std)}
    model_artifact.write(out, Checkpoint(arch, class_names, best_state, preprocessing, cfg.model_dump(mode="json"),
                                         summary, library), history, summary, save_curves, run_record)
    if cfg.checkpoint_dir:
        resume.finished(cfg.checkpoint_dir)
    return summary


def lr_range_test(dataset_dir, augment_dir, pretrained_dir, cfg: FinetuneConfig, plot: str | Path) -> dict:
    """The learning-rate range test on the fine-tune's model and data, its plot at `plot`; no training."""
    fabric = distributed.fabric_for(cfg)
    class_names = dataset.classes(dataset_dir)
    policy = policy_artifact.read(augment_dir)
    model, arch, _, _ = pretrained_model(pretrained_dir, class_names, cfg)
    architectures.check_input(model, policy.image_size, arch)
    on_device = cfg.gpu_augment and fabric.device.type == "cuda"
    train_loader, val_loader = make_loaders(dataset_dir, policy, cfg, class_names, augment_on_device=on_device)
    finding = range_test(model, train_loader, val_loader, cfg, fabric,
                         augment=device_transform(policy) if on_device else None)
    if fabric.global_rank == 0:
        with atomic_file(plot) as tmp:
            save_plot(finding, tmp)
    return finding.summary()


def run(dataset_dir, augment_dir, pretrained_dir, out, cfg: FinetuneConfig, tracking_cfg: TrackingConfig,
        runner: str, pipeline_run_id: str, changes: list[str] | None = None) -> dict:
    """The step as DVC, Kubeflow and the tests run it: `finetune` inside a live MLflow run.
    `changes` (in a DVC experiment, the parameters changed from its baseline) lead the run's name."""
    fabric = distributed.fabric_for(cfg)
    if fabric.global_rank != 0:  # one MLflow run, the lead process's
        return finetune(dataset_dir, augment_dir, pretrained_dir, out, cfg, fabric=fabric)
    key = run_key(dataset_dir, augment_dir, pretrained_dir, cfg)
    inputs = training_inputs(dataset_dir, augment_dir, pretrained_dir, cfg.model_dump(mode="json"))
    with runs.training_run(inputs, tracking_cfg, runner, pipeline_run_id, changes,
                           resume_run_id=resume.interrupted_run(cfg.checkpoint_dir, key)) as live:
        if cfg.checkpoint_dir:
            resume.mark_run(cfg.checkpoint_dir, key, live.run_id)
        summary = finetune(dataset_dir, augment_dir, pretrained_dir, out, cfg, on_epoch=live.log_epoch,
                           run_record=live.record(), fabric=fabric, on_lr_found=live.log_lr_finding)
        runs.log_training_outputs(summary, model_artifact.record_files(out))
    return {**summary, "run_id": live.run_id}


def run_data_parallel(dataset_dir, augment_dir, pretrained_dir, out, cfg: FinetuneConfig,
                      tracking_cfg: TrackingConfig, runner: str, pipeline_run_id: str,
                      changes: list[str] | None = None) -> dict:
    """`run` in as many processes as finetune.devices asks for on this node, started as torchrun starts
    them (one: in this process). The processes read their arguments from a file and rank 0 writes its
    summary back beside it."""
    processes = distributed.processes_per_node(cfg)
    if processes == 1 or distributed.launched():
        return run(dataset_dir, augment_dir, pretrained_dir, out, cfg, tracking_cfg, runner, pipeline_run_id, changes)
    with tempfile.TemporaryDirectory(prefix="finetune-processes-") as tmp:
        spec = Path(tmp) / "arguments.json"
        write_json(spec, {"paths": [str(p) for p in (dataset_dir, augment_dir, pretrained_dir, out)],
                          "finetune": cfg.model_dump(mode="json"), "tracking": tracking_cfg.model_dump(mode="json"),
                          "runner": runner, "pipeline_run_id": pipeline_run_id, "changes": changes})
        distributed.launch(processes, ["-m", "components.finetune", "--process", str(spec)])
        return read_json(spec.with_name("rank-0-summary.json"))


def _process(spec: Path) -> int:
    """One of run_data_parallel's processes."""
    args = read_json(spec)
    summary = run(*args["paths"], parse_section(FinetuneConfig, args["finetune"], "finetune"),
                  parse_section(TrackingConfig, args["tracking"], "tracking"), args["runner"],
                  args["pipeline_run_id"], args["changes"])
    if "run_id" in summary:  # rank 0
        write_json(spec.with_name("rank-0-summary.json"), summary)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--process"]:
        return _process(Path(argv[1]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (sections: finetune, tracking)")
    parser.add_argument("--dataset", required=True, help="dataset artifact from components.data")
    parser.add_argument("--policy", required=True, help="policy folder from components.augment")
    parser.add_argument("--weights", required=True, help="weights folder from components.fetch_pretrained")
    parser.add_argument("--out", help="folder for model.pt, history.json, training_curves.png")
    parser.add_argument("--lr-find", metavar="PLOT", help="only the learning-rate range test: print its "
                                                          "suggestion, draw its plot here (a .png), train nothing")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if args.lr_find:
        found = lr_range_test(args.dataset, args.policy, args.weights, params.finetune, args.lr_find)
        print(f"finetune: range test plot: {args.lr_find}; set finetune.lr: {found['suggested_lr']:.3g} "
              "(or finetune.lr: auto, which runs the test before every fine-tune)")
        return 0
    if not args.out:
        parser.error("--out is required (or --lr-find PLOT)")
    summary = run_data_parallel(args.dataset, args.policy, args.weights, args.out, params.finetune, params.tracking,
                                *runs.runner_identity(), changes=runs.experiment_changes(args.params))
    if "run_id" not in summary:  # a process of a torchrun launch that is not rank 0
        return 0
    print(f"finetune: best epoch {summary['best_epoch']} of {summary['epochs_run']}, "
          f"val loss {summary['best_val_loss']:.4f}, val accuracy {summary['best_val_accuracy']:.3f}; "
          f"MLflow run {summary['run_id']}")
    return 0


if __name__ == "__main__":
    from components import cli

    cli.run_process(main)
