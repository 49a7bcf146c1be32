"""Training that cannot go on fails at once, naming where and why, and leaves no model behind; a
damaged checkpoint does not block the next run; settings that could only fail mid-run fail first."""

import json
import math

import yaml

import pytest
import torch

from components.storage.atomic import write_json
from components.config import ConfigError, UnfreezeStep, load_params
from components.finetune import TrainingError, finetune
from helpers import ROOT, finetune_cfg


def _train(artifacts, **changes):
    return finetune(artifacts / "data", artifacts / "aug", artifacts / "pre", artifacts / "model",
                    finetune_cfg(batch_size=16, **changes))


def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_writes_no_model(artifacts):
    with pytest.raises(TrainingError, match=r"epoch 1(, batch \d+)?: (training|validation) loss is (nan|inf).*"
                                            r"diverged.*finetune\.lr \(1000000\.0\) too high"):
        _train(artifacts, lr=1e6, max_epochs=3)
    assert not (artifacts / "model").exists()


def test_json_outputs_never_hold_nan_or_infinity(tmp_path):
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="not JSON compliant"):
            write_json(tmp_path / "x.json", {"val_loss": bad})
        assert not (tmp_path / "x.json").exists()


def test_a_truncated_checkpoint_is_set_aside_named_and_the_run_starts_afresh(artifacts, tmp_path, capfd):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"epoch": 1, "model": torch.zeros(1000)}, ckpt / "last.pt")  # a killed run's checkpoint...
    data = (ckpt / "last.pt").read_bytes()
    (ckpt / "last.pt").write_bytes(data[: len(data) // 3])  # ...cut short by a full disk
    epochs = []
    finetune(artifacts / "data", artifacts / "aug", artifacts / "pre", artifacts / "model",
             finetune_cfg(batch_size=16, max_epochs=2, checkpoint_dir=str(ckpt)), on_epoch=epochs.append)
    assert [row["epoch"] for row in epochs] == [1, 2]  # trained from epoch 1: nothing to resume from
    err = capfd.readouterr().err
    assert f"checkpoint {ckpt / 'last.pt'} is unreadable" in err and "starting afresh" in err
    aside = list(ckpt.glob("last.pt.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == data[: len(data) // 3]  # kept for a look, not lost


def test_a_typo_in_unfreeze_fails_before_the_first_epoch(artifacts):
    epochs = []
    with pytest.raises(ConfigError, match=r"finetune.unfreeze: pattern 'layer5' matches no module"):
        finetune(artifacts / "data", artifacts / "aug", artifacts / "pre", artifacts / "model",
                 finetune_cfg(batch_size=16, max_epochs=3, freeze=["layer4"],
                              unfreeze=[UnfreezeStep(epoch=2, modules=["layer5"])]),
                 on_epoch=epochs.append)
    assert epochs == []  # no epoch was trained before the error


def test_an_unfreeze_epoch_after_max_epochs_is_refused_with_the_settings(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["finetune"].update(max_epochs=5, unfreeze=[{"epoch": 9, "modules": ["layer4"]}])
    (tmp_path / "params.yaml").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"finetune.*unfreeze: epoch 9 is after max_epochs \(5\)"):
        load_params(tmp_path / "params.yaml")
