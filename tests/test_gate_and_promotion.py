"""The gate against the current champion, and promotion in the registry, on a real `mlflow server`."""

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch

from components.models import architectures as models
from components import validate as validate_step
from components.artifacts import reports
from components.augment import augment
from components.evaluation.comparison import paired_comparison
from components.config import RegisterConfig
from components.data import prepare
from demo.digits import export_digits
from components.fetch_pretrained import fetch
from components.finetune import finetune
from components.register import register
from helpers import ROOT, data_cfg, finetune_cfg, policy_cfg, pretrained_cfg, register_cfg, save_checkpoint, \
    tracking_cfg, validate_cfg


def test_identical_models_are_not_worse():
    correct = np.random.default_rng(0).random(200) < 0.8
    result = paired_comparison(correct, correct, margin=0.01, confidence=0.95, samples=500)
    assert result["accuracy_difference"] == 0 and result["lower_bound"] == 0 and result["passed"]
    assert result["mcnemar_p_value"] == 1.0


def test_clearly_worse_challenger_fails_and_mcnemar_matches_the_exact_binomial():
    champion = np.ones(100, dtype=bool)
    challenger = champion.copy()
    challenger[:10] = False  # 10 discordant pairs, all in the champion's favour
    result = paired_comparison(challenger, champion, margin=0.01, confidence=0.95, samples=2000)
    assert not result["passed"] and result["lower_bound"] < -0.04
    assert result["only_champion_correct"] == 10 and result["only_challenger_correct"] == 0
    assert result["mcnemar_p_value"] == pytest.approx(2 * 0.5 ** 10)


def test_small_loss_within_the_margin_passes_but_not_beyond_it():
    rng = np.random.default_rng(1)
    champion = rng.random(2000) < 0.9
    challenger = champion.copy()
    challenger[np.flatnonzero(champion)[:4]] = False  # 0.2 points worse
    assert paired_comparison(challenger, champion, 0.02, 0.95, 1000)["passed"]
    assert not paired_comparison(challenger, champion, 0.0, 0.95, 1000)["passed"]


# ---- against the registry ------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A ResNet-18 fine-tuned on digits 5, 6, 7 (about 0.9 test accuracy), and what it was made from."""
    t = tmp_path_factory.mktemp("digits")
    export_digits([5, 6, 7], t / "raw")
    prepare(t / "raw", t / "data", data_cfg(source=str(t / "raw"), workers=1))
    augment(t / "data", t / "aug", policy_cfg(image_size=16, resize_scale=(0.85, 1.0), hflip=0, rotation=5,
                                                 preview_images=2))
    fetch(pretrained_cfg(uri=str(save_checkpoint(t / "zoo.pt", "resnet18", ["a", "b", "c"])), arch="resnet18"),
          t / "pre")
    finetune(t / "data", t / "aug", t / "pre", t / "good", finetune_cfg(lr=0.02, batch_size=32, max_epochs=4))
    for seed in (1, 2):  # two more good models with other weights (the race below)
        finetune(t / "data", t / "aug", t / "pre", t / f"good-{seed}",
                 finetune_cfg(lr=0.02, batch_size=32, max_epochs=4, seed=seed))
    # A broken challenger: the same network, but its output layer always says "5".
    ckpt = torch.load(t / "good" / "model.pt", weights_only=True)
    ckpt["state_dict"]["fc.weight"].zero_()
    ckpt["state_dict"]["fc.bias"].copy_(torch.tensor([5.0, 0.0, 0.0]))
    (t / "broken").mkdir()
    for name in ("history.json", "training_curves.png"):
        (t / "broken" / name).write_bytes((t / "good" / name).read_bytes())
    summary = json.loads((t / "good" / "summary.json").read_text())
    summary["weights_sha256"] = models.weights_digest(ckpt["state_dict"])
    (t / "broken" / "summary.json").write_text(json.dumps(summary))
    torch.save(ckpt, t / "broken" / "model.pt")
    return t


