"""Reading the dataset artifact that components.data writes.

The artifact is small: manifest.csv (path, label, split, sha256, width, height per image),
report.json, and source.json, which says where the images are:
    folder     `location` is the folder read (the path as configured); images are read in place
    s3         `location` is s3://bucket/prefix/; a step fetches only the images it uses into the
               content cache ($FINETUNE_CACHE/sha256/<digest>), each checked against its sha256
    artifact   the images were copied into the artifact's `images/` (sources whose credentials
               the later steps do not have: a DVC-tracked git repository)
The manifest's sha256 makes every reference immutable: an image that changed after the data step
read it is refused, never trained on.
"""

from __future__ import annotations

import csv
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from components.atomic import atomic_file, cache_dir, read_json
from components.images import load_rgb

SOURCE = "source.json"


class DatasetError(ValueError):
    """An image the manifest names cannot be had as it was; the message names it and why."""


def read_report(dataset_dir: str | Path) -> dict:
    return read_json(Path(dataset_dir) / "report.json")


def read_manifest(dataset_dir: str | Path, split: str) -> list[dict]:
    """The manifest rows of one split (path inside the source, label, sha256, ...), in order."""
    with open(Path(dataset_dir) / "manifest.csv", newline="") as f:
        return [row for row in csv.DictReader(f) if row["split"] == split]


def read_split(dataset_dir: str | Path, split: str, pick=None) -> list[tuple[Path, str]]:
    """(local image path, class name) for every image of one split, in manifest order.

    `pick`: a function choosing which of the split's manifest rows to read (default: all), so a
    step that needs a few images fetches only those."""
    dataset_dir = Path(dataset_dir)
    rows = read_manifest(dataset_dir, split)
    rows = pick(rows) if pick else rows
    source = read_json(dataset_dir / SOURCE) if (dataset_dir / SOURCE).exists() else {"kind": "artifact"}
    if source["kind"] == "artifact":
        return [(dataset_dir / "images" / row["path"], row["label"]) for row in rows]
    if source["kind"] == "folder":
        return [(Path(source["location"]) / row["path"], row["label"]) for row in rows]
    return list(zip(_fetch_s3(source["location"], rows), (row["label"] for row in rows)))


def _fetch_s3(location: str, rows: list[dict]) -> list[Path]:
    """The cached copy of each row's object, downloading the missing ones (8 at a time)."""
    import botocore.exceptions

    from components.data_sources import s3_client, s3_prefix

    bucket, prefix = s3_prefix(location)
    s3 = s3_client()
    root = cache_dir() / "sha256"

    def fetch(row: dict) -> Path:
        path = root / row["sha256"]
        if path.is_file():
            return path
        uri = f"s3://{bucket}/{prefix}{row['path']}"
        try:
            body = s3.get_object(Bucket=bucket, Key=prefix + row["path"])["Body"].read()
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
            raise DatasetError(f"dataset: {uri}: cannot read it ({err})") from None
        if hashlib.sha256(body).hexdigest() != row["sha256"]:
            raise DatasetError(f"dataset: {uri} changed after the data step read it (manifest sha256 "
                               f"{row['sha256'][:12]}): run the pipeline again")
        with atomic_file(path) as tmp:
            tmp.write_bytes(body)
        return path

    root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(fetch, rows))


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
