"""What a user would write instead of the fine-tune step: one training run of a peer, in this process.

    .venv/bin/python benchmarks/peers.py careful --data D --weights W --arch resnet18 --frozen layer4 --epochs 2
    .venv/bin/python benchmarks/peers.py careful ... --library timm --arch efficientnet_lite0 --frozen blocks.4

Every peer trains the same network from the same checkpoint with the same layers frozen (those before
--frozen), a new head, SGD (lr 0.01, momentum 0.9, weight decay 1e-4), batch size (the last partial batch
dropped, as ours does), epochs, threads and 224-px crops (RandomResizedCrop and a horizontal flip), and
evaluates on the validation split after each epoch (the short side resized to 224, the centre crop):
  tutorial   the PyTorch transfer-learning tutorial as most users write it: per-sample PIL transforms in
             a DataLoader, fp32, NCHW, frozen parameters by requires_grad=False with the whole model in
             train mode (so frozen BatchNorm statistics drift), evaluation under no_grad
  lightning  PyTorch Lightning as its transfer-learning page teaches it (docs/source-pytorch/advanced/
             transfer_learning.rst: the frozen backbone a feature extractor in eval mode run under
             no_grad, a new head), Trainer defaults for the device (accelerator "auto", checkpointing,
             its logger, a validation loop each epoch, its sanity check) on the CPU, in the precision
             ours picks (fp32 on a CPU)
  careful    a plain loop written with care: channels_last, persistent DataLoader workers, the frozen
             layers in eval mode under no_grad (no graph, no gradient), evaluation under inference_mode
Prints one JSON line: total_s, epoch_s, val_accuracy (the last epoch's, which is what each peer
delivers), epoch_val_accuracy, peak_bytes. finetune_speed.py runs each in a fresh
process and times the whole process.
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
WEIGHT_DECAY = 1e-4  # params.yaml's finetune.weight_decay, which ours trains with


def _loaders(args, classes: list[str], persistent_workers: bool):
    """(train, val) loaders with 2 workers. Training batches are shuffled and, like ours
    (components/training/loaders.py), without a last partial batch when there is more than one batch (a
    batch of one image breaks BatchNorm in training mode)."""
    import torch

    train_tf, val_tf = _transforms()
    train, val = _files(args.data, "train", train_tf, classes), _files(args.data, "val", val_tf, classes)
    common = dict(batch_size=args.batch, num_workers=2, persistent_workers=persistent_workers)
    return (torch.utils.data.DataLoader(train, shuffle=True, drop_last=len(train) > args.batch, **common),
            torch.utils.data.DataLoader(val, **common))


def _files(data: Path, split: str, tf, classes: list[str]):
    import torch
    from PIL import Image

    from components.artifacts import dataset

    class Files(torch.utils.data.Dataset):
        def __init__(self):
            self.items = [(p, classes.index(label)) for p, label, _ in dataset.images(data, split)]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            path, label = self.items[i]
            return tf(Image.open(path).convert("RGB")), label

    return Files()


def _network(args, classes: int):
    """The checkpoint's network with a new head."""
    from torch import nn

    from components.artifacts import weights
    from components.models import architectures as models

    model = models.build(args.arch, 1000, args.library)  # torchvision.models.get_model or timm.create_model
    model.load_state_dict(weights.load(args.weights).state_dict)
    head = models.head_name(model)
    parent, _, leaf = head.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    setattr(owner, leaf, nn.Linear(getattr(owner, leaf).in_features, classes))
    return model


def _split(model, arch: str, frozen: str):
    """(backbone, head) split by hand as a user would, the backbone holding exactly the stages before
    `frozen` (checked: the same layers frozen as ours)."""
    from torch import nn

    from components.models import architectures as models

    if arch.startswith("resnet"):
        stages = list(model.named_children())
        at = [name for name, _ in stages].index(frozen)
        backbone = nn.Sequential(OrderedDict(stages[:at]))
        head = nn.Sequential(OrderedDict([*stages[at:-1], ("flatten", nn.Flatten(1)), stages[-1]]))
    elif arch.startswith("mobilenet"):
        at = int(frozen.removeprefix("features."))
        backbone = model.features[:at]
        head = nn.Sequential(*model.features[at:], model.avgpool, nn.Flatten(1), model.classifier)
    elif arch.startswith("efficientnet") and hasattr(model, "conv_stem"):  # timm's: forward_features, forward_head
        at = int(frozen.removeprefix("blocks."))
        backbone = nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:at])
        head = nn.Sequential(*model.blocks[at:], model.conv_head, model.bn2, model.global_pool, model.classifier)
    else:
        raise SystemExit(f"peers: no split written for {arch}")
    before = {id(p) for name in models.modules_before(model, frozen) for p in model.get_submodule(name).parameters()}
    if before != {id(p) for p in backbone.parameters()}:
        raise SystemExit(f"peers: the split of {arch} at {frozen} is not finetune.freeze_until's")
    return backbone, head


