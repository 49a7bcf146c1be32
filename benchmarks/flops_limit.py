"""The shortest time a fine-tune can take on this machine: the FLOPs the work needs over the machine's
measured convolution and matrix throughput.

    .venv/bin/python benchmarks/flops_limit.py --arch resnet18 --frozen layer4 --train 840 --val 180 --epochs 2
    .venv/bin/python benchmarks/flops_limit.py --stages   # and the rate each frozen stage achieves
    .venv/bin/python benchmarks/flops_limit.py --library timm --arch efficientnet_lite0 --frozen blocks.4 --stages

The work (counted with torch.utils.flop_counter.FlopCounterMode, multiply-adds as two FLOPs): the frozen
layers' forward once over the validation split and once per augmented copy of the training split (as
many copies as epochs, at most finetune.prefix_copies), the trained layers' forward and backward over
the training split's full batches every epoch, and their forward over the validation split every
epoch. The machine:
the best of several timed runs of a large 3x3 convolution (forward, channels_last; backward
convolutions are counted at that rate too) and of a large matrix product, in the precision the run
uses. It is the limit of a run that caches the frozen layers' features; a run that does not (every
peer) has more work to do, and its "x limit" says how far it is from this least work. Decoding and
augmenting images are not FLOPs and are left out, so the limit is below anything that reads JPEGs.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _best_rate(fn, flops: float, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return flops / best


def machine_rates(threads: int, bf16: bool) -> dict:
    """FLOP/s of a large convolution and a large matrix product in the run's precision."""
    import torch

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(32, 256, 28, 28, dtype=dtype).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(dtype=dtype, memory_format=torch.channels_last)
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    with torch.inference_mode():
        conv_rate = _best_rate(lambda: conv(x), 2 * 32 * 28 * 28 * 256 * 256 * 9)
        mm_rate = _best_rate(lambda: a @ b, 2 * 2048 ** 3)
    return {"conv_flop_per_s": conv_rate, "matmul_flop_per_s": mm_rate, "precision": "bf16" if bf16 else "fp32"}


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, **_) -> int:
    """A convolution's gradients, each as many multiply-adds as its forward pass (the weight's shape
    carries the groups). torch 2.14.1's own formula (torch/utils/flop_counter.py, conv_backward_flop,
    the grad_weight branch) leaves the groups out and counts a depthwise convolution's weight gradient
    as a dense one's: efficientnet_lite0's trained blocks came out at 54x their forward pass."""
    from torch.utils.flop_counter import conv_flop_count

    return (bool(output_mask[0]) + bool(output_mask[1])) * conv_flop_count(x_shape, w_shape, grad_out_shape,
                                                                           transposed)


def _count(fn) -> dict:
    """FLOPs of one call by kind: convolution (forward and backward) and matrix products."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    backward = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=backward) as counter:
        fn()
    kinds = {"conv": 0, "matmul": 0}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        kinds["conv" if "convolution" in str(op) else "matmul"] += flops
    return kinds


def per_image(arch: str, frozen: str, classes: int, library: str = "torchvision") -> dict:
    """FLOPs per 224-px image of the frozen prefix's forward, the trained suffix's forward, and its
    forward and backward."""
    import torch

    from peers import _split

    from components.models import architectures as models

    model = models.build(arch, classes, library)
    backbone, head = _split(model, arch, frozen)
    batch = 4
    x = torch.randn(batch, 3, 224, 224)
    backbone.eval()
    with torch.no_grad():
        features = backbone(x)
    head.train()

    def train_step():
        torch.nn.functional.cross_entropy(head(features), torch.zeros(batch, dtype=torch.long)).backward()

    counts = {"prefix": _count(lambda: backbone(x)), "suffix_fwd": _count(lambda: head(features)),
              "suffix_fwd_bwd": _count(train_step)}
    return {k: {kind: v / batch for kind, v in c.items()} for k, c in counts.items()}


def stage_rates(arch: str, frozen: str, threads: int, batch: int = 32, library: str = "torchvision") -> list[dict]:
    """What the frozen prefix's stages achieve: FLOP/s of each top-level stage's forward (inference mode,
    channels_last, fp32) on a batch of 224-px images, against which the machine's rate is the limit."""
    import torch

    from components.models import architectures as models
    from peers import _split

    torch.set_num_threads(threads)
    backbone, _ = _split(models.build(arch, 12, library), arch, frozen)
    backbone.eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    rows = []
    with torch.inference_mode():
        for name, stage in backbone.named_children():
            run = functools.partial(stage, x)
            flops = sum(_count(run).values())
            if flops:
                rows.append({"stage": name, "gflop_per_image": flops / batch / 1e9,
                             "gflop_per_s": _best_rate(run, flops, repeats=3) / 1e9})
            x = stage(x)
    return rows


def limit(arch: str, frozen: str, classes: int, train: int, val: int, epochs: int, copies: int, batch: int,
          rates: dict, library: str = "torchvision") -> dict:
    """The work's FLOPs and the seconds they take at the machine's rates: the work of a run that caches
    the frozen layers' features (the least a run must do; a peer that does not cache does more)."""
    f = per_image(arch, frozen, classes, library)
    trained = train // batch * batch if train > batch else train  # the last partial batch is dropped
    n = {"prefix": val + min(copies, epochs) * train, "suffix_fwd_bwd": epochs * trained, "suffix_fwd": epochs * val}
    flops = {kind: sum(n[part] * f[part][kind] for part in n) for kind in ("conv", "matmul")}
    seconds = flops["conv"] / rates["conv_flop_per_s"] + flops["matmul"] / rates["matmul_flop_per_s"]
    return {"gflops": {k: v / 1e9 for k, v in flops.items()}, "limit_s": seconds,
            "per_image_gflops": {k: sum(v.values()) / 1e9 for k, v in f.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--frozen", default="layer4")
    parser.add_argument("--library", choices=["torchvision", "timm"], default="torchvision")
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--train", type=int, default=840)
    parser.add_argument("--val", type=int, default=180)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--copies", type=int, default=yaml.safe_load((ROOT / "params.yaml").read_text())
                        ["finetune"]["prefix_copies"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--stages", action="store_true", help="also what each frozen stage achieves")
    args = parser.parse_args(argv)
    rates = machine_rates(args.threads, args.bf16)
    if args.stages:
        for row in stage_rates(args.arch, args.frozen, args.threads, library=args.library):
            print(f"{row['stage']}: {row['gflop_per_image']:.3f} GFLOP an image, {row['gflop_per_s']:.0f} GFLOP/s")
    print(json.dumps({**rates, **limit(args.arch, args.frozen, args.classes, args.train, args.val, args.epochs,
                                       args.copies, args.batch, rates, args.library)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
