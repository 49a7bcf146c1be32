"""augment: the training-time augmentation policy (torchvision transforms v2) and a preview of it.

    python -m components.augment --params params.yaml --dataset data/prepared --out artifacts/augment

Writes the policy artifact (components/artifacts/policy.py): the policy, which finetune turns back into
transforms (components/training/transforms.py), and a preview grid of originals against draws of it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from components.artifacts import dataset, policy as policy_artifact
from components.config import AugmentConfig, load_params
from components.training.transforms import eval_transform, train_transform

PREVIEW_COLUMNS = 5  # augmented samples per original


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
    """Check the policy builds, write it to `out` with a preview grid from the train split."""
    train_transform(policy), eval_transform(policy)  # fail here, not in finetune, if it cannot build
    n = policy.preview_images  # spread over the split; only these are read
    chosen = dataset.images(dataset_dir, "train", pick=lambda rows: rows[::max(1, len(rows) // n)][:n])
    originals = [(dataset.load(image), image.label) for image in chosen]
    policy_artifact.write(out, policy, lambda path: save_preview(policy, originals, path))
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

    cli.run_process(main)
