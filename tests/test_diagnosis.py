"""When validation loss will not fall: each cause constructed on small data, and the diagnosis naming it
(components/training/diagnosis.py), the per-layer statistics it reads (layer_stats.py) and the
learning-rate range test (lr_find.py)."""

import os

import mlflow
import numpy as np
import pytest
import torch

from components import finetune as finetune_step
from components.artifacts import model as model_artifact
from components.augment import augment
from components.data import prepare
from components.fetch_pretrained import fetch
from components.training import diagnosis, lr_find
from components.training.layer_stats import LayerStats, per_layer
from helpers import POLICY, data_cfg, finetune_cfg, make_imagefolder, policy_cfg, pretrained_cfg, save_checkpoint, \
    tracking_cfg

BALANCED = {"circle": 40, "square": 40, "triangle": 40}


def _inputs(tmp_path, counts):
    folder = make_imagefolder(tmp_path / "raw", counts)
    prepare(folder, tmp_path / "data", data_cfg(folder))
    augment(tmp_path / "data", tmp_path / "aug", policy_cfg(**POLICY))
    fetch(pretrained_cfg(save_checkpoint(tmp_path / "zoo.pt", "resnet18", ["w", "x", "y", "z"])), tmp_path / "pre")
    return tmp_path


def _diagnosed(tmp_path, counts, **changes) -> tuple[str, dict]:
    root = _inputs(tmp_path, counts)
    summary = finetune_step.finetune(root / "data", root / "aug", root / "pre", root / "model",
                                     finetune_cfg(**{"batch_size": 16, "max_epochs": 4, "patience": 4, **changes}))
    return summary["diagnosis"]["tag"], summary


# ---- each situation, constructed on small data --------------------------------------------------

def test_a_healthy_run_is_tagged_healthy(tmp_path):
    tag, summary = _diagnosed(tmp_path, BALANCED, lr=0.01)
    assert tag == "healthy", summary["diagnosis"]["findings"]
    assert summary["diagnosis"]["report"].startswith("# Diagnosis: healthy")


def test_a_rate_far_too_high_is_named_with_the_spike_and_a_lower_rate(tmp_path):
    tag, summary = _diagnosed(tmp_path, BALANCED, lr=0.5, max_epochs=6, patience=6)
    assert "lr_too_high" in tag.split(",")
    finding = next(f for f in summary["diagnosis"]["findings"] if f["name"] == "lr_too_high")
    assert "training loss" in finding["evidence"] and "finetune.lr: 0.5 -> 0.05" in finding["change"]


def test_too_few_images_is_named_with_the_class_and_its_count(tmp_path):
    tag, summary = _diagnosed(tmp_path, {"circle": 8, "square": 8, "triangle": 8}, lr=0.01, max_epochs=6,
                              patience=6)
    assert "too_few_images" in tag.split(",")
    finding = next(f for f in summary["diagnosis"]["findings"] if f["name"] == "too_few_images")
    assert "training images (fewer than 30)" in finding["evidence"]


def test_class_imbalance_names_the_smallest_class(tmp_path):
    tag, summary = _diagnosed(tmp_path, {"circle": 60, "square": 60, "triangle": 12}, lr=0.01)
    assert "class_imbalance" in tag.split(",")
    finding = next(f for f in summary["diagnosis"]["findings"] if f["name"] == "class_imbalance")
    assert "'triangle'" in finding["evidence"] and "add images of 'triangle'" in finding["change"]


def test_too_much_frozen_is_a_training_loss_stuck_near_chance(tmp_path):
    # everything but the new output layer frozen, two epochs: the training loss has barely left ln(3)
    tag, summary = _diagnosed(tmp_path, BALANCED, lr=0.01, freeze_until="fc", max_epochs=2, patience=2)
    assert "too_much_frozen" in tag.split(","), summary["diagnosis"]["findings"]
    finding = next(f for f in summary["diagnosis"]["findings"] if f["name"] == "too_much_frozen")
    assert "finetune.freeze_until: fc -> an earlier layer" == finding["change"]


