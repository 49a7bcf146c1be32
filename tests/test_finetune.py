import pytest
import torch
from torch import nn

from components import models
from components.config import ConfigError
from components.fetch_pretrained import fetch
from components.finetune import finetune, fit, make_loaders
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


def test_early_stopping_returns_the_best_epochs_weights_not_the_last(artifacts):
    cfg = FAST.model_copy(update={"freeze": [], "max_epochs": 6, "patience": 1, "min_delta": 1e6})
    model = models.build("resnet18", 3)
    train_loader, val_loader = make_loaders(artifacts / "data", POLICY, cfg, ["circle", "square", "triangle"])
    best_state, history = fit(model, train_loader, val_loader, cfg)
    assert len(history) == 2  # epoch 1 sets the best; epoch 2 cannot beat it by min_delta: stop
    model.load_state_dict(best_state)
    logits, y = models.predict(model, val_loader)
    assert nn.functional.cross_entropy(logits, y).item() == pytest.approx(history[0]["val_loss"], rel=1e-5)


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