@pytest.fixture
def server(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    return mlflow.MlflowClient()


def _pipeline_run(digits, model: str, out, registry: RegisterConfig, cfg=validate_cfg(), data="data") -> dict:
    """The validate step as the pipeline runs it: against whatever is champion now, then the run."""
    gate, _ = validate_step.run(digits / data, digits / "aug", digits / "pre", digits / model, out, cfg, registry,
                                tracking_cfg("gate-tests"), "test", "test-run")
    return gate


def test_without_a_champion_the_thresholds_alone_decide(digits, server, tmp_path):
    reg = register_cfg(model_name="digits-first")
    gate = _pipeline_run(digits, "good", tmp_path / "v", reg, validate_cfg(min_accuracy=0.5))
    assert gate["passed"]
    assert gate["champion"] == {"status": "no_champion", "skipped": "no champion yet: the thresholds alone decide"}
    result = register(tmp_path / "v", tmp_path / "r.json", reg)
    assert result["promoted"] and result["aliases"] == ["challenger", "champion"]


def test_challenger_worse_than_the_champion_fails_the_gate_with_the_test_in_the_reasons(digits, server, tmp_path):
    reg = register_cfg(model_name="digits-worse")
    _pipeline_run(digits, "good", tmp_path / "a", reg)
    register(tmp_path / "a", tmp_path / "a.json", reg)
    gate = _pipeline_run(digits, "broken", tmp_path / "b", reg)  # passes every threshold (all 0)
    assert not gate["passed"]
    assert gate["champion"]["champion_version"] == "1" and not gate["champion"]["passed"]
    assert gate["champion"]["only_champion_correct"] > 20 and gate["champion"]["mcnemar_p_value"] < 1e-6
    assert gate["reasons"][0].startswith("worse than champion v1: accuracy difference lower bound -0.")
    assert not register(tmp_path / "b", tmp_path / "b.json", reg)["registered"]
    assert server.get_model_version_by_alias("digits-worse", "champion").version in (1, "1")
    logged = json.loads((tmp_path / "b" / "gate.json").read_text())
    assert logged["champion"]["lower_bound"] == gate["champion"]["lower_bound"]
    assert logged["champion"]["champion_metrics"]["accuracy"] == gate["champion"]["champion_accuracy"] > 0.6

    from pipelines.views import gate_markdown, validation_html  # what the Kubeflow UI shows
    page = gate_markdown(gate, reports.read_run(tmp_path / "b"))
    assert "FAILED" in page and "Against champion v1" in page and "McNemar exact p-value" in page
    assert validation_html(tmp_path / "b").count("data:image/png;base64,") == 3


def test_champion_with_other_classes_is_skipped_with_the_reason(digits, server, tmp_path):
    reg = register_cfg(model_name="digits-other-classes")
    export_digits([1, 2], tmp_path / "raw12")
    prepare(tmp_path / "raw12", tmp_path / "data12", data_cfg(source=str(tmp_path / "raw12"), workers=1))
    finetune(tmp_path / "data12", digits / "aug", digits / "pre", tmp_path / "m12",
             finetune_cfg(lr=0.02, max_epochs=1))
    validate_step.run(tmp_path / "data12", digits / "aug", digits / "pre", tmp_path / "m12", tmp_path / "v12",
                      validate_cfg(), reg, tracking_cfg("gate-tests"), "test", "test-run")
    register(tmp_path / "v12", tmp_path / "r12.json", reg)

    gate = _pipeline_run(digits, "good", tmp_path / "v", reg)
    assert gate["passed"]
    assert "has classes ['1', '2'], the challenger ['5', '6', '7']: not comparable" in gate["champion"]["skipped"]
    # ...and the champion is not replaced by a model it was never compared with: that is a person's call
    result = register(tmp_path / "v", tmp_path / "r.json", reg)
    assert result["registered"] and not result["promoted"] and result["aliases"] == ["challenger"]
    assert result["promotion"].startswith("not promoted: champion v1 has classes ['1', '2']")
    assert server.get_model_version_by_alias("digits-other-classes", "champion").version in (1, "1")


class _Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return [0] * len(model_input)


def test_champion_registered_by_other_means_is_skipped_not_a_crash(digits, server, tmp_path):
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=_Constant())
    version = mlflow.register_model(info.model_uri, "digits-foreign")
    server.set_registered_model_alias("digits-foreign", "champion", version.version)
    gate = _pipeline_run(digits, "good", tmp_path / "v", register_cfg(model_name="digits-foreign"))
    assert gate["passed"]
    assert gate["champion"]["skipped"].startswith("champion v1 is not comparable: it holds no pipeline checkpoint")


def test_manual_promotion_sets_only_the_challenger_alias(digits, server, tmp_path):
    reg = register_cfg(model_name="digits-manual", promotion="manual")
    _pipeline_run(digits, "good", tmp_path / "v", reg)
    result = register(tmp_path / "v", tmp_path / "r.json", reg)
    assert not result["promoted"] and result["aliases"] == ["challenger"]
    assert int(server.get_model_version_by_alias("digits-manual", "challenger").version) == result["version"]
    with pytest.raises(mlflow.exceptions.MlflowException):
        server.get_model_version_by_alias("digits-manual", "champion")


