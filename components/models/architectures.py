"""The networks the pipeline fine-tunes, from torchvision or timm: building, loading weights, the output
layer, freezing, re-initialising.

A network is a library and an architecture (pretrained.library, pretrained.arch). Its output layer is
found, not listed per architecture: timm names it (`pretrained_cfg["classifier"]`); in a torchvision
network it is the last nn.Linear in module order (resnet `fc`, mobilenet_v3 `classifier.3`, efficientnet
`classifier.1`, vit `heads.head`), else the last 1x1 convolution (squeezenet `classifier.1`). GoogLeNet
and Inception v3 are built without their auxiliary classifiers (training-time extra outputs; their weights
are dropped on loading) and with the input transform their ImageNet weights were trained with.
"""

from __future__ import annotations

import fnmatch
import hashlib

import torch
import torchvision
from torch import nn

from components.config import ConfigError


class WeightsError(ValueError):
    """Weights do not fit the requested architecture; the message lists what differs."""


LIBRARIES = ("torchvision", "timm")
# Auxiliary classifiers: extra outputs in training mode, not part of the network that is served.
AUXILIARY = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def build(arch: str, num_classes: int, library: str = "torchvision") -> nn.Module:
    if library == "timm":
        import timm

        if not timm.is_model(arch):
            import difflib

            close = ", ".join(difflib.get_close_matches(arch, timm.list_models(), n=6, cutoff=0.7)) or "none close"
            raise WeightsError(f"pretrained.arch: unknown timm architecture '{arch}' (close: {close})")
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise WeightsError(f"pretrained.arch: unknown torchvision classification architecture '{arch}'")
    extra = dict(aux_logits=False, transform_input=True, init_weights=True) if arch in AUXILIARY else {}
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **extra)


def head_name(model: nn.Module) -> str:
    named = getattr(model, "pretrained_cfg", None)  # timm's networks name their output layer
    if isinstance(named, dict) and isinstance(named.get("classifier"), str):
        return named["classifier"]
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if names:
        return names[-1]
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    if convs:  # a network that scores classes with a 1x1 convolution (squeezenet)
        return convs[-1]
    raise WeightsError(f"{type(model).__name__} has no output layer this pipeline can replace (an nn.Linear, or "
                       "a 1x1 convolution)")


def num_outputs(state_dict: dict, arch: str, library: str = "torchvision") -> int:
    """Class count of a state dict for `arch`, read from its output layer's weight."""
    key = f"{head_name(build(arch, 2, library))}.weight"
    if key not in state_dict:
        raise WeightsError(f"weights have no '{key}': not a {library} {arch} state dict")
    return int(state_dict[key].shape[0])