def test_overfitting_is_validation_loss_rising_while_training_loss_falls(tmp_path):
    tag, summary = _diagnosed(tmp_path, {"circle": 8, "square": 8, "triangle": 8}, lr=0.01, max_epochs=6,
                              patience=6)
    assert "overfitting" in tag.split(","), summary["diagnosis"]["findings"]
    history = model_artifact.read_history(tmp_path / "model")
    best = min(history, key=lambda r: r["val_loss"])
    assert history[-1]["val_loss"] > best["val_loss"] and history[-1]["train_loss"] < best["train_loss"]


# ---- the rules, on curves written out ------------------------------------------------------------

def _rows(train, val, **extra):
    return [{"epoch": i + 1, "train_loss": t, "val_loss": v, **extra} for i, (t, v) in enumerate(zip(train, val))]


@pytest.mark.parametrize("train, val, counts, cfg, expected", [
    ([1.0, 0.5, 0.2, 0.1], [1.0, 0.6, 0.4, 0.3], {"a": 50, "b": 50}, {"lr": 0.01}, "healthy"),
    ([1.0, 0.3, 2.0, 0.8], [1.0, 0.6, 1.5, 0.9], {"a": 50, "b": 50}, {"lr": 0.01}, "lr_too_high"),  # a spike
    ([1.0, 1.1, 1.2, 1.3], [1.0, 1.1, 1.2, 1.3], {"a": 50, "b": 50}, {"lr": 0.01}, "lr_too_high"),  # rising
    ([1.0, 0.05, 0.1, 0.04], [1.0, 0.1, 0.1, 0.1], {"a": 50, "b": 50}, {"lr": 0.01}, "healthy"),  # small wobble
    ([0.69, 0.68, 0.67, 0.66], [0.69, 0.68, 0.68, 0.67], {"a": 50, "b": 50}, {"lr": 0.01, "freeze_until": "layer4"},
     "too_much_frozen"),
    ([0.69, 0.68, 0.67, 0.66], [0.69, 0.68, 0.68, 0.67], {"a": 50, "b": 50}, {"lr": 0.01}, "healthy"),  # none frozen
    ([1.0, 0.5, 0.2, 0.05], [1.0, 0.5, 0.7, 0.9], {"a": 50, "b": 50}, {"lr": 0.01}, "overfitting"),
    ([1.0, 0.5, 0.3, 0.2], [1.0, 0.8, 0.7, 0.65], {"a": 10, "b": 10}, {"lr": 0.01}, "too_few_images"),
    ([1.0, 0.5, 0.2, 0.1], [1.0, 0.6, 0.4, 0.3], {"a": 10, "b": 10}, {"lr": 0.01}, "healthy"),  # few, yet learnt
    ([1.0, 0.5, 0.2, 0.1], [1.0, 0.6, 0.4, 0.3], {"a": 200, "b": 40}, {"lr": 0.01}, "class_imbalance"),
])
def test_each_rule_names_its_cause_and_only_it(train, val, counts, cfg, expected):
    assert diagnosis.names(diagnosis.diagnose(_rows(train, val), counts, cfg)) == expected


def test_update_ratios_far_above_1e_3_are_a_rate_too_high_and_the_change_is_the_range_tests_rate():
    ratios = {"layer/fc/update_ratio": 1.5, "layer/layer4/update_ratio": 1e-3}  # a step larger than the weights
    found = diagnosis.diagnose(_rows([1.0, 0.6, 0.4], [1.0, 0.7, 0.5], **ratios), {"a": 50, "b": 50}, {"lr": 0.1},
                               lr_suggestion=0.004)
    assert [f.name for f in found] == ["lr_too_high"]
    assert "layer fc" in found[0].evidence and found[0].change == "finetune.lr: 0.1 -> 0.004 (the range test's suggestion)"
    # 0.3 with curves that fall smoothly (a new layer's first steps often move that much): evidence, not a finding
    calm = {"layer/fc/update_ratio": 0.3}
    assert diagnosis.diagnose(_rows([1.0, 0.6, 0.4], [1.0, 0.7, 0.5], **calm), {"a": 50, "b": 50}, {"lr": 0.1}) == []
    spiked = diagnosis.diagnose(_rows([1.0, 0.3, 2.0], [1.0, 0.7, 1.5], **calm), {"a": 50, "b": 50}, {"lr": 0.1})
    assert "training loss spiked" in spiked[0].evidence and "layer fc: update-to-weight ratio 0.3" in spiked[0].evidence


