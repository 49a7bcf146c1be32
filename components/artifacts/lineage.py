"""What a model was trained from, as the upstream artifacts record it: what its MLflow run logs as
parameters, tags and input files (components/tracking/runs.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from components.artifacts import dataset, policy, weights


@dataclass(frozen=True)
class TrainingInputs:
    report: dict                # the dataset's report.json
    policy: dict                # policy.json as written
    pretrained: dict            # pretrained.json
    finetune: dict              # the finetune settings that trained it
    files: dict[str, list[Path]] = field(default_factory=dict)  # MLflow artifact folder -> files


def training_inputs(dataset_dir, policy_dir, weights_dir, finetune: dict) -> TrainingInputs:
    return TrainingInputs(dataset.read_report(dataset_dir), policy.read_raw(policy_dir), weights.read_info(weights_dir),
                          finetune, {"data": dataset.record_files(dataset_dir),
                                     "augment": policy.record_files(policy_dir),
                                     "pretrained": weights.record_files(weights_dir)})
