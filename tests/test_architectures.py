"""Every classification network torchvision lists either fine-tunes (auxiliary outputs handled, a
convolutional head replaced) or is refused before any work with a one-line reason; and timm's networks
take the same levers (freezing by depth, re-initialising, a new head)."""

import pytest
import torch
import torchvision

from components.config import ConfigError
from components.models import architectures
from components.models.architectures import WeightsError
from helpers import finetune_cfg
from components.training.recipe import Recipe

SIZE = 32  # tiny: what a small test can afford; the networks that cannot take it must say so


@pytest.mark.parametrize("arch", torchvision.models.list_models(module=torchvision.models))
def test_every_torchvision_classifier_fine_tunes_or_is_refused_before_any_work(arch):
    torch.manual_seed(0)
    model = architectures.build(arch, 1000)
    head = architectures.replace_head(model, 3)
    try:
        architectures.check_input(model, SIZE, arch)
    except WeightsError as err:  # refused: one line that names the setting and the network's own reason
        message = str(err)
        assert "\n" not in message and message.startswith(f"pretrained.arch: {arch} cannot take 32x32 images "
                                                          "(augment.image_size): ")
        assert arch.startswith(("vit_", "maxvit", "inception", "alexnet")), f"{arch} refused: {message}"
        return
    assert model.get_submodule(head).weight.shape[0] == 3
    # everything before the output layer frozen, as a linear probe: the step goes through the whole network
    # forward and through the head backward, which is what differs between architectures
    top = head.split(".")[0]
    recipe = Recipe(model, finetune_cfg(lr=0.01, freeze=[n for n, _ in model.named_children() if n != top]))
    recipe.start_epoch(1)
    logits = model(torch.randn(2, 3, SIZE, SIZE))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3)  # one output, aux classifiers or not
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    recipe.optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_googlenet_and_inception_weights_load_without_their_auxiliary_classifiers():
    for arch, aux in (("googlenet", "aux1."), ("inception_v3", "AuxLogits.")):
        published = torchvision.models.get_model(arch, weights=None, aux_logits=True, init_weights=True).state_dict()
        assert any(k.startswith(aux) for k in published)
        model = architectures.build(arch, 1000)
        architectures.load_weights(model, published, arch)  # the auxiliary heads' weights are dropped
        assert not any(k.startswith(aux) for k in model.state_dict())


def test_squeezenets_convolutional_head_is_replaced():
    model = architectures.build("squeezenet1_1", 1000)
    assert architectures.head_name(model) == "classifier.1"
    architectures.replace_head(model, 5)
    assert model.classifier[1].out_channels == 5 and model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_a_timm_network_freezes_by_depth_reinitialises_and_gets_a_new_head():
    torch.manual_seed(0)
    model = architectures.build("efficientnet_lite0", 1000, "timm")
    assert architectures.head_name(model) == "classifier"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert architectures.replace_head(model, 4) == "classifier" and model.classifier.out_features == 4
    reset = architectures.reinit(model, "efficientnet_lite0", ["blocks.6"], "timm")
    assert reset and all(k.startswith("blocks.6.") for k in reset)
    assert not torch.equal(model.state_dict()["blocks.6.0.conv_pw.weight"], before["blocks.6.0.conv_pw.weight"])
    recipe = Recipe(model, finetune_cfg(freeze_until="blocks.4"))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.3"))
                          for n in frozen)
    assert len(recipe.frozen_bn) > 0  # timm's BatchNormAct2d are BatchNorm layers: their statistics stay
    with pytest.raises(ConfigError, match=r"finetune.freeze: 'classifier' would freeze the output layer"):
        architectures.freeze(model, ["classifier"])


def test_an_unknown_timm_architecture_is_named_with_close_ones():
    with pytest.raises(WeightsError, match=r"unknown timm architecture 'efficientnet_lite9' \(close: efficientnet_"):
        architectures.build("efficientnet_lite9", 3, "timm")
