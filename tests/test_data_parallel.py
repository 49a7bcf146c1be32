"""Data-parallel fine-tuning (finetune.devices): two CPU processes (gloo) started as torchrun starts them
train the model a single process trains, and only rank 0 writes files or talks to MLflow.

A real run of `python -m components.finetune` each time. What every process opens for writing is
recorded by an audit hook (sitecustomize.py on PYTHONPATH: Python's own `open` audit events), which is
how the test sees that rank 1 wrote nothing but its own frozen-layer features."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from helpers import PLAIN_TRAINING, ROOT

SPY = '''
import os, sys
if os.environ.get("WRITES_LOG"):
    _log = open(os.path.join(os.environ["WRITES_LOG"], f"{os.environ.get('RANK', 'launcher')}-{os.getpid()}"), "a",
                buffering=1)
    def _writes(event, args):
        if event == "open" and not isinstance(args[0], int):
            mode, flags = args[1] or "", args[2] or 0
            if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR):
                _log.write(os.fsdecode(args[0]) + "\\n")
        elif event in ("os.rename", "os.replace"):
            _log.write(os.fsdecode(args[1]) + "\\n")
        elif event == "sqlite3.connect":
            _log.write(f"sqlite:{args[0]}\\n")
    sys.addaudithook(_writes)
'''

# Trained at first: the output layer only; from epoch 2 also layer4.1's second convolution (its BatchNorm
# stays frozen): no BatchNorm in training mode, whose batch statistics would differ between one batch
# and two halves of it, and an unfreeze after DDP has wrapped the module.
SETTINGS = {**PLAIN_TRAINING, "freeze_until": "fc", "unfreeze": [{"epoch": 2, "modules": ["layer4.1.conv2"]}],
            "batch_size": 16, "max_epochs": 3, "patience": 3, "lr": 0.01, "channels_last": True}


def _run(artifacts: Path, tmp_path: Path, name: str, devices: int, policy: Path, expect: int = 0,
         **changes) -> tuple[Path, dict]:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["finetune"].update(SETTINGS, devices=devices, checkpoint_dir=str(tmp_path / f"ckpt-{name}"), **changes)
    raw["tracking"].update(experiment=f"dp-{name}", system_metrics=False)
    params = tmp_path / f"params-{name}.yaml"
    params.write_text(yaml.safe_dump(raw))
    spy, writes = tmp_path / "spy", tmp_path / f"writes-{name}"
    spy.mkdir(exist_ok=True)
    writes.mkdir()
    (spy / "sitecustomize.py").write_text(SPY)
    out = tmp_path / f"model-{name}"
    env = {**os.environ, "PYTHONPATH": str(spy), "WRITES_LOG": str(writes)}
    proc = subprocess.run([sys.executable, "-m", "components.finetune", "--params", str(params),
                           "--dataset", str(artifacts / "data"), "--policy", str(policy),
                           "--weights", str(artifacts / "pre"), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stderr[-3000:]
    if expect:
        return out, proc.stderr
    return out, {f.name.split("-")[0]: f.read_text().split() for f in writes.iterdir()}


@pytest.mark.parametrize("prefix_cache", [True, False], ids=["cached-prefix", "whole-model"])
def test_two_gloo_processes_train_what_one_process_trains_and_only_rank_0_writes(artifacts, tmp_path, prefix_cache):
    # A random augmentation policy: every image draws from a seed of its own (components/training/loaders.py),
    # so a process augmenting its share of a batch makes the images the single process makes.
    policy = artifacts / "aug"
    one, _ = _run(artifacts, tmp_path, "one", 1, policy, prefix_cache=prefix_cache)
    two, writes = _run(artifacts, tmp_path, "two", 2, policy, prefix_cache=prefix_cache)

    # The same result within float tolerance: each process's half of every batch, gradients averaged.
    h1, h2 = (json.loads((d / "history.json").read_text()) for d in (one, two))
    assert [r["val_loss"] for r in h2] == pytest.approx([r["val_loss"] for r in h1], rel=1e-4)
    assert [r["train_loss"] for r in h2] == pytest.approx([r["train_loss"] for r in h1], rel=1e-4)
    w1, w2 = (torch.load(d / "model.pt", weights_only=True)["state_dict"] for d in (one, two))
    for key in ("fc.weight", "layer4.1.conv2.weight"):
        assert torch.allclose(w1[key], w2[key], atol=1e-5), key
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["device"] == "cpu"

    # Rank 0 wrote the model, the checkpoints and the MLflow run; rank 1 only its own feature files (if any).
    assert set(writes) == {"launcher", "0", "1"}
    assert any(p.startswith(str(two)) or "/.model-two.tmp-" in p for p in writes["0"])
    assert any(p.startswith("sqlite:") for p in writes["0"])
    stray = [p for p in writes["1"] if "/.prefix-cache.tmp-" not in p and p != "/dev/null"]
    assert stray == [], stray
    assert not [p for p in writes["launcher"] if p.startswith("sqlite:") or str(two) in p]

    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("dp-two").experiment_id])
    assert len(runs) == 1
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss")] == [1, 2, 3]


def test_a_process_that_fails_stops_the_others_and_the_step_exits_with_its_code(artifacts, tmp_path):
    out, stderr = _run(artifacts, tmp_path, "diverged", 2, artifacts / "aug", expect=5, lr=1e12)
    assert "training diverged; nothing is written as the model" in stderr
    assert re.search(r"finetune: error: data-parallel process [01] of 2 exited with 5 \(its error is above\)",
                     stderr)
    assert "Traceback" not in stderr and not out.exists()
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("dp-diverged").experiment_id])
    assert len(runs) == 1 and runs[0].info.status in ("FAILED", "KILLED")  # failed, or stopped as rank 1 failed


def test_auto_devices_is_one_process_per_visible_gpu_and_one_on_a_cpu(monkeypatch):
    # No GPU on this machine: torch's CUDA queries are replaced to stand for a pod with 4 (a mock, by need).
    from components.training import distributed
    from helpers import finetune_cfg

    assert distributed.processes_per_node(finetune_cfg(devices="auto")) == 1
    assert distributed.processes_per_node(finetune_cfg(devices=2)) == 2  # CPU processes on request (as above)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.processes_per_node(finetune_cfg(devices="auto")) == 4
    with pytest.raises(distributed.ConfigError, match="finetune.devices: 8 processes asked for, 4 GPUs visible"):
        distributed.processes_per_node(finetune_cfg(devices=8))


def test_synchronised_batchnorm_on_cpu_processes_is_refused_before_any_starts(artifacts, tmp_path):
    """PyTorch's SyncBatchNorm reduces statistics between GPUs only (torch/nn/modules/batchnorm.py,
    SyncBatchNorm.forward); on CPU processes the setting is a configuration error, not a crash in epoch 1.
    (Where GPUs are, it converts the trained BatchNorm layers: no GPU here to run that.)"""
    _, stderr = _run(artifacts, tmp_path, "sync", 2, artifacts / "aug", expect=2, sync_batchnorm=True)
    assert stderr.strip().splitlines()[-1] == (
        "finetune: error: finetune.sync_batchnorm: synchronised BatchNorm needs GPUs; these 2 processes run on "
        "CPUs, where each normalises its share of the batch (set it to false)")
    assert "data-parallel processes" not in stderr  # refused before the launcher started any


@pytest.fixture
def timm_inputs(artifacts, imagenet_zoo, tmp_path) -> Path:
    """The demo's data and policy with real ImageNet weights of timm's efficientnet_lite0 as the pretrained
    model."""
    from components.fetch_pretrained import fetch
    from helpers import pretrained_cfg

    inputs = tmp_path / "timm-inputs"
    inputs.mkdir()
    for name in ("data", "aug"):
        (inputs / name).symlink_to(artifacts / name)
    fetch(pretrained_cfg(f"timm://efficientnet_lite0?weights={imagenet_zoo}", library="timm",
                         arch="efficientnet_lite0"), inputs / "pre")
    return inputs


def test_two_gloo_processes_fine_tune_a_timm_network_as_one_process_does(timm_inputs, tmp_path):
    """Data parallelism and the frozen-prefix cache with a timm network: real ImageNet weights of
    efficientnet_lite0, at a small size, all but its new output layer frozen (BatchNorm in training mode
    would normalise each process's half of a batch, not the whole)."""
    settings = dict(freeze_until="classifier", unfreeze=[], prefix_cache=True)
    one, _ = _run(timm_inputs, tmp_path, "timm-one", 1, timm_inputs / "aug", **settings)
    two, _ = _run(timm_inputs, tmp_path, "timm-two", 2, timm_inputs / "aug", **settings)
    h1, h2 = (json.loads((d / "history.json").read_text()) for d in (one, two))
    assert [r["val_loss"] for r in h2] == pytest.approx([r["val_loss"] for r in h1], rel=1e-3)
    w1, w2 = (torch.load(d / "model.pt", weights_only=True) for d in (one, two))
    assert w1["library"] == "timm" and w1["arch"] == "efficientnet_lite0"
    assert torch.allclose(w1["state_dict"]["classifier.weight"], w2["state_dict"]["classifier.weight"], atol=1e-4)


def test_two_processes_find_the_rate_one_process_finds_and_train_with_it(artifacts, tmp_path):
    """finetune.lr auto: each process sweeps its half of every batch and reads the mean loss, so both stop
    at the same step (one stopping alone would leave the other waiting in a gradient reduction) and find the
    rate one process finds on whole batches."""
    one, _ = _run(artifacts, tmp_path, "one", 1, artifacts / "aug", lr="auto")
    two, _ = _run(artifacts, tmp_path, "two", 2, artifacts / "aug", lr="auto")
    f1, f2 = (json.loads((d / "summary.json").read_text())["lr_find"] for d in (one, two))
    assert f2["steps"] == f1["steps"] and f2["suggested_lr"] == pytest.approx(f1["suggested_lr"], rel=1e-9)
    h1, h2 = (json.loads((d / "history.json").read_text()) for d in (one, two))
    assert [r["lr"] for r in h2] == [r["lr"] for r in h1]
    assert [r["val_loss"] for r in h2] == pytest.approx([r["val_loss"] for r in h1], rel=1e-4)


def test_a_timm_network_on_two_processes_gets_the_range_test_layer_statistics_and_a_diagnosis(timm_inputs, tmp_path):
    """finetune.lr auto, the per-layer statistics and the diagnosis with a timm model (its stages are
    timm's blocks, not torchvision's layers) across two processes: the rate one process finds, the
    statistics of the stage that trains, and the diagnosis on the summary and the MLflow run. Only the
    new output layer trains: BatchNorm in training mode would normalise each process's half of a batch."""
    settings = dict(freeze_until="classifier", unfreeze=[], prefix_cache=True, lr="auto", max_epochs=2, patience=2)
    one, _ = _run(timm_inputs, tmp_path, "timm-auto-one", 1, timm_inputs / "aug", **settings)
    two, _ = _run(timm_inputs, tmp_path, "timm-auto-two", 2, timm_inputs / "aug", **settings)
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s2["lr_find"]["suggested_lr"] == pytest.approx(s1["lr_find"]["suggested_lr"], rel=1e-6)
    assert 1e-6 < s2["lr_find"]["suggested_lr"] < 1
    history = json.loads((two / "history.json").read_text())
    assert {key.split("/")[1] for key in history[-1] if key.startswith("layer/")} == {"classifier"}
    assert 0 < history[-1]["layer/classifier/update_ratio"] and history[-1]["layer/classifier/grad_norm"] > 0
    tag = s2["diagnosis"]["tag"]
    assert tag and set(tag.split(",")) <= {"healthy", "lr_too_high", "too_few_images", "too_much_frozen",
                                           "overfitting", "class_imbalance"}
    client = mlflow.MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("dp-timm-auto-two").experiment_id])[0]
    assert run.data.tags["diagnosis"] == tag
    assert float(run.data.params["finetune.lr_found"]) == pytest.approx(s2["lr_find"]["suggested_lr"], rel=1e-5)
