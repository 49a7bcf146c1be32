"""The checkpoint format: weights.pt (fetch_pretrained), model.pt (finetune) and a zoo file (the demo's).

A dict of tensors and plain data, read with torch.load(weights_only=True), so loading never runs code:
    format          "finetune-pipeline/checkpoint-v1"
    library         torchvision or timm: whose architecture (absent in older files: torchvision)
    arch            the architecture, as that library names it
    class_names     what each output means (None when the source did not say)
    state_dict      the weights
    preprocessing   model.pt only: image_size, mean, std, as validation and serving apply them
    config, summary model.pt only: the finetune settings that produced it and its summary
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FORMAT = "finetune-pipeline/checkpoint-v1"


@dataclass(frozen=True)
class Checkpoint:
    arch: str
    class_names: list[str] | None
    state_dict: dict
    preprocessing: dict | None = None
    config: dict | None = None
    summary: dict | None = None
    library: str = "torchvision"

    def to_dict(self) -> dict:
        optional = {k: getattr(self, k) for k in ("preprocessing", "config", "summary") if getattr(self, k) is not None}
        return {"format": FORMAT, "library": self.library, "arch": self.arch, "class_names": self.class_names,
                "state_dict": self.state_dict, **optional}


def is_checkpoint(obj: object) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def from_dict(obj: dict) -> Checkpoint:
    return Checkpoint(obj["arch"], obj.get("class_names"), obj["state_dict"], obj.get("preprocessing"),
                      obj.get("config"), obj.get("summary"), obj.get("library", "torchvision"))


def save(checkpoint: Checkpoint, path: str | Path) -> None:
    from components.storage.atomic import save_torch

    save_torch(checkpoint.to_dict(), path)


def load(path: str | Path) -> Checkpoint:
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not is_checkpoint(obj):
        raise ValueError(f"{path}: not a {FORMAT} file")
    return from_dict(obj)
