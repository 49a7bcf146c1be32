"""Reading the dataset artifact that components.data writes (manifest.csv + report.json)."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from components.atomic import read_json
from components.images import load_rgb


def read_report(dataset_dir: str | Path) -> dict:
    return read_json(Path(dataset_dir) / "report.json")


def read_split(dataset_dir: str | Path, split: str) -> list[tuple[Path, str]]:
    """(absolute image path, class name) for every image of one split, in manifest order."""
    dataset_dir = Path(dataset_dir)
    with open(dataset_dir / "manifest.csv", newline="") as f:
        return [(dataset_dir / row["path"], row["label"]) for row in csv.DictReader(f) if row["split"] == split]


class ImageSplit(torch.utils.data.Dataset):
    """One split of the dataset artifact as (transformed image, class index) pairs."""

    def __init__(self, dataset_dir, split: str, transform, class_names: list[str] | None = None):
        self.class_names = class_names or read_report(dataset_dir)["classes"]
        index = {name: i for i, name in enumerate(self.class_names)}
        self.items = [(path, index[label]) for path, label in read_split(dataset_dir, split)]
        if not self.items:
            raise ValueError(f"{dataset_dir}: the '{split}' split is empty")
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        return self.transform(load_rgb(path)), label
