"""The fine-tuning controls: freezing by depth, gradual unfreezing, learning-rate groups and schedules,
and resuming a run that was killed mid-epoch."""

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
import yaml

from components.models import architectures as models
from components.augment import augment
from components.config import ConfigError, UnfreezeStep
from components.data import prepare
from demo.digits import export_digits
from components.fetch_pretrained import fetch
from components.finetune import finetune
from components.training.recipe import Recipe as Trainer, lr_factor
from helpers import ROOT, data_cfg, finetune_cfg, policy_cfg, pretrained_cfg, save_checkpoint


@pytest.mark.parametrize("arch, until, first_trainable, frozen_example", [
    ("resnet18", "layer3", "layer3.0.conv1.weight", "layer2.1.bn2.weight"),
    ("resnet50", "layer4", "layer4.0.conv1.weight", "layer3.5.conv3.weight"),
    ("mobilenet_v3_small", "features.4", "features.4.block.0.0.weight", "features.3.block.0.0.weight"),
    ("mobilenet_v3_large", "features.7", "features.7.block.0.0.weight", "features.6.block.0.0.weight"),
    ("efficientnet_b0", "features.5", "features.5.0.block.0.0.weight", "features.4.2.block.0.0.weight"),
])
def test_freeze_until_freezes_everything_before_the_named_module(arch, until, first_trainable, frozen_example):
    model = models.build(arch, 4)
    Trainer(model, finetune_cfg(freeze_until=until))
    params = dict(model.named_parameters())
    assert not params[frozen_example].requires_grad
    assert params[first_trainable].requires_grad
    names = list(params)
    assert all(not params[n].requires_grad for n in names[: names.index(first_trainable)])
    assert all(params[n].requires_grad for n in names[names.index(first_trainable):])


def test_freeze_until_an_unknown_module_lists_the_choices():
    with pytest.raises(ConfigError, match=r"finetune.freeze_until: no module 'layer9'; .*layer3"):
        Trainer(models.build("resnet18", 3), finetune_cfg(freeze_until="layer9"))


