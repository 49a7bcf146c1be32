"""`python -m pipelines upload|run|schedule|schedules|pause|resume|delete` with the real kfp.Client
making real HTTP requests to a small KFP API server on loopback (tests/fake_kfp.py: no KFP backend
can run here), asserting what the SDK sends."""

import pytest

from fake_kfp import serve
from helpers import ROOT, free_port
from pipelines.__main__ import main

SOURCES = ["--param", "data.source=s3://data/images",
           "--param", "pretrained.uri=torchvision://resnet18?weights=IMAGENET1K_V1"]


@pytest.fixture
def kfp_server(monkeypatch):
    server, state = serve(free_port())
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "kfp-token-s3cr3t")
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.config/kfp context from this machine
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()


def _posts(state, suffix):
    return [r for r in state.requests if r["method"] == "POST" and r["path"].endswith(suffix)]


def test_repository_paths_are_refused_before_anything_is_sent(kfp_server, capsys):
    host, state = kfp_server
    assert main(["upload", "--host", host]) == 2  # params.yaml's demo: zoo/... and data/raw/...
    assert "pretrained.uri: 'zoo/resnet18-digits-0-4.pt' is a path in this repository" in capsys.readouterr().err
    assert main(["run", "--host", host, "--param", "pretrained.uri=s3://zoo/r18.pt"]) == 2
    assert "data.source: 'data/raw/digits-5-9' is a path in this repository" in capsys.readouterr().err
    assert main(["run", "--host", host, "--param", "finetune.lrr=0.1", *SOURCES]) == 2
    assert "--param finetune.lrr: params.yaml has no setting" in capsys.readouterr().err
    assert state.requests == []


def test_upload_adds_versions_of_one_pipeline_with_your_values_as_defaults(kfp_server, capsys):
    host, state = kfp_server
    assert main(["upload", "--host", host, *SOURCES, "--param", "finetune.lr=0.02"]) == 0
    digest = "ghcr.io/acme/components@sha256:" + "ab" * 32
    assert main(["upload", "--host", host, *SOURCES, "--image", digest, "--version-name", "v2"]) == 0
    assert len(state.pipelines) == 1 and len(next(iter(state.versions.values()))) == 2
    first, second = (r["body"]["spec"][0] for r in state.requests if r["path"].endswith(("upload", "upload_version")))
    defaults = first["root"]["inputDefinitions"]["parameters"]
    assert defaults["data_source"]["defaultValue"] == "s3://data/images"
    assert defaults["finetune"]["defaultValue"]["lr"] == 0.02
    from pipelines.finetune_pipeline import IMAGE

    assert {e["container"]["image"] for e in first["deploymentSpec"]["executors"].values()} == {IMAGE}
    assert {e["container"]["image"] for e in second["deploymentSpec"]["executors"].values()} == {digest}
    assert _posts(state, "upload_version")[0]["query"]["name"] == "v2"
    assert all(r["authorization"] == "Bearer kfp-token-s3cr3t" for r in state.requests)
    assert "kfp-token-s3cr3t" not in capsys.readouterr().out


def test_run_sets_every_parameter_on_the_latest_version(kfp_server, tmp_path):
    host, state = kfp_server
    assert main(["run", "--host", host, *SOURCES]) == 2  # nothing uploaded yet: says so
    main(["upload", "--host", host, *SOURCES])
    main(["upload", "--host", host, *SOURCES, "--version-name", "newer"])
    own = tmp_path / "mine.yaml"
    own.write_text((ROOT / "params.yaml").read_text().replace("max_epochs: ", "max_epochs: 3  # was ", 1))
    assert main(["run", "--host", host, "--params", str(own), *SOURCES, "--param", "data.rev=v2",
                 "--experiment", "nightly-checks"]) == 0
    body = _posts(state, "/runs")[0]["body"]
    newest = max(next(iter(state.versions.values())), key=lambda v: v["created_at"])
    assert body["pipeline_version_reference"]["pipeline_version_id"] == newest["pipeline_version_id"]
    assert state.experiments[body["experiment_id"]]["display_name"] == "nightly-checks"
    parameters = body["runtime_config"]["parameters"]
    assert set(parameters) == set(newest["pipeline_spec"]["root"]["inputDefinitions"]["parameters"])
    assert parameters["data_source"] == "s3://data/images" and parameters["data_rev"] == "v2"
    assert parameters["finetune"]["max_epochs"] == 3


def test_schedule_twice_leaves_one_schedule_and_it_can_be_paused_resumed_and_deleted(kfp_server, capsys):
    host, state = kfp_server
    main(["upload", "--host", host, *SOURCES])
    assert main(["schedule", "--host", host, *SOURCES, "--name", "nightly"]) == 0
    assert main(["schedule", "--host", host, *SOURCES, "--name", "nightly", "--cron", "0 30 2 * * *",
                 "--service-account", "finetune-pipeline"]) == 0
    assert "updated nightly" in capsys.readouterr().out
    (job,) = state.recurring.values()
    assert job["trigger"] == {"cron_schedule": {"cron": "0 30 2 * * *"}}
    assert job["max_concurrency"] == 1 and job["no_catchup"] is True and job["mode"] == "ENABLE"
    assert job["runtime_config"]["parameters"]["data_source"] == "s3://data/images"
    assert job["service_account"] == "finetune-pipeline"
    assert main(["schedules", "--host", host]) == 0
    assert "nightly\t0 30 2 * * *\tENABLED" in capsys.readouterr().out
    main(["pause", "--host", host, "nightly"])
    assert job["status"] == "DISABLED"
    main(["resume", "--host", host, "nightly"])
    assert job["status"] == "ENABLED"
    main(["delete", "--host", host, "nightly"])
    assert state.recurring == {}
    assert main(["pause", "--host", host, "nightly"]) == 2
    assert "no schedule named 'nightly'" in capsys.readouterr().err


def test_namespace_reaches_the_server_for_multi_user_kubeflow(kfp_server):
    host, state = kfp_server
    main(["upload", "--host", host, *SOURCES, "--namespace", "team-vision"])
    main(["schedule", "--host", host, *SOURCES, "--namespace", "team-vision", "--name", "nightly"])
    assert _posts(state, "/experiments")[0]["body"]["namespace"] == "team-vision"
    listed = [r for r in state.requests if r["method"] == "GET" and r["path"].endswith("/recurringruns")]
    assert listed and all(r["query"]["namespace"] == "team-vision" for r in listed)
