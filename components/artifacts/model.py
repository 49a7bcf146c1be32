"""The fine-tuned model artifact (components.finetune writes it; validate reads it).

    model.pt              the best epoch's weights as a checkpoint, with the preprocessing, the finetune
                          settings and the summary (components/artifacts/checkpoint.py)
    history.json          one row per epoch: losses, accuracies, learning rate, when it ended
    summary.json          best epoch, its losses, epochs run, parameters, device, weights digest, config
    training_curves.png   the history as a picture
    run.json              the MLflow run that trained it (components/artifacts/run_record.py), when tracked
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from components.artifacts import checkpoint, run_record
from components.artifacts.checkpoint import Checkpoint
from components.artifacts.run_record import RunRecord
from components.storage.atomic import atomic_dir, read_json, write_json

MODEL, HISTORY, SUMMARY, CURVES = "model.pt", "history.json", "summary.json", "training_curves.png"


def write(out: str | Path, model: Checkpoint, history: list[dict], summary: dict, draw_curves,
          run: RunRecord | None = None) -> None:
    """Every file of the artifact, all or nothing; `draw_curves(history, best_epoch, path)` draws the curves."""
    with atomic_dir(out) as tmp:
        checkpoint.save(model, tmp / MODEL)
        write_json(tmp / HISTORY, history)
        write_json(tmp / SUMMARY, summary)
        draw_curves(history, summary["best_epoch"], tmp / CURVES)
        if run:
            run_record.write(tmp, run)


@dataclass(frozen=True)
class Model:
    """A model artifact as validate and MLflow read it (the weights stay on disk until loaded)."""
    checkpoint: Path             # model.pt
    summary: dict
    history: list[dict]
    run: RunRecord | None        # the MLflow run that trained it
    files: list[Path]            # what MLflow keeps of it beside the registered model


def read(folder: str | Path) -> Model:
    return Model(checkpoint_file(folder), read_summary(folder), read_history(folder), read_run(folder),
                 record_files(folder))


def checkpoint_file(folder: str | Path) -> Path:
    """model.pt: what validate and serving load, and what the registry keeps."""
    return Path(folder) / MODEL


def load(folder: str | Path) -> Checkpoint:
    return checkpoint.load(checkpoint_file(folder))


def read_history(folder: str | Path) -> list[dict]:
    return read_json(Path(folder) / HISTORY)


def read_summary(folder: str | Path) -> dict:
    return read_json(Path(folder) / SUMMARY)


def read_run(folder: str | Path) -> RunRecord | None:
    return run_record.read(folder)


def curves(folder: str | Path) -> Path:
    return Path(folder) / CURVES


def record_files(folder: str | Path) -> list[Path]:
    """What MLflow keeps of it beside the registered model."""
    return [Path(folder) / name for name in (HISTORY, SUMMARY, CURVES)]