def test_warmup_then_cosine_and_step_schedules():
    cosine = finetune_cfg(schedule="cosine", warmup_epochs=2, max_epochs=6)
    assert [round(lr_factor(e, cosine), 4) for e in range(1, 7)] == [0.3333, 0.6667, 1.0, 0.8536, 0.5, 0.1464]
    step = finetune_cfg(schedule="step", step_size=2, gamma=0.5, max_epochs=6)
    assert [lr_factor(e, step) for e in range(1, 7)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_discriminative_learning_rates_make_their_own_groups():
    model = models.build("resnet18", 3)
    trainer = Trainer(model, finetune_cfg(freeze_until="layer3", lr=0.01,
                                            lr_groups=[{"modules": ["layer3"], "lr": 0.001}]))
    base, layer3 = trainer.optimizer.param_groups
    assert (base["base_lr"], layer3["base_lr"]) == (0.01, 0.001)
    assert {id(p) for p in layer3["params"]} == {id(p) for p in model.layer3.parameters()}
    assert not {id(p) for p in base["params"]} & {id(p) for p in layer3["params"]}


def test_gradual_unfreezing_wakes_modules_at_their_epoch_with_their_rate(artifacts):
    cfg = finetune_cfg(freeze_until="layer3", unfreeze=[UnfreezeStep(epoch=2, modules=["layer2"], lr=0.002)],
                         max_epochs=2, patience=2, batch_size=16)
    before = torch.load(artifacts / "pre" / "weights.pt", weights_only=True)["state_dict"]
    finetune(artifacts / "data", artifacts / "aug", artifacts / "pre", artifacts / "one", cfg.model_copy(
        update={"max_epochs": 1, "unfreeze": cfg.unfreeze}))
    one = torch.load(artifacts / "one" / "model.pt", weights_only=True)["state_dict"]
    assert torch.equal(one["layer2.0.conv1.weight"], before["layer2.0.conv1.weight"])  # still frozen in epoch 1
    finetune(artifacts / "data", artifacts / "aug", artifacts / "pre", artifacts / "two", cfg)
    two = torch.load(artifacts / "two" / "model.pt", weights_only=True)["state_dict"]
    history = json.loads((artifacts / "two" / "history.json").read_text())
    assert not torch.equal(two["layer2.0.conv1.weight"], before["layer2.0.conv1.weight"])
    assert not torch.equal(two["layer2.0.bn1.running_mean"], before["layer2.0.bn1.running_mean"])  # BN woke too
    assert torch.equal(two["layer1.0.conv1.weight"], before["layer1.0.conv1.weight"])
    assert history[1]["trainable_parameters"] > history[0]["trainable_parameters"]


@pytest.fixture(scope="module")
def digits_inputs(tmp_path_factory):
    t = tmp_path_factory.mktemp("resume")
    export_digits([5, 6, 7, 8, 9], t / "raw")
    prepare(t / "raw", t / "data", data_cfg(source=str(t / "raw"), workers=1))
    augment(t / "data", t / "aug", policy_cfg(image_size=32, resize_scale=(0.8, 1.0), hflip=0, rotation=10,
                                                 preview_images=2))
    fetch(pretrained_cfg(uri=str(save_checkpoint(t / "zoo.pt", "resnet18", list("abcde"))), arch="resnet18"),
          t / "pre")
    return t


def _finetune_process(t, name: str, checkpoint_dir, devices: int = 1, prefix_cache: bool = True,
                      num_workers: int = 0) -> subprocess.Popen:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["finetune"].update(max_epochs=5, patience=5, freeze_until="layer2", checkpoint_dir=str(checkpoint_dir),
                           unfreeze=[{"epoch": 3, "modules": ["layer1"], "lr": 0.003}], schedule="cosine",
                           warmup_epochs=1, devices=devices, prefix_cache=prefix_cache, num_workers=num_workers)
    raw["tracking"]["system_metrics"] = False
    (t / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    return subprocess.Popen([sys.executable, "-m", "components.finetune", "--params", str(t / f"{name}.yaml"),
                             "--dataset", str(t / "data"), "--policy", str(t / "aug"), "--weights", str(t / "pre"),
                             "--out", str(t / name)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


@pytest.mark.parametrize("devices, prefix_cache, num_workers", [(1, True, 0), (2, True, 0), (1, False, 2), (2, False, 2)],
                         ids=["one-process", "two-processes", "one-process-uncached-2-loader-workers",
                              "two-processes-uncached-2-loader-workers"])
def test_run_killed_in_epoch_3_resumes_after_epoch_2_and_ends_with_identical_weights(digits_inputs, devices,
                                                                                    prefix_cache, num_workers):
    # two processes: the launcher and both are killed (one process group), then all resume; the unfreezing
    # at epoch 3 comes after the resume, so the model is wrapped for data parallel again then. Loader
    # workers (persistent, augmenting in their own processes) and the uncached path: the random draws of the
    # augmentation must not depend on how the run got to an epoch.
    t = digits_inputs
    straight_name, resumed_name = (f"straight-{devices}-{prefix_cache}-{num_workers}",
                                   f"resumed-{devices}-{prefix_cache}-{num_workers}")
    loader = dict(prefix_cache=prefix_cache, num_workers=num_workers)
    straight = _finetune_process(t, straight_name, t / f"ckpt-{straight_name}", devices, **loader)
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out

    killed = _finetune_process(t, resumed_name, t / f"ckpt-{resumed_name}", devices, **loader)
    marker = t / f"ckpt-{resumed_name}" / "last.json"
    deadline = time.time() + 240
    while not (marker.exists() and json.loads(marker.read_text())["epoch"] == 2):
        assert killed.poll() is None and time.time() < deadline, "never reached the end of epoch 2"
        time.sleep(0.02)
    time.sleep(0.5)  # well into epoch 3
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert json.loads(marker.read_text())["epoch"] == 2 and not (t / resumed_name).exists()

    resumed = _finetune_process(t, resumed_name, t / f"ckpt-{resumed_name}", devices, **loader)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resuming after epoch 2" in out

    a = torch.load(t / straight_name / "model.pt", weights_only=True)
    b = torch.load(t / resumed_name / "model.pt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    untimed = [[{k: v for k, v in row.items() if k != "time"} for row in json.loads((t / name / "history.json")
                                                                                  .read_text())]
               for name in (straight_name, resumed_name)]
    assert untimed[0] == untimed[1]
    assert not marker.exists()  # a finished run leaves no checkpoint to resume by mistake

    # one MLflow run across the kill: epochs 1-2 before it, 3-5 after, FINISHED at the end
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run_id = json.loads((t / resumed_name / "run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["last_finished_epoch"] == "5"
    steps = [m.step for m in client.get_metric_history(run_id, "val_loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5]
    experiment = run.info.experiment_id
    assert len(client.search_runs([experiment])) == 2  # straight and resumed, nothing for the killed attempt


def test_reinit_resets_only_the_named_modules_with_the_architectures_own_init():
    torch.manual_seed(0)
    model = models.build("resnet18", 4)
    for p in model.parameters():
        p.data.fill_(0.5)  # stands for trained weights
    reset = models.reinit(model, "resnet18", ["layer4"])
    assert reset and all(k.startswith("layer4.") for k in reset)
    state = model.state_dict()
    assert torch.all(state["layer3.1.conv2.weight"] == 0.5) and torch.all(state["fc.weight"] == 0.5)
    assert state["layer4.0.bn1.weight"].eq(1).all()  # torchvision's BatchNorm init: weight 1, bias 0
    assert state["layer4.1.conv2.weight"].std() > 0.01  # kaiming-initialised, not 0.5 everywhere
    with pytest.raises(ConfigError, match=r"finetune.reinit: pattern 'layer7' matches no module"):
        models.reinit(model, "resnet18", ["layer7"])
