"""Would an int8 frozen prefix pay? The fine-tune's cached layers in fp32 against int8 post-training quantisation.

    .venv/bin/python benchmarks/prefix_int8.py          # resnet18 conv1..layer3 at 224 px, batch 32 (~10 min)

The prefix as the cache runs it (components/training/prefix_cache.py: BatchNorm folded, channels_last,
fp32, eval mode) against the same layers quantised with PyTorch's x86 quantiser (torch.ao.quantization
FX graph mode, `get_default_qconfig_mapping("x86")`, calibrated on 64 of the photos; fbgemm kernels),
on real-sized photographs (benchmarks/photos.py) decoded and resized to 224 once: images per second
over the same batches (median of --repeats, alternated), and how far the int8 features are from the
fp32 ones (relative L2 error, cosine similarity). Then the fine-tune step as finetune_speed.py runs it
(600 photos, 2 and 10 epochs) with finetune.prefix_int8 off and on, alternated: whole-process time
and the validation accuracy of the model it saves, evaluated in fp32 as validate does.
Writes benchmarks/results/prefix_int8.json. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import photos  # noqa: E402


def _served_accuracy(model_dir: Path, data: Path) -> float:
    """The saved model on the validation split as validate evaluates it (fp32, its own preprocessing)."""
    import numpy as np

    from components.artifacts import dataset
    from components.artifacts import model as model_artifact
    from components.models.serving import ImageClassifier

    model = ImageClassifier.from_checkpoint(model_artifact.checkpoint_file(model_dir))
    val = dataset.images(data, "val")
    probs = model.predict_proba([np.asarray(dataset.load(image)) for image in val])
    return float(np.mean([model.class_names[i] == image.label for i, image in zip(probs.argmax(1), val)]))


def end_to_end(images: int, epochs: list[int]) -> list[dict]:
    from finetune_speed import FROZEN, prepare, run_ours

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        setup = prepare(work, images, "resnet18")
        for n in epochs:
            for int8 in (False, True):
                r = run_ours(work, setup, "resnet18", n, 32, FROZEN["resnet18"], os.cpu_count(),
                             {"prefix_int8": int8})
                fp32 = _served_accuracy(work / f"model-resnet18-{n}", work / "data")
                rows.append({"epochs": n, "prefix_int8": int8, "total_s": r["total_s"],
                             "history_val_accuracy": r["delivered_val_accuracy"], "fp32_val_accuracy": fp32})
                print(f"{n} epochs, prefix_int8 {int8}: {r['total_s']:.1f} s, saved model's validation accuracy "
                      f"{fp32:.3f} in fp32 ({r['delivered_val_accuracy']:.3f} in training)", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--photos", type=int, default=600, help="the fine-tune runs' photographs")
    parser.add_argument("--epochs", type=int, nargs="*", default=[2, 10], help="none: the prefix alone")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prefix_int8.json")
    args = parser.parse_args(argv)

    import torch
    from PIL import Image
    from torch import nn
    from torchvision.transforms import v2

    from components.models import architectures
    from components.training.prefix_cache import fused

    with tempfile.TemporaryDirectory() as tmp:
        raw = photos.make(Path(tmp) / "photos", args.images)
        state = torch.load(photos.zoo(Path(tmp) / "zoo.pt", "resnet18", raw), weights_only=True)["state_dict"]
        tf = v2.Compose([v2.PILToTensor(), v2.Resize(256), v2.CenterCrop(224), v2.ToDtype(torch.float32, scale=True),
                         v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        x = torch.stack([tf(Image.open(f).convert("RGB")) for f in sorted(raw.rglob("*.jpg"))])
    net = architectures.build("resnet18", 1000)
    net.load_state_dict(state)
    net.eval()
    prefix = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3).eval()
    fp32 = fused(prefix).to(memory_format=torch.channels_last).eval()

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        prepared = prepare_fx(prefix, get_default_qconfig_mapping("x86"), (x[:2],))
        with torch.inference_mode():
            for start in range(0, 64, args.batch):
                prepared(x[start:start + args.batch])
        int8 = convert_fx(prepared).eval()

    batches = [x[s:s + args.batch].contiguous(memory_format=torch.channels_last)
               for s in range(0, len(x) - args.batch + 1, args.batch)]
    times = {"fp32": [], "int8": []}
    with torch.inference_mode():
        for model in (fp32, int8):
            model(batches[0])  # warm-up: kernels chosen, weights packed
        for _ in range(args.repeats):
            for name, model in (("fp32", fp32), ("int8", int8)):
                started = time.perf_counter()
                for b in batches:
                    model(b)
                times[name].append(time.perf_counter() - started)
        a = torch.cat([fp32(b).float() for b in batches])
        q = torch.cat([int8(b).float() for b in batches])
    steps = end_to_end(args.photos, args.epochs) if args.epochs else []
    n = sum(len(b) for b in batches)
    result = {"images": n, "batch": args.batch, "threads": torch.get_num_threads(),
              **{f"{k}_images_per_s": n / statistics.median(v) for k, v in times.items()},
              "speedup": statistics.median(times["fp32"]) / statistics.median(times["int8"]),
              "relative_l2_error": float((q - a).norm() / a.norm()),
              "cosine": float(nn.functional.cosine_similarity(q.flatten(1), a.flatten(1)).mean()),
              "finetune": steps}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
