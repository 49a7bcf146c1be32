"""The validation reports artifact (components.validate writes it; register, Kubeflow and MLflow read it).

    metrics.json          test-split accuracy, macro F1, per-class recall and precision, ECE, confusion matrix
    gate.json             the decision: every check, the champion comparison, the reasons
    per_class.csv, predictions.csv, calibration.csv        the tables (DVC plots read the last two)
    confusion_matrix.png, reliability.png, misclassified.png
    run.json              the MLflow run holding the validated model (components/artifacts/run_record.py)

and, where DVC asks for it, the headline figures in a git-tracked file (write_headline) and a copy of
what its plots draw in a folder DVC caches (write_plots).
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

from components.artifacts import run_record
from components.artifacts.run_record import RunRecord
from components.storage.atomic import atomic_dir, drafted, read_json, write_csv, write_json

METRICS, GATE = "metrics.json", "gate.json"
PER_CLASS, PREDICTIONS, CALIBRATION = "per_class.csv", "predictions.csv", "calibration.csv"
CONFUSION, RELIABILITY, MISCLASSIFIED = "confusion_matrix.png", "reliability.png", "misclassified.png"
PICTURES = (("Confusion matrix", CONFUSION), ("Reliability diagram", RELIABILITY),
            ("Most confident mistakes", MISCLASSIFIED))


class Draft:
    """The reports being written (inside `publish`); pictures are drawn to `picture(name)`."""

    def __init__(self, folder: Path):
        self.folder = folder

    def write(self, metrics: dict, gate: dict, tables: dict[str, tuple[list, list]]) -> None:
        """metrics.json, gate.json, and each table {file name: (header, rows)}."""
        write_json(self.folder / METRICS, metrics)
        write_json(self.folder / GATE, gate)
        for name, (header, table) in tables.items():
            write_csv(self.folder / name, header, table)

    def picture(self, name: str) -> Path:
        return self.folder / name

    def files(self) -> list[Path]:
        """What MLflow keeps of the reports (all but the run record)."""
        return sorted(p for p in self.folder.iterdir() if p.name != run_record.FILE)

    def record(self, run: RunRecord) -> None:
        run_record.write(self.folder, run)


def write_headline(path: str | Path, metrics: dict, gate: dict, training: dict) -> None:
    """The run's headline figures in one small file that git keeps (DVC's metrics: `dvc exp show` and
    `dvc metrics diff` compare experiments by it): test accuracy and macro F1, the best validation loss and
    its epoch, the gate's verdict and what it was compared with. The detailed reports stay in this folder."""
    champion = gate.get("champion") or {}
    write_json(Path(path), {
        "test_accuracy": round(float(metrics["accuracy"]), 6), "test_macro_f1": round(float(metrics["macro_f1"]), 6),
        "best_val_loss": round(float(training["best_val_loss"]), 6), "best_epoch": int(training["best_epoch"]),
        "gate_passed": bool(gate["passed"]),
        "compared_with": f"v{champion['champion_version']}" if champion.get("status") == "compared"
        else champion.get("status", "none")})


PLOTTED = (PREDICTIONS, CALIBRATION, *(name for _, name in PICTURES))


def write_plots(folder: str | Path, out: str | Path) -> None:
    """The tables and pictures DVC's plots draw, copied from the reports at `folder` to `out`, a folder DVC
    caches: an experiment's dvc.lock names them, so `dvc plots diff` of two experiments draws every plot.
    (The reports folder itself names this workspace's MLflow run, so DVC does not cache it.)"""
    with atomic_dir(out) as tmp:
        for name in PLOTTED:
            shutil.copy2(Path(folder) / name, tmp / name)


def publish(out: str | Path):
    """`with publish(out) as draft:` the reports appear at `out` whole when the block ends, or not at all."""
    return drafted(out, Draft)


def read_metrics(folder: str | Path) -> dict:
    return read_json(Path(folder) / METRICS)


def read_gate(folder: str | Path) -> dict:
    return read_json(Path(folder) / GATE)


def read_run(folder: str | Path) -> RunRecord:
    record = run_record.read(folder)
    if record is None:
        raise FileNotFoundError(2, "no run record: validate did not finish", str(Path(folder) / run_record.FILE))
    return record


@dataclass(frozen=True)
class Verdict:
    """What register needs of validation: did the model pass, and what was it compared with."""
    passed: bool
    reasons: list[str]
    champion_seen: str | None   # the version `register.alias` pointed at when validate read it
    comparison: str             # compared | disabled | no_champion | not_comparable
    not_compared: str           # why not, when comparison is not "compared"
    run: RunRecord


def read_verdict(folder: str | Path) -> Verdict:
    gate = read_gate(folder)
    champion = gate.get("champion") or {}
    status = champion.get("status") or ("compared" if "lower_bound" in champion else
                                        "not_comparable" if champion.get("champion_version") else "no_champion")
    return Verdict(gate["passed"], list(gate["reasons"]), champion.get("champion_version"), status,
                   champion.get("skipped", ""), read_run(folder))


def per_class_rows(folder: str | Path) -> list[list[str]]:
    with open(Path(folder) / PER_CLASS, newline="") as f:
        return list(csv.reader(f))


def pictures(folder: str | Path) -> list[tuple[str, Path]]:
    return [(title, Path(folder) / name) for title, name in PICTURES]