def _transforms():
    from torchvision import transforms

    normalize = transforms.Normalize(MEAN, STD)
    train = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                transforms.ToTensor(), normalize])
    # evaluation as ours does it (components/training/transforms.py eval_transform): the short side to 224,
    # the centre 224x224, so the accuracies compare
    val = transforms.Compose([transforms.Resize(224), transforms.CenterCrop(224), transforms.ToTensor(), normalize])
    return train, val


def tutorial(args, classes: list[str]) -> tuple[list[float], list[float]]:
    import torch
    from torch import nn

    from components.models import architectures as models

    train, val = _loaders(args, classes, persistent_workers=False)
    model = _network(args, len(classes))
    frozen = tuple(f"{name}." for name in models.modules_before(model, args.frozen))  # the same layers as ours
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith(frozen)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                          weight_decay=WEIGHT_DECAY)
    loss_fn = nn.CrossEntropyLoss()
    epoch_s, accs = [], []
    for _ in range(args.epochs):
        t = time.perf_counter()
        model.train()
        for x, y in train:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        model.eval()
        correct = seen = 0
        with torch.no_grad():
            for x, y in val:
                correct += (model(x).argmax(1) == y).sum().item()
                seen += len(y)
        accs.append(correct / seen)
        epoch_s.append(time.perf_counter() - t)
    return epoch_s, accs


def careful(args, classes: list[str]) -> tuple[list[float], list[float]]:
    import torch
    from torch import nn

    train, val = _loaders(args, classes, persistent_workers=True)
    model = _network(args, len(classes))
    backbone, head = _split(model, args.arch, args.frozen)
    backbone.requires_grad_(False).eval().to(memory_format=torch.channels_last)
    head.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9, weight_decay=WEIGHT_DECAY)
    loss_fn = nn.CrossEntropyLoss()
    epoch_s, accs = [], []
    for _ in range(args.epochs):
        t = time.perf_counter()
        head.train()
        for x, y in train:
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                features = backbone(x)
            opt.zero_grad(set_to_none=True)
            loss_fn(head(features), y).backward()
            opt.step()
        head.eval()
        correct = seen = 0
        with torch.inference_mode():
            for x, y in val:
                logits = head(backbone(x.contiguous(memory_format=torch.channels_last)))
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
        accs.append(correct / seen)
        epoch_s.append(time.perf_counter() - t)
    return epoch_s, accs


def lightning(args, classes: list[str]) -> tuple[list[float], list[float]]:
    import pytorch_lightning as pl
    import torch
    from torch import nn

    from components.training.distributed import precision

    train, val = _loaders(args, classes, persistent_workers=True)
    model = _network(args, len(classes))
    backbone, head = _split(model, args.arch, args.frozen)

    class TransferLearning(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.feature_extractor = backbone
            self.feature_extractor.requires_grad_(False)
            self.feature_extractor.eval()
            self.classifier = head

        def forward(self, x):
            self.feature_extractor.eval()
            with torch.no_grad():
                representations = self.feature_extractor(x)
            return self.classifier(representations)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_acc", (self(x).argmax(1) == y).float().mean(), on_epoch=True, batch_size=len(y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.classifier.parameters(), lr=0.01, momentum=0.9, weight_decay=WEIGHT_DECAY)

    class EpochTimes(pl.Callback):
        def __init__(self):
            self.times, self.accs, self.start = [], [], 0.0

        def on_train_epoch_start(self, *_):
            self.start = time.perf_counter()

        def on_validation_epoch_end(self, trainer, _):
            if not trainer.sanity_checking:
                self.times.append(time.perf_counter() - self.start)
                self.accs.append(float(trainer.callback_metrics["val_acc"]))

    timer = EpochTimes()
    bf16 = precision("auto", "cpu") == "bf16"  # the precision ours picks (finetune.precision: auto)
    # on the CPU, like the other peers and ours here
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1,
                         precision="bf16-mixed" if bf16 else "32-true", default_root_dir=args.work,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(TransferLearning(), train, val)
    return timer.times, timer.accs


PEERS = {"tutorial": tutorial, "lightning": lightning, "careful": careful}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--arch", required=True)
    parser.add_argument("--library", choices=["torchvision", "timm"], default="torchvision")
    parser.add_argument("--frozen", required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--work", type=Path, default=Path("."))
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed: the head's weights, the order, "
                                                            "the augmentations")
    args = parser.parse_args(argv)

    import torch

    from components.artifacts import dataset

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    epoch_s, accs = PEERS[args.peer](args, dataset.read_report(args.data)["classes"])
    # a peer delivers its last epoch's weights (none of them keeps the best)
    print(json.dumps({"total_s": time.perf_counter() - started, "epoch_s": epoch_s, "val_accuracy": accs[-1],
                      "delivered_val_accuracy": accs[-1], "epoch_val_accuracy": accs,
                      "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
