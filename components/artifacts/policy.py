"""The augmentation policy artifact (components.augment writes it; finetune and MLflow read it).

    policy.json   the augment section it was built from (components/training/transforms.py turns it into transforms)
    preview.png   originals beside draws of the policy
"""

from __future__ import annotations

from pathlib import Path

from components.config import AugmentConfig, parse_section
from components.storage.atomic import atomic_dir, read_json, write_json

POLICY, PREVIEW = "policy.json", "preview.png"


def write(out: str | Path, policy: AugmentConfig, draw_preview) -> None:
    """policy.json, and the preview that `draw_preview(path)` draws, all or nothing."""
    with atomic_dir(out) as tmp:
        write_json(tmp / POLICY, policy.model_dump(mode="json"))
        draw_preview(tmp / PREVIEW)


def read(folder: str | Path) -> AugmentConfig:
    path = Path(folder) / POLICY
    return parse_section(AugmentConfig, read_json(path), "augment", where=str(path))


def read_raw(folder: str | Path) -> dict:
    """policy.json as written (what a checkpoint's run key and MLflow's parameters record)."""
    return read_json(Path(folder) / POLICY)


def preview(folder: str | Path) -> Path:
    return Path(folder) / PREVIEW


def record_files(folder: str | Path) -> list[Path]:
    return [Path(folder) / POLICY, Path(folder) / PREVIEW]
