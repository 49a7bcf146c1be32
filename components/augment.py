"""augment: the training-time augmentation policy (torchvision transforms v2) and a preview of it.

    python -m components.augment --params params.yaml --dataset data/prepared --out artifacts/augment

Writes policy.json (the policy, which finetune and validate turn back into transforms with
`load_policy` + `train_transform`/`eval_transform`) and preview.png (originals vs augmented).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torchvision.transforms import v2

from components.atomic import atomic_dir, read_json, write_json
from components.config import AugmentConfig, load_params, parse_section
from components.dataset import read_split
from components.images import load_rgb

PREVIEW_COLUMNS = 5  # augmented samples per original


def _augmentations(policy: AugmentConfig) -> list:
    steps = [v2.RandomResizedCrop(policy.image_size, scale=policy.resize_scale, ratio=policy.resize_ratio,
                                  antialias=True)]
    if policy.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(policy.hflip))
    if policy.rotation > 0:
        steps.append(v2.RandomRotation(policy.rotation))
    if any((policy.brightness, policy.contrast, policy.saturation, policy.hue)):
        steps.append(v2.ColorJitter(policy.brightness, policy.contrast, policy.saturation, policy.hue))
    return steps


def _to_float(policy: AugmentConfig, normalize: bool) -> list:
    steps = [v2.ToDtype(torch.float32, scale=True)]
    if normalize:
        steps.append(v2.Normalize(list(policy.mean), list(policy.std)))
    return steps


def train_transform(policy: AugmentConfig, normalize: bool = True) -> v2.Compose:
    """PIL RGB image -> augmented float tensor (C, H, W)."""
    return v2.Compose([v2.ToImage(), *_augmentations(policy), *_to_float(policy, normalize)])


def device_transform(policy: AugmentConfig) -> v2.Compose:
    """uint8 image tensor (C, H, W) on any device, a GPU's included -> what train_transform makes of it."""
    return v2.Compose([*_augmentations(policy), *_to_float(policy, True)])


def eval_transform(policy: AugmentConfig, normalize: bool = True) -> v2.Compose:
    """PIL RGB image -> resized, centre-cropped float tensor (C, H, W); no randomness."""
    return v2.Compose([v2.ToImage(), v2.Resize(policy.image_size, antialias=True), v2.CenterCrop(policy.image_size),
                       *_to_float(policy, normalize)])


def load_policy(augment_dir: str | Path) -> AugmentConfig:
    path = Path(augment_dir) / "policy.json"
    return parse_section(AugmentConfig, read_json(path), "augment", where=str(path))


def save_preview(policy: AugmentConfig, images: list, path: Path, seed: int = 0) -> None:
    """A grid: each row one original image, then PREVIEW_COLUMNS draws of the policy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(seed)
    show, augment = eval_transform(policy, normalize=False), train_transform(policy, normalize=False)
    rows = len(images)
    fig, axes = plt.subplots(rows, 1 + PREVIEW_COLUMNS, figsize=(1.6 * (1 + PREVIEW_COLUMNS), 1.6 * rows),
                             squeeze=False)
    for r, (img, label) in enumerate(images):
        tiles = [show(img)] + [augment(img) for _ in range(PREVIEW_COLUMNS)]
        for c, tile in enumerate(tiles):
            ax = axes[r][c]
            ax.imshow(tile.permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title("original" if c == 0 else f"augmented {c}", fontsize=8)
        axes[r][0].set_ylabel(label, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def augment(dataset_dir: str | Path, out: str | Path, policy: AugmentConfig) -> Path:
    """Check the policy builds, write it to `out`/policy.json with a preview grid from the train split."""
    train_transform(policy), eval_transform(policy)  # fail here, not in finetune, if it cannot build
    chosen = read_split(dataset_dir, "train",  # spread over the split; only these are read
                        pick=lambda rows: rows[::max(1, len(rows) // policy.preview_images)][: policy.preview_images])
    with atomic_dir(out) as tmp:
        write_json(tmp / "policy.json", policy.model_dump(mode="json"))
        save_preview(policy, [(load_rgb(p), label) for p, label in chosen], tmp / "preview.png")
    return Path(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (section: augment)")
    parser.add_argument("--dataset", required=True, help="dataset artifact from components.data")
    parser.add_argument("--out", required=True, help="folder for policy.json and preview.png")
    args = parser.parse_args(argv)
    augment(args.dataset, args.out, load_params(args.params).augment)
    print(f"augment: policy and preview written to {args.out}")
    return 0


if __name__ == "__main__":
    from components import cli

    sys.exit(cli.run(main))
