import json

import pytest
import torch
from torch import nn

from components.models import architectures as models
from components.config import ConfigError
from components.fetch_pretrained import fetch
from components.finetune import finetune
from components.training.loaders import make_loaders
from components.training.loop import predict
from helpers import POLICY as POLICY_VALUES
from helpers import finetune_cfg, policy_cfg, pretrained_cfg
from helpers import save_checkpoint

POLICY = policy_cfg(**POLICY_VALUES)
FAST = finetune_cfg(freeze=["conv1", "bn1", "layer1"], lr=0.01, batch_size=16, max_epochs=2, patience=2)


def _bn_stats(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefix) and ("running" in k or "num_batches" in k)}


def test_frozen_layers_and_frozen_batchnorm_statistics_stay_bit_identical(artifacts):
    before = torch.load(artifacts / "pre" / "weights.pt", weights_only=True)["state_dict"]
    summary = finetune(artifacts / "data", artifacts / "aug", artifacts / "pre", artifacts / "model", FAST)
    after = torch.load(artifacts / "model" / "model.pt", weights_only=True)["state_dict"]
    for prefix in ("conv1.", "bn1.", "layer1."):
        for key in (k for k in before if k.startswith(prefix)):
            assert torch.equal(before[key], after[key]), key
    assert _bn_stats(before, "bn1.") and all(torch.equal(before[k], after[k]) for k in _bn_stats(before, "bn1."))
    # trainable layers did move, and their BatchNorm statistics too
    assert not torch.equal(before["layer4.1.conv2.weight"], after["layer4.1.conv2.weight"])
    assert not torch.equal(before["layer4.1.bn2.running_mean"], after["layer4.1.bn2.running_mean"])
    assert summary["parameters"]["frozen"] > 0 and summary["parameters"]["trainable"] > 0


def test_output_layer_is_replaced_when_the_class_count_differs(artifacts):
    summary = finetune(artifacts / "data", artifacts / "aug", artifacts / "pre", artifacts / "model", FAST)
    ckpt = torch.load(artifacts / "model" / "model.pt", weights_only=True)
    assert summary["head_replaced"] == "fc"
    assert ckpt["state_dict"]["fc.weight"].shape == (3, 512)
    assert ckpt["class_names"] == ["circle", "square", "triangle"]
    assert ckpt["preprocessing"] == {"image_size": 16, "mean": list(POLICY.mean), "std": list(POLICY.std)}
    assert (artifacts / "model" / "training_curves.png").stat().st_size > 0


def test_output_layer_is_kept_when_the_classes_are_the_same(artifacts, tmp_path):
    zoo = save_checkpoint(tmp_path / "same.pt", "resnet18", ["circle", "square", "triangle"])
    fetch(pretrained_cfg(uri=str(zoo), arch="resnet18"), tmp_path / "pre-same")
    head = torch.load(zoo, weights_only=True)["state_dict"]["fc.weight"]
    summary = finetune(artifacts / "data", artifacts / "aug", tmp_path / "pre-same", tmp_path / "model",
                       FAST.model_copy(update={"freeze": ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"],
                                               "max_epochs": 1, "lr": 1e-9}))
    assert summary["head_replaced"] is None
    after = torch.load(tmp_path / "model" / "model.pt", weights_only=True)["state_dict"]["fc.weight"]
    assert torch.allclose(after, head, atol=1e-6)  # started from the old head, not a fresh one


def _best_by_definition(history: list[dict], min_delta: float) -> int:
    """The epoch early stopping must call best: the last whose validation loss beat the best before it
    by more than min_delta (written out here, independently of the trainer's code)."""
    best_loss, best_epoch = float("inf"), 0
    for row in history:
        if row["val_loss"] < best_loss - min_delta:
            best_loss, best_epoch = row["val_loss"], row["epoch"]
    return best_epoch


def test_the_reported_best_epoch_is_the_saved_epoch_when_a_later_epoch_improves_by_less_than_min_delta(
        artifacts, tmp_path):
    cfg = FAST.model_copy(update={"freeze": [], "lr": 0.003, "max_epochs": 6, "patience": 6, "min_delta": 0.0})
    free = finetune(artifacts / "data", artifacts / "aug", artifacts / "pre", tmp_path / "free", cfg)
    history = json.loads((tmp_path / "free" / "history.json").read_text())
    lowest = min(history, key=lambda r: r["val_loss"])
    assert lowest["epoch"] > 1 and free["best_epoch"] == lowest["epoch"]
    # The smallest min_delta under which the lowest epoch no longer counts as best: the same training
    # (patience covers every epoch), but some improvement is now smaller than min_delta. Candidates lie
    # midway between the improvements one epoch makes over another, so no comparison is a near tie.
    gaps = sorted({a["val_loss"] - b["val_loss"] for a in history for b in history if a["val_loss"] > b["val_loss"]})
    candidates = [(lo + hi) / 2 for lo, hi in zip(gaps, gaps[1:] + [2 * gaps[-1]])]
    min_delta = next(d for d in candidates if _best_by_definition(history, d) != lowest["epoch"])
    summary = finetune(artifacts / "data", artifacts / "aug", artifacts / "pre", tmp_path / "strict",
                       cfg.model_copy(update={"min_delta": min_delta}))
    expected = _best_by_definition(history, min_delta)
    assert expected != lowest["epoch"]
    assert summary["best_epoch"] == expected
    assert json.loads((tmp_path / "strict" / "summary.json").read_text())["best_epoch"] == expected
    saved = torch.load(tmp_path / "strict" / "model.pt", weights_only=True)
    assert saved["summary"]["best_epoch"] == expected
    assert summary["best_val_loss"] == pytest.approx(history[expected - 1]["val_loss"])
    # the saved weights are that epoch's: evaluated again, they give its validation loss
    model = models.build("resnet18", 3)
    model.load_state_dict(saved["state_dict"])
    _, val_loader = make_loaders(artifacts / "data", POLICY, cfg, ["circle", "square", "triangle"])
    logits, y = predict(model, val_loader)
    assert nn.functional.cross_entropy(logits, y).item() == pytest.approx(history[expected - 1]["val_loss"],
                                                                          rel=1e-4)


def test_freeze_pattern_that_matches_nothing_is_named():
    with pytest.raises(ConfigError, match=r"finetune.freeze: pattern 'layr1' matches no module; top-level"):
        models.freeze(models.build("resnet18", 3), ["layr1"])


def test_freezing_the_output_layer_is_refused():
    with pytest.raises(ConfigError, match=r"would freeze the output layer 'fc'"):
        models.freeze(models.build("resnet18", 3), ["fc"])


@pytest.mark.parametrize("arch, head", [("resnet50", "fc"), ("mobilenet_v3_small", "classifier.3"),
                                        ("mobilenet_v3_large", "classifier.3"), ("efficientnet_b0", "classifier.1")])
def test_output_layer_is_found_for_each_supported_architecture(arch, head):
    net = models.build(arch, 10)
    assert models.head_name(net) == head
    models.replace_head(net, 3)
    assert net.get_submodule(head).out_features == 3
    assert net.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