# ---- what backpropagation does to each layer ------------------------------------------------------

def test_layer_statistics_match_the_norms_computed_by_hand():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = LayerStats(model)
    loss = model(torch.randn(8, 4)).pow(2).mean()
    loss.backward()
    grad0 = torch.cat([model[0].weight.grad.flatten(), model[0].bias.grad.flatten()]).norm().item()
    before = torch.cat([model[0].weight.detach().flatten(), model[0].bias.detach().flatten()]).clone()
    stats.before_step()
    optimizer.step()
    stats.after_step()
    after = torch.cat([model[0].weight.detach().flatten(), model[0].bias.detach().flatten()])
    row = stats.epoch_metrics()
    assert row["layer/0/grad_norm"] == pytest.approx(grad0, rel=1e-5)
    assert row["layer/0/update_ratio"] == pytest.approx(((after - before).norm() / before.norm()).item(), rel=1e-5)
    assert row["layer/0/weight_norm"] == pytest.approx(after.norm().item(), rel=1e-5)
    assert set(per_layer(row, "update_ratio")) == {"0", "2"}  # the two Linear stages, by their names


# ---- the learning-rate range test ---------------------------------------------------------------

def test_the_suggestion_is_a_tenth_of_the_rate_at_the_lowest_loss_and_a_diverged_sweep_says_so():
    lrs = list(np.geomspace(1e-6, 1.0, 100))
    losses = [2.0 - 0.015 * i if i < 80 else 0.8 + 0.5 * (i - 80) for i in range(100)]
    suggestion, reason = lr_find.suggest(lrs, losses)
    assert suggestion == pytest.approx(lrs[80] / 10) and not reason  # the lowest: step 80
    assert lr_find.suggest(lrs[:5], losses[:5]) == (None, "the loss diverged after 5 of 100 steps: too few points "
                                                          "to read")


@pytest.mark.e2e
def test_lr_auto_runs_the_range_test_logs_it_and_the_diagnosis_is_on_the_mlflow_run(tmp_path):
    root = _inputs(tmp_path, BALANCED)
    summary = finetune_step.run(root / "data", root / "aug", root / "pre", root / "model",
                                finetune_cfg(lr="auto", batch_size=16, max_epochs=3, patience=3),
                                tracking_cfg("diagnosis-tests"), "test", "p-auto")
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(summary["run_id"])
    found = summary["lr_find"]
    assert 1e-6 < found["suggested_lr"] < 1.0 and found["steps"] > 20
    assert float(run.data.params["finetune.lr_found"]) == pytest.approx(found["suggested_lr"], rel=1e-5)
    history = model_artifact.read_history(root / "model")
    assert history[0]["lr"] == pytest.approx(found["suggested_lr"])  # the rate it trained with
    assert run.data.tags["diagnosis"] == summary["diagnosis"]["tag"]
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "finetune")}
    assert {"finetune/lr_find.png", "finetune/lr_find.json", "finetune/diagnosis.md"} <= artifacts
    assert any(k.startswith("layer/fc/update_ratio") for k in run.data.metrics)
    searched = client.search_runs([run.info.experiment_id], f"tags.diagnosis = '{run.data.tags['diagnosis']}'")
    assert [r.info.run_id for r in searched] == [run.info.run_id]  # runs are found by their diagnosis
