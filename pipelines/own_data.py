"""From the demo to your own project in one command: your images, your pretrained weights.

    make init DATA=path/to/images WEIGHTS='torchvision://resnet50?weights=IMAGENET1K_V2' NAME=flowers
    make init DATA=path/to/images WEIGHTS='timm://efficientnet_lite0?weights=zoo/efficientnet_lite0-imagenet.pt'
    (python -m pipelines init --data ... --weights ... [--arch ...] [--library ...] [--name ...])

Edits params.yaml in place (its comments stay): data.source, a recipe for photographs at 224
pixels (augmentation with flips and colour jitter, the lower layers frozen, nothing re-initialised),
the pretrained URI and architecture, the model name and the experiment; drops the `demo` section.
Then regenerates dvc.yaml (without the demo stages) and the compiled Kubeflow pipeline.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from urllib.parse import urlparse

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq

import torch

from components.config import ConfigError, load_params
from components.models import architectures

ROOT = Path(__file__).resolve().parent.parent

# Fine-tuning ImageNet-pretrained networks on photographs: the usual recipe, at the usual size.
PHOTO_RECIPE = {
    "augment": {"image_size": 224, "resize_scale": [0.25, 1.0], "resize_ratio": [0.75, 1.3333], "hflip": 0.5,
                "rotation": 0.0, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02,
                "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "finetune": {"freeze": [], "reinit": [], "unfreeze": [], "lr_groups": [], "optimizer": "sgd", "lr": 0.01,
                 "schedule": "cosine", "warmup_epochs": 1, "batch_size": 32, "max_epochs": 15, "patience": 4,
                 "min_delta": 0.001},
    "validate": {"min_accuracy": 0.7, "min_macro_f1": 0.7, "min_class_recall": 0.5},
}


# Comments of the demo's params.yaml that would mislead once the recipe is for photographs.
NEW_COMMENTS = {
    ("augment", "hflip"): "# probability; photographs are mostly mirror-symmetric",
    ("finetune", "reinit"): "# modules to start afresh; none: ImageNet features transfer",
}
DEMO_COMMENT = re.compile(r"^# Demo only:[^\n]*\n(?:#[^\n]*\n)*", re.MULTILINE)


def _flow(values: list) -> CommentedSeq:
    seq = CommentedSeq(values)
    seq.fa.set_flow_style()  # [a, b] on one line, as params.yaml writes lists
    return seq


def network_of(weights: str, arch: str | None, library: str | None) -> tuple[str, str]:
    """(library, architecture): given, or read from a torchvision://<arch>?weights=..., timm://<model>[.<tag>]
    URI (hf-hub:// repositories name theirs in their config, which init does not download: give --arch)."""
    scheme = weights.split("://")[0] if "://" in weights else ""
    library = library or {"torchvision": "torchvision", "timm": "timm", "hf-hub": "timm"}.get(scheme, "torchvision")
    if arch:
        return library, arch
    if scheme in ("torchvision", "timm"):
        parsed = urlparse(weights)
        return library, (parsed.netloc + parsed.path).split(".")[0]
    raise ConfigError(f"--arch: needed for {weights} (torchvision:// and timm:// URIs name their architecture)")


def freeze_point(arch: str, library: str = "torchvision") -> str:
    """Freeze the first two thirds of the backbone's stages: resnet -> layer4, networks with a
    `features` sequence (torchvision's mobilenet, efficientnet, convnext) -> features.<2/3 of its length>,
    timm's with `blocks` (efficientnet, mobilenet) or `stages` (convnext, resnet-like) -> likewise."""
    net = architectures.build(arch, 2, library)
    if hasattr(net, "layer4"):
        return "layer4"
    for name in ("features", "blocks", "stages"):
        stages = getattr(net, name, None)
        if isinstance(stages, torch.nn.Sequential) and len(stages) > 2:
            return f"{name}.{len(stages) * 2 // 3}"
    return ""  # unknown layout: train everything


def check_data(data: str, root: Path, extensions: list[str]) -> None:
    """A local DATA folder holds at least two class folders with images (an s3:// prefix is listed by the
    data step itself, with the same rules)."""
    if "://" in data:
        return
    folder = Path(data) if Path(data).is_absolute() else root / data
    if not folder.is_dir():
        raise ConfigError(f"DATA: {data}: no such folder (an ImageFolder: one sub-folder of images per class)")
    suffixes = {e.lower() for e in extensions}
    classes = [p.name for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")
               and any(f.suffix.lower() in suffixes for f in p.rglob("*"))]
    if len(classes) < 2:
        raise ConfigError(f"DATA: {data}: {len(classes)} class folder(s) with images {classes}; classification "
                          f"needs at least 2 (one sub-folder per class, images {', '.join(sorted(suffixes))})")


def check_weights(weights: str, library: str, arch: str, root: Path) -> None:
    """WEIGHTS names something that exists: a file, a torchvision weights name of `arch`, a timm model."""
    from urllib.parse import parse_qs

    parsed = urlparse(weights)
    if parsed.scheme == "torchvision":
        import torchvision

        try:
            names = [w.name for w in torchvision.models.get_model_weights(arch)]
        except ValueError:
            raise ConfigError(f"WEIGHTS: {weights}: torchvision has no network {arch}") from None
        wanted = parse_qs(parsed.query).get("weights", [""])[0]
        if wanted not in names:
            raise ConfigError(f"WEIGHTS: {weights}: {arch} has no weights '{wanted}'; it has: {', '.join(names)}")
        return
    if parsed.scheme == "timm":
        import timm

        if not timm.is_model(arch):
            close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
            raise ConfigError(f"WEIGHTS: {weights}: timm has no model {arch}"
                              + (f" (similar: {', '.join(close)})" if close else ""))
        inner = parse_qs(parsed.query).get("weights", [""])[0]
        if inner:
            check_weights(inner, library, arch, root)
        return
    if "://" not in weights or parsed.scheme == "file":
        path = Path(weights.removeprefix("file://"))
        if not (path if path.is_absolute() else root / path).is_file():
            raise ConfigError(f"WEIGHTS: {weights}: no such file")


def init(data: str, weights: str, arch: str | None = None, name: str | None = None, sha256: str = "",
         params_file: Path = ROOT / "params.yaml", library: str | None = None) -> dict:
    """Point params.yaml at your data and weights with the photo recipe; returns what was set. DATA, WEIGHTS
    and ARCH are checked first: nothing is written when one is wrong."""
    library, arch = network_of(weights, arch, library)
    current = load_params(params_file)
    check_data(data, params_file.parent, current.data.extensions)
    check_weights(weights, library, arch, params_file.parent)
    try:
        freeze_until = freeze_point(arch, library)
    except Exception as err:  # torchvision and timm say so in their own words; the setting is ARCH
        raise ConfigError(f"ARCH: {arch}: {library} cannot build it ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from None
    name = name or re.sub(r"[^A-Za-z0-9._-]+", "-", Path(data.rstrip("/")).name or "images")
    name = f"{name}-{arch}" if not name.endswith(arch) else name
    yaml = YAML()  # round-trip: keeps the comments that document every key
    yaml.width, yaml.preserve_quotes = 4096, True
    raw = yaml.load(params_file.read_text())
    changes = {
        "data": {"source": data, "repo": "", "rev": "", "classes": []},
        "pretrained": {"uri": weights, "library": library, "arch": arch, "sha256": sha256},
        "finetune": {**PHOTO_RECIPE["finetune"], "freeze_until": freeze_until},
        "augment": PHOTO_RECIPE["augment"],
        "validate": PHOTO_RECIPE["validate"],
        "register": {"model_name": name},
        "tracking": {"experiment": name},
    }
    for section, values in changes.items():
        for key, value in values.items():
            if raw[section].get(key) != value:
                raw[section][key] = _flow(value) if isinstance(value, list) else value
    comments = {**NEW_COMMENTS, ("finetune", "freeze_until"):
                f"# ...and everything before this module: make init froze two thirds of {arch}'s stages"
                if freeze_until else f"# nothing frozen: make init does not know {arch}'s stages"}
    for (section, key), comment in comments.items():
        raw[section].yaml_add_eol_comment(comment, key, column=36)
    raw.pop("demo", None)
    text = io.StringIO()
    yaml.dump(raw, text)
    tmp = params_file.with_suffix(".yaml.tmp")
    tmp.write_text(DEMO_COMMENT.sub("", text.getvalue()))
    try:
        load_params(tmp)  # never leave an invalid params.yaml behind
    except ConfigError:
        tmp.unlink()
        raise
    tmp.replace(params_file)
    return {"data.source": data, "pretrained.uri": weights, "pretrained.library": library, "pretrained.arch": arch,
            "finetune.freeze_until": changes["finetune"]["freeze_until"], "register.model_name": name,
            "tracking.experiment": name}
