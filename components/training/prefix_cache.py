"""Frozen-prefix features, computed once: the fine-tune's largest saving on a CPU.

When the first layers of the model are frozen (finetune.freeze_until, finetune.freeze), every
epoch would push each image through them again to get the same kind of features. Here the
frozen prefix (BatchNorm folded into its convolutions) runs once over the validation split and
once per augmented copy of the training split (finetune.prefix_copies; epoch e trains on copy
(e - 1) mod copies, in the order the sampler draws for epoch e; copy k holds epoch k + 1's augmentation), the features go to a memory-mapped
float16 file (a dataset larger than memory streams from disk), and the epochs train only the
rest of the model (the suffix) on them.

Only what is provably the same model is cached: the prefix is the longest run of leading
stages (top-level modules, nested nn.Sequential opened up) whose parameters are all frozen,
whose BatchNorm statistics are frozen, that hold no dropout or stochastic depth (random in
training, so not cacheable), and that no finetune.unfreeze step wakes; and suffix(prefix(x))
must equal model(x) on a probe batch, else the cache is off and says why. Each image's augmentation
is drawn from a seed of its own (components/training/loaders.py), so a resumed run recomputes the same
features, and the first copies are the very images an uncached run trains on.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.ops import StochasticDepth
from tqdm import tqdm

from components.storage.atomic import sweep, temporary_prefix
from components.training.loaders import in_order, sample_seed

RANDOM_IN_TRAINING = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, StochasticDepth)
RANDOM_BY_NAME = ("DropPath", "DropBlock2d")  # timm's stochastic depth and DropBlock (timm/layers/drop.py)


def _random_in_training(module: nn.Module) -> bool:
    return isinstance(module, RANDOM_IN_TRAINING) or type(module).__name__ in RANDOM_BY_NAME


def _stages(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        out += _stages(child, f"{full}.") if isinstance(child, nn.Sequential) else [(full, child)]
    return out


def stage_names(model: nn.Module) -> list[str]:
    """The model's stages by name, in order: top-level modules, nested nn.Sequential opened up."""
    return [name for name, _ in _stages(model)]


class Suffix(nn.Module):
    """The model after its prefix: the remaining stages in order, flattening before the first Linear
    (what torchvision's forward does between pooling and the classifier)."""

    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        for stage in self.stages:
            if isinstance(stage, nn.Linear) and x.ndim > 2:
                x = torch.flatten(x, 1)
            x = stage(x)
        return x


def split(model: nn.Module, frozen_bn: list[nn.Module], later_unfrozen: list[str], probe: torch.Tensor):
    """(prefix, suffix, names in the prefix) or (None, None, reason)."""
    stages = _stages(model)
    woken = tuple(later_unfrozen)
    k = 0
    for name, stage in stages:
        params = list(stage.parameters())
        bns = [m for m in stage.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if (any(p.requires_grad for p in params) or any(bn not in frozen_bn for bn in bns)
                or any(_random_in_training(m) for m in stage.modules())
                or any(name == w or name.startswith(w + ".") or w.startswith(name + ".") for w in woken)):
            break
        k += 1
    if not any(p.numel() for _, s in stages[:k] for p in s.parameters()):
        return None, None, "no frozen layers at the start of the model"
    if getattr(model, "drop_rate", 0) > 0:  # timm: dropout in forward_head, a function, not a module of the chain
        return None, None, (f"{type(model).__name__} drops out in its forward (drop_rate {model.drop_rate}), "
                            "which a chain of its modules does not")
    prefix, suffix = nn.Sequential(*(s for _, s in stages[:k])), Suffix([s for _, s in stages[k:]])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        try:
            same = torch.allclose(suffix(prefix(probe)), model(probe), atol=1e-4, rtol=1e-4)
        except Exception:  # noqa: BLE001 - a stage that cannot take the previous one's output: not a chain
            same = False
    model.train(was_training)
    if not same:
        return None, None, f"{type(model).__name__} is not a plain chain of its modules"
    return prefix, suffix, [name for name, _ in stages[:k]]


def fused(prefix: nn.Module) -> nn.Module:
    """A copy of the frozen prefix for inference with each BatchNorm folded into its convolution
    (torch.fx): 1.4x the prefix's speed on the development CPU (resnet18 to layer3, channels_last:
    93 against 66 img/s). The prefix itself where it cannot be traced."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(prefix.eval())  # a new module: the model's own stay as they are
    except Exception:  # noqa: BLE001 - tracing can fail on a custom forward; folding is only a speed-up
        return prefix


class Features:
    """One split's prefix features in a memory-mapped float16 file, with their targets."""

    def __init__(self, folder: Path, name: str, n: int, shape: tuple[int, ...]):
        self.path = folder / f"{name}.f16"
        self.x = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float16, shape=(n, *shape))
        self.y = np.zeros(n, dtype=np.int64)

    def __len__(self):
        return len(self.y)

    def batches(self, batches: list[list[int]]) -> "Batches":
        """(features, targets) for each list of row indices, in the order given."""
        return Batches(self, batches)


