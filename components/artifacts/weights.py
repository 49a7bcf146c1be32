"""The pretrained weights artifact (components.fetch_pretrained writes it; finetune reads it).

    weights.pt        the weights as a checkpoint (components/artifacts/checkpoint.py)
    pretrained.json   where they came from: uri, resolved_uri, sha256 of the fetched file, size_bytes,
                      arch, num_classes, class_names, pinned, and the version resolve pinned
"""

from __future__ import annotations

from pathlib import Path

from components.artifacts import checkpoint
from components.artifacts.checkpoint import Checkpoint
from components.storage.atomic import atomic_dir, read_json, write_json

WEIGHTS, INFO = "weights.pt", "pretrained.json"


def write(out: str | Path, weights: Checkpoint, info: dict) -> None:
    with atomic_dir(out) as tmp:
        checkpoint.save(weights, tmp / WEIGHTS)
        write_json(tmp / INFO, info)


def read_info(folder: str | Path) -> dict:
    return read_json(Path(folder) / INFO)


def load(folder: str | Path) -> Checkpoint:
    return checkpoint.load(Path(folder) / WEIGHTS)


def record_files(folder: str | Path) -> list[Path]:
    return [Path(folder) / INFO]