def test_two_pipelines_finishing_together_promote_one_and_lose_no_version(digits, server, tmp_path, mlflow_server):
    """Both were validated against champion v1; they register at the same moment in two processes."""
    reg = register_cfg(model_name="digits-race")
    _pipeline_run(digits, "good", tmp_path / "v1", reg)
    register(tmp_path / "v1", tmp_path / "r1.json", reg)
    for name, model in (("a", "good-1"), ("b", "good-2")):  # any loss to the champion allowed: the race is tested
        gate = _pipeline_run(digits, model, tmp_path / name, reg, validate_cfg(champion_margin=1.0))
        assert gate["passed"] and gate["champion"]["champion_version"] == "1"

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace(
        "model_name: digits-5-9-resnet18", "model_name: digits-race"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    procs = [subprocess.Popen([sys.executable, "-m", "components.register", "--params", str(tmp_path / "params.yaml"),
                               "--reports", str(tmp_path / name), "--out", str(tmp_path / f"{name}.json")],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in ("a", "b")]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out

    results = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("a", "b")]
    assert sorted(r["version"] for r in results) == [2, 3]  # no version lost
    assert sorted(r["promoted"] for r in results) == [False, True]  # exactly one moved the alias
    winner = next(r for r in results if r["promoted"])
    loser = next(r for r in results if not r["promoted"])
    assert int(server.get_model_version_by_alias("digits-race", "champion").version) == winner["version"]
    assert loser["promotion"] == f"not promoted: @champion moved from v1 to v{winner['version']} after validation"
    assert [m.name for m in server.search_registered_models("name LIKE 'digits-race%'")] == ["digits-race"]  # lock gone

    again = register(tmp_path / "a", tmp_path / "a2.json", reg)  # a retry of run a
    assert again["reused_existing_version"] and again["version"] == results[0]["version"]
    assert len(server.search_model_versions("name = 'digits-race'")) == 3


def test_an_unwritable_output_fails_before_anything_is_registered_and_a_retry_completes(digits, server, tmp_path):
    reg = register_cfg(model_name="digits-intent")
    _pipeline_run(digits, "good", tmp_path / "v", reg)
    (tmp_path / "not-a-folder").write_text("a file where the output folder should be")
    with pytest.raises(OSError):
        register(tmp_path / "v", tmp_path / "not-a-folder" / "registration.json", reg)
    assert server.search_model_versions("name = 'digits-intent'") == []  # no version, no alias moved
    result = register(tmp_path / "v", tmp_path / "r.json", reg)  # the retry, with a writable output
    assert result["version"] == 1 and result["aliases"] == ["challenger", "champion"]
    assert json.loads((tmp_path / "r.json").read_text()) == result


def test_the_challenger_alias_never_moves_back_to_an_older_version(digits, server, tmp_path):
    reg = register_cfg(model_name="digits-forward", promotion="manual")
    _pipeline_run(digits, "good", tmp_path / "a", reg)
    _pipeline_run(digits, "good-1", tmp_path / "b", reg)
    assert register(tmp_path / "a", tmp_path / "a.json", reg)["version"] == 1
    assert register(tmp_path / "b", tmp_path / "b.json", reg)["version"] == 2
    again = register(tmp_path / "a", tmp_path / "a-again.json", reg)  # an old run's register, re-run
    assert again["version"] == 1 and again["reused_existing_version"] and again["aliases"] == []
    assert server.get_model_version_by_alias("digits-forward", "challenger").version in (2, "2")


def test_with_the_champion_comparison_off_the_thresholds_alone_promote(digits, server, tmp_path):
    """validate.compare_with_champion: false once blocked promotion for good once a champion existed
    ("@champion moved from nobody to v1 after validation"): nothing was compared, so nothing can have moved."""
    reg = register_cfg(model_name="digits-no-compare")
    _pipeline_run(digits, "good", tmp_path / "a", reg)
    assert register(tmp_path / "a", tmp_path / "a.json", reg)["aliases"] == ["challenger", "champion"]
    gate = _pipeline_run(digits, "good-1", tmp_path / "b", reg, validate_cfg(compare_with_champion=False))
    assert gate["passed"] and gate["champion"]["status"] == "disabled"
    result = register(tmp_path / "b", tmp_path / "b.json", reg)
    assert result["promoted"] and result["version"] == 2 and result["aliases"] == ["challenger", "champion"]
    assert result["promotion"] == ("@champion moved from v1 on the thresholds alone "
                                   "(validate.compare_with_champion is false)")
    assert server.get_model_version_by_alias("digits-no-compare", "champion").version in (2, "2")


def test_with_manual_promotion_the_same_weights_validated_again_are_not_registered_again(digits, server, tmp_path):
    """A cached fine-tune and an uncached validate: the same weights reach register on every run. With no
    champion (manual promotion) the duplicate check once looked at the champion alone."""
    reg = register_cfg(model_name="digits-manual-again", promotion="manual")
    _pipeline_run(digits, "good", tmp_path / "a", reg)
    first = register(tmp_path / "a", tmp_path / "a.json", reg)
    _pipeline_run(digits, "good", tmp_path / "b", reg)  # a new run of validate on the same model
    second = register(tmp_path / "b", tmp_path / "b.json", reg)
    assert first["registered"] and first["version"] == 1 and not second["registered"]
    assert second["reason"].startswith("weights identical to v1, sha256 ")
    assert len(server.search_model_versions("name = 'digits-manual-again'")) == 1


def test_validating_against_a_champion_leaves_no_temporary_files(digits, server, tmp_path, monkeypatch):
    import tempfile

    reg = register_cfg(model_name="digits-tidy")
    _pipeline_run(digits, "good", tmp_path / "a", reg)
    register(tmp_path / "a", tmp_path / "a.json", reg)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where every temporary of this process goes
    gate = _pipeline_run(digits, "good-1", tmp_path / "b", reg, validate_cfg(champion_margin=1.0))
    assert gate["champion"]["status"] == "compared"  # the champion was downloaded and judged
    assert sorted(p.name for p in scratch.iterdir()) == []