class Batches:
    """A Features file's batches, with their count (the batch bar's total)."""

    def __init__(self, features: Features, rows: list[list[int]]):
        self.features, self.rows = features, rows

    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        for rows in self.rows:
            rows = np.asarray(rows)
            yield torch.from_numpy(self.features.x[rows].astype(np.float32)), torch.from_numpy(self.features.y[rows])


@torch.no_grad()
def compute(prefix: nn.Module, loader, folder: Path, name: str, prepare, autocast) -> Features:
    """Run `loader` through the frozen prefix (eval mode) into a Features file."""
    prefix.eval()
    store, at = None, 0
    # its own bar (on a terminal): the first epochs' time is mostly this, not training
    for x, y in tqdm(loader, desc=f"frozen features ({name})", unit="batch", leave=False, file=sys.stderr,
                     disable=None):
        with autocast():
            f = prefix(prepare(x)).float()
        if store is None:
            store = Features(folder, name, len(loader.dataset), tuple(f.shape[1:]))
        store.x[at:at + len(y)] = f.cpu().numpy().astype(np.float16)
        store.y[at:at + len(y)] = y.numpy()
        at += len(y)
    store.x.flush()
    return store


class PrefixCache:
    """Validation features once, training features per augmented copy, computed when first needed."""

    def __init__(self, prefix: nn.Module, train_loader, val_loader, cfg, prepare, autocast,
                 workdir: str | None = None):
        self.prefix, self.train_loader, self.cfg = prefix, train_loader, cfg
        self.prepare, self.autocast = prepare, autocast
        base = Path(workdir or tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        sweep(base / "prefix-cache")  # a killed run's feature files go with the next run (on this machine)
        self._tmp = tempfile.TemporaryDirectory(prefix=temporary_prefix(base / "prefix-cache"), dir=base)
        self.folder = Path(self._tmp.name)
        self.val = compute(prefix, val_loader, self.folder, "val", prepare, autocast)
        self.copies: dict[int, Features] = {}

    def train_copy(self, epoch: int) -> Features:
        k = (epoch - 1) % self.cfg.prefix_copies
        if k not in self.copies:
            # Copy k holds the images epoch k + 1 trains on (what an uncached run draws then), every image
            # from its own seed: the same features however the run got here.
            dataset, seed = self.train_loader.dataset, self.cfg.seed
            keys = [[(i, sample_seed(seed, k + 1, i)) for i in batch] for batch in in_order(len(dataset),
                                                                                            self.cfg.batch_size)]
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=keys, num_workers=self.cfg.num_workers,
                                                 collate_fn=self.train_loader.collate_fn,
                                                 pin_memory=self.train_loader.pin_memory,
                                                 generator=torch.Generator().manual_seed(seed))
            self.copies[k] = compute(self.prefix, loader, self.folder, f"train-{k}", self.prepare, self.autocast)
        return self.copies[k]

    def close(self) -> None:
        self.copies.clear()
        self._tmp.cleanup()


