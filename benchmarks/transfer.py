"""Does transfer learning pay? Real ImageNet weights against the same network from random initialisation
and a linear probe, on real photographs at 224 pixels, from a few images per class to all of them.

    .venv/bin/python benchmarks/transfer.py                     # or make bench-transfer
    .venv/bin/python benchmarks/transfer.py --per-class 2 5 10 24 --seeds 0 1 2 --epochs 8

The photographs are those scikit-image and scikit-learn ship (a cat, an espresso, a rocket, an astronaut,
a motorcycle, the moon, a temple, a flower, ...), one class each; every image is a crop of its photograph
at a random place and scale, turned, greyed or re-encoded as tests/helpers.make_photo_folder cuts them,
so a class is "a part of this scene" seen at another size and place. The data step splits them once;
each size keeps the first N training images of every class, and the validation and test splits stay the
same. Three runs per size and seed, the same budget (epochs, optimiser, schedule, augmentation):
  transfer  timm's efficientnet_lite0 with the ImageNet weights (make imagenet-zoo), a new output layer,
            the first blocks frozen as `make init` sets them (finetune.freeze_until)
  scratch   the same network from random initialisation, every layer trained
  probe     the ImageNet network frozen but for a new output layer (a linear probe of its features)
Prints a Markdown table (test accuracy, mean and range over the seeds) and writes
benchmarks/results/transfer.json and transfer.png. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from components.artifacts import checkpoint, dataset, model as model_artifact  # noqa: E402
from components.augment import augment  # noqa: E402
from components.config import load_params, override  # noqa: E402
from components.data import prepare  # noqa: E402
from components.fetch_pretrained import fetch  # noqa: E402
from components.finetune import finetune  # noqa: E402
from components.models import architectures  # noqa: E402
from components.models.serving import ImageClassifier  # noqa: E402
from components.storage.atomic import write_json  # noqa: E402
from pipelines import imagenet_zoo  # noqa: E402
from pipelines.own_data import PHOTO_RECIPE, freeze_point  # noqa: E402

RUNS = ("transfer", "scratch", "probe")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field",
          "immunohistochemistry", "retina", "camera", "moon", "coins", "china.jpg", "flower.jpg")


def photograph(name: str) -> Image.Image:
    """One of the photographs the packages ship, as an RGB image."""
    if name.endswith(".jpg"):
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(name))
    import skimage.data

    pixels = getattr(skimage.data, name)()
    pixels = pixels[0] if isinstance(pixels, tuple) else pixels  # the stereo pair: its left view
    return Image.fromarray(pixels).convert("RGB")


def cut(root: Path, per_class: int, seed: int = 0) -> Path:
    """`per_class` crops of each photograph in ImageFolder layout: 30-75% of the shorter side, anywhere,
    some mirrored, greyed or turned by their EXIF orientation, as JPEG, PNG and WebP."""
    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        photo, label = photograph(name), name.removesuffix(".jpg")
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = int(min(photo.size) * rng.uniform(0.3, 0.75))
            w, h = side, int(side * rng.uniform(0.75, 1.0))
            x, y = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
            crop = photo.crop((x, y, x + w, y + h))
            if rng.random() < 0.3:
                crop = ImageOps.mirror(crop)
            path = root / label / f"{label}-{i:03d}"
            kind = i % 5
            if kind == 0:
                crop.save(path.with_suffix(".jpg"), quality=int(rng.integers(60, 95)))
            elif kind == 1:
                crop.save(path.with_suffix(".png"))
            elif kind == 2:
                crop.save(path.with_suffix(".webp"), quality=80)
            elif kind == 3:
                crop.convert("L").save(path.with_suffix(".jpg"))
            else:  # stored sideways, upright by its EXIF orientation
                exif = Image.Exif()
                exif[0x0112] = 6
                crop.transpose(Image.Transpose.ROTATE_90).save(path.with_suffix(".jpeg"), exif=exif)
    return root


def first_per_class(folder: Path, out: Path, n: int) -> int:
    """A copy of the dataset artifact keeping the first `n` training images of each class."""
    seen, kept = {}, set()
    for r in dataset.rows(folder, "train"):
        seen[r.label] = seen.get(r.label, 0) + 1
        if seen[r.label] <= n:
            kept.add(r.path)
    dataset.subset(folder, out, lambda r: r.split != "train" or r.path in kept)
    return len(kept)


def test_accuracy(data: Path, model_dir: Path) -> float:
    model = ImageClassifier.from_checkpoint(model_artifact.checkpoint_file(model_dir))
    images = dataset.images(data, "test")
    probs = model.predict_proba([np.asarray(dataset.load(i)) for i in images])
    return float(np.mean([model.class_names[k] == i.label for k, i in zip(probs.argmax(1), images)]))


def photo_recipe(epochs: int) -> dict:
    """The fine-tune settings every run here shares: `make init`'s photo recipe, its first blocks frozen, a
    fixed budget of `epochs` (no early stop)."""
    return {**PHOTO_RECIPE["finetune"], "freeze_until": freeze_point(imagenet_zoo.ARCH, "timm"),
            "max_epochs": epochs, "patience": epochs + 1, "checkpoint_dir": "", "batch_size": 16}


def photo_inputs(t: Path, params, images: int) -> None:
    """Under `t`: data (the photographs' dataset artifact, split once), aug (the photo recipe's policy) and
    imagenet.pt (the real ImageNet weights)."""
    cut(t / "photos", images)
    prepare(t / "photos", t / "data", override(params.data, source=str(t / "photos"), repo="", rev="",
                                               classes=[], val_fraction=0.2, test_fraction=0.2))
    augment(t / "data", t / "aug", override(params.augment, **PHOTO_RECIPE["augment"], preview_images=4))
    imagenet_zoo.build(t / "imagenet.pt")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, nargs="+", default=[2, 5, 10, 24],
                        help="training images per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="finetune.seed of each repeat")
    parser.add_argument("--epochs", type=int, default=8, help="training budget of every run")
    parser.add_argument("--images", type=int, default=40, help="images cut from each photograph")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    params = load_params(ROOT / "params.yaml")
    arch, library = imagenet_zoo.ARCH, "timm"
    recipe = photo_recipe(args.epochs)
    cfgs = {"transfer": override(params.finetune, **recipe),
            "scratch": override(params.finetune, **{**recipe, "freeze_until": ""}),
            "probe": override(params.finetune, **{**recipe, "freeze_until": "classifier"})}
    start, results = time.time(), []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        photo_inputs(t, params, args.images)
        scratch = t / "random.pt"
        net = architectures.build(arch, 1000, library)
        checkpoint.save(checkpoint.Checkpoint(arch, None, net.state_dict(), library=library), scratch)
        weights = {}
        for name, uri in (("imagenet", t / "imagenet.pt"), ("random", scratch)):
            fetch(override(params.pretrained, uri=f"timm://{arch}?weights={uri}", library=library, arch=arch,
                           sha256=""), t / name)
            weights[name] = t / name
        for n in args.per_class:
            data = t / f"data-{n}"
            n_train = first_per_class(t / "data", data, n)
            row = {"per_class": n, "train_images": n_train}
            for name in RUNS:
                runs = []
                for seed in args.seeds:
                    began, out = time.time(), t / f"{name}-{n}-{seed}"
                    finetune(data, t / "aug", weights["random" if name == "scratch" else "imagenet"], out,
                             cfgs[name].model_copy(update={"seed": seed}))
                    history = model_artifact.read_history(out)
                    runs.append({"seed": seed, "test_accuracy": round(test_accuracy(data, out), 4),
                                 "val_accuracy": [round(r["val_accuracy"], 4) for r in history],
                                 "seconds": round(time.time() - began, 1)})
                    print(f"{n} per class, {name}, seed {seed}: test accuracy {runs[-1]['test_accuracy']:.3f} "
                          f"in {runs[-1]['seconds']} s", file=sys.stderr, flush=True)
                accuracies = [r["test_accuracy"] for r in runs]
                row[name] = {"runs": runs, "mean": round(statistics.mean(accuracies), 4),
                             "low": min(accuracies), "high": max(accuracies)}
            results.append(row)
        n_test = len(dataset.rows(t / "data", "test"))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "transfer.json", {
        "arch": arch, "library": library, "photographs": list(PHOTOS), "images_per_photograph": args.images,
        "test_images": n_test, "epochs": args.epochs, "seeds": args.seeds, "image_size": 224,
        "freeze_until": recipe["freeze_until"], "lr": recipe["lr"], "seconds": round(time.time() - start),
        "results": results})
    plot(results, args.out / "transfer.png")
    print(table(results, n_test))
    return 0


def table(results: list[dict], n_test: int) -> str:
    lines = [f"| training images per class (all classes) | {' | '.join(RUNS)} |",
             "|---|" + "---|" * len(RUNS)]
    for r in results:
        cells = [f"{r[name]['mean']:.3f} ({r[name]['low']:.3f}-{r[name]['high']:.3f})" for name in RUNS]
        lines.append(f"| {r['per_class']} ({r['train_images']}) | {' | '.join(cells)} |")
    lines.append(f"\nTest accuracy on {n_test} images, mean (range) over seeds.")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [r["per_class"] for r in results]
    for name in RUNS:
        mean = [r[name]["mean"] for r in results]
        err = [[m - r[name]["low"] for m, r in zip(mean, results)], [r[name]["high"] - m for m, r in zip(mean, results)]]
        ax.errorbar(sizes, mean, yerr=err, marker="o", capsize=3, label=name)
    ax.set_xscale("log"), ax.minorticks_off(), ax.set_xticks(sizes), ax.set_xticklabels([str(s) for s in sizes])
    ax.set_xlabel("training images per class"), ax.set_ylabel("test accuracy"), ax.set_ylim(0, 1.02)
    ax.set_title("efficientnet_lite0 at 224 px: ImageNet weights, scratch, probe")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
