"""Which MLflow run a model (run.json in the model folder) or its reports (run.json in the reports)
belong to: the model's says which run trained it; the reports' say which run holds the validated
model that register registers (`model_uri`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from components.storage.atomic import read_json, write_json

FILE = "run.json"


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    run_name: str
    tracking_uri: str          # redacted
    experiment_id: str = ""    # the reports' record
    model_uri: str = ""        # the reports' record: the logged model register registers


def write(folder: str | Path, record: RunRecord) -> None:
    data = asdict(record)
    write_json(Path(folder) / FILE, {k: v for k, v in data.items() if v != "" or k in ("run_id", "run_name")})


def read(folder: str | Path) -> RunRecord | None:
    path = Path(folder) / FILE
    if not path.exists():
        return None
    data = read_json(path)
    return RunRecord(**{k: data.get(k, "") for k in RunRecord.__dataclass_fields__})