def describe(names: list[str]) -> str:
    return f"{names[0]} .. {names[-1]} ({len(names)} stages)" if len(names) > 1 else names[0]


CALIBRATION_IMAGES = 64  # validation images the int8 prefix's activation ranges are measured on
INT8_MAX_ERROR = 0.3     # relative L2 distance from the fp32 features on the probe batch, past which int8 is off


def quantized(prefix: nn.Module, batches) -> nn.Module:
    """An int8 copy of the frozen prefix: PyTorch's x86 post-training quantisation (torch.ao.quantization,
    FX graph mode, `get_default_qconfig_mapping("x86")`: per-channel int8 weights, activation ranges
    observed on `batches`; fbgemm and oneDNN kernels, CPU only). It folds BatchNorm itself."""
    import copy
    import warnings

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    batches = list(batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao at each call
        prepared = prepare_fx(copy.deepcopy(prefix).eval(), get_default_qconfig_mapping("x86"), (batches[0],))
        with torch.no_grad():
            for x in batches:
                prepared(x)
        return convert_fx(prepared).eval()


def _calibration(val_loader, prepare):
    seen = 0
    for x, _ in val_loader:
        yield prepare(x)
        seen += len(x)
        if seen >= CALIBRATION_IMAGES:
            return


def for_model(model: nn.Module, recipe, train_loader, val_loader, cfg, prepare, autocast, say):
    """(PrefixCache, suffix) when finetune.prefix_cache can apply, else (None, None) with the reason said.
    Each data-parallel process computes the whole cache: every one draws from every image."""
    if not cfg.prefix_cache:
        return None, None
    later = recipe.woken_later()
    probe = prepare(next(iter(val_loader))[0][:2])
    prefix, suffix, names = split(model, recipe.frozen_bn, later, probe)
    if prefix is None:
        say(f"finetune: frozen-prefix cache off: {names}")
        return None, None
    fast = fused(prefix)
    was_training = prefix.training
    with torch.no_grad():  # folding is checked like the split: the same features, or the prefix as it is
        if not torch.allclose(fast(probe), prefix.eval()(probe), atol=1e-4, rtol=1e-4):
            fast = prefix
    if cfg.channels_last:
        fast.to(memory_format=torch.channels_last)
    kind = ""
    if cfg.prefix_int8:
        int8, why = None, "the int8 prefix runs on a CPU only"
        if probe.device.type == "cpu":
            try:
                int8 = quantized(prefix, _calibration(val_loader, prepare))
                with torch.no_grad():
                    exact = prefix.eval()(probe)
                    error = float((int8(probe) - exact).norm() / exact.norm())
                why = f"its features are {error:.0%} from fp32 on a probe batch (at most {INT8_MAX_ERROR:.0%})"
                int8 = int8 if error <= INT8_MAX_ERROR else None
            except Exception as err:  # noqa: BLE001 - a network the quantiser cannot trace keeps its fp32 prefix
                why = f"the x86 quantiser cannot take it ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
        if int8 is None:
            say(f"finetune: int8 prefix off: {why}; fp32 instead")
        else:
            fast, autocast, kind = int8, contextlib.nullcontext, f" in int8 ({why})"
    prefix.train(was_training)
    cache = PrefixCache(fast, train_loader, val_loader, cfg, prepare, autocast, workdir=cfg.checkpoint_dir or None)
    copies = f"{cfg.prefix_copies} augmented cop{'y' if cfg.prefix_copies == 1 else 'ies'}"
    say(f"finetune: frozen prefix {describe(names)} computed once{kind}: validation, and up to {copies} of the "
        "training split")
    return cache, suffix