def check_input(model: nn.Module, image_size: int, arch: str) -> None:
    """Refuse, before any training, a network that cannot take augment.image_size (a ViT's fixed size, a
    minimum size), with the network's own reason on one line."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, 3, image_size, image_size))
    except Exception as err:  # noqa: BLE001 - whatever the network says, it cannot run at this size
        reason = " ".join(str(err).split())[:200]
        raise WeightsError(f"pretrained.arch: {arch} cannot take {image_size}x{image_size} images "
                           f"(augment.image_size): {type(err).__name__}: {reason}") from None
    finally:
        model.train(was_training)


def load_weights(model: nn.Module, state_dict: dict, arch: str) -> None:
    """Strict load; on mismatch, one error listing every missing, unexpected and mis-shaped layer.
    An auxiliary classifier's weights (googlenet, inception_v3) are dropped: the network has none."""
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(AUXILIARY.get(arch, ()))}
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: weights {tuple(state_dict[k].shape)} vs {arch} {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state_dict)) if tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                shown = items[:10] + ([f"... {len(items) - 10} more"] if len(items) > 10 else [])
                parts.append(f"{title}: " + ", ".join(shown))
        raise WeightsError(f"weights do not match architecture '{arch}': " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Swap the output layer for a freshly initialised one with `num_classes` outputs (timm's own
    reset_classifier for its networks)."""
    name = head_name(model)
    if hasattr(model, "reset_classifier") and getattr(model, "pretrained_cfg", None):
        model.reset_classifier(num_classes)
        return name
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1, bias=old.bias is not None)
    else:
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    setattr(parent, attr, new)
    return name


def match_modules(model: nn.Module, patterns: list[str], setting: str) -> list[str]:
    """Names of the modules matching any of `patterns` (fnmatch), in model order; a pattern that
    matches nothing is an error naming `setting`, since it is almost always a typo."""
    names = [n for n, _ in model.named_modules() if n]
    matched = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            top = ", ".join(n for n in names if "." not in n)
            raise ConfigError(f"{setting}: pattern '{pattern}' matches no module; top-level modules: {top}")
        matched += [n for n in hits if n not in matched]
    return matched


def freeze(model: nn.Module, patterns: list[str]) -> list[nn.Module]:
    """Freeze every module whose name matches a pattern (with all its children).

    Returns the frozen BatchNorm layers, which must stay in eval mode while training so
    their running statistics do not move. A pattern that matches nothing is an error.
    """
    modules = dict(model.named_modules())
    head = head_name(model)
    frozen_bn = []
    for name in match_modules(model, patterns, "finetune.freeze"):
        if head == name or head.startswith(name + "."):
            raise ConfigError(f"finetune.freeze: '{name}' would freeze the output layer '{head}'")
        for m in modules[name].modules():
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m not in frozen_bn:
                frozen_bn.append(m)
    return frozen_bn


def modules_before(model: nn.Module, until: str) -> list[str]:
    """Names of the modules that come before `until` at each level of its path, for freezing by depth.

    resnet18, "layer3" -> conv1, bn1, relu, maxpool, layer1, layer2;
    mobilenet_v3_small, "features.4" -> features.0 .. features.3.
    """
    names = dict(model.named_modules())
    if until not in names or not until:
        top = ", ".join(n for n in names if n and n.count(".") <= 1)
        raise ConfigError(f"finetune.freeze_until: no module '{until}'; modules by depth: {top}")
    before, parent = [], ""
    for part in until.split("."):
        container = model.get_submodule(parent) if parent else model
        for child, _ in container.named_children():
            if child == part:
                break
            before.append(f"{parent}.{child}" if parent else child)
        parent = f"{parent}.{part}" if parent else part
    return before


def unfreeze(model: nn.Module, patterns: list[str], frozen_bn: list[nn.Module]) -> list[nn.Parameter]:
    """Make the matched modules trainable again; returns the parameters that were frozen until now."""
    woken = []
    for name in match_modules(model, patterns, "finetune.unfreeze"):
        for m in model.get_submodule(name).modules():
            for p in m.parameters(recurse=False):
                if not p.requires_grad:
                    p.requires_grad_(True)
                    woken.append(p)
            if m in frozen_bn:
                frozen_bn.remove(m)
    return woken


def parameters_of(model: nn.Module, patterns: list[str], setting: str) -> list[nn.Parameter]:
    """Trainable parameters of the modules matching `patterns` (each parameter once)."""
    found, seen = [], set()
    for name in match_modules(model, patterns, setting):
        for p in model.get_submodule(name).parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                found.append(p)
    return found


def reinit(model: nn.Module, arch: str, patterns: list[str], library: str = "torchvision") -> list[str]:
    """Give the matched modules fresh weights, initialised as `arch` initialises them (its own
    scheme, not PyTorch's layer defaults). Returns the state-dict keys that were reset."""
    head = model.get_submodule(head_name(model))
    fresh = build(arch, getattr(head, "out_features", None) or head.out_channels, library).state_dict()
    prefixes = tuple(name + "." for name in match_modules(model, patterns, "finetune.reinit"))
    state = model.state_dict()
    reset = [k for k in state if k.startswith(prefixes)]
    model.load_state_dict({**state, **{k: fresh[k] for k in reset}})
    return reset


def weights_digest(state_dict: dict) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and values: the same for the same weights,
    however and whenever they were saved."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}:{tensor.dtype}:{tuple(state_dict[key].shape)}\n".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def parameter_counts(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable, "total": total}
