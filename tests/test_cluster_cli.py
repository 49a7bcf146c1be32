"""`python -m pipelines upload|run|schedule|schedules|pause|resume|delete` with the real kfp.Client
making real HTTP requests to a small KFP API server on loopback (tests/fake_kfp.py: no KFP backend
can run here; it answers as kubeflow/pipelines 2.17.0's server does, in single- and multi-user mode),
asserting what the SDK sends and every command's exit code."""

import pytest

from fake_kfp import serve
from helpers import ROOT, free_port
from pipelines.__main__ import main

SOURCES = ["--param", "data.source=s3://data/images",
           "--param", "pretrained.uri=torchvision://resnet18?weights=IMAGENET1K_V1"]


@pytest.fixture(params=[False, True], ids=["single-user", "multi-user"])
def kfp_server(monkeypatch, request):
    server, state = serve(free_port(), multi_user=request.param)
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
    assert main(["upload", "--host", host, *SOURCES]) == 0
    assert main(["upload", "--host", host, *SOURCES, "--version-name", "newer"]) == 0
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
    assert main(["upload", "--host", host, *SOURCES]) == 0
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
    assert main(["pause", "--host", host, "nightly"]) == 0
    assert job["status"] == "DISABLED"
    assert main(["resume", "--host", host, "nightly"]) == 0
    assert job["status"] == "ENABLED"
    assert main(["delete", "--host", host, "nightly"]) == 0
    assert state.recurring == {}
    assert main(["pause", "--host", host, "nightly"]) == 2
    assert "no schedule named 'nightly'" in capsys.readouterr().err


@pytest.mark.parametrize("namespace", ["team-vision"])
def test_a_namespaced_pipeline_is_found_again_by_upload_run_and_schedule(kfp_server, namespace, capsys):
    """Multi-user: upload creates the pipeline in the namespace; a look-up without the namespace lists the
    shared pipelines only (kubeflow/pipelines 2.17.0 storage/pipeline_store.go:319-331), so the second upload
    would try to create it again (409) and run would say "no pipeline"."""
    host, state = kfp_server
    ns = ["--namespace", namespace]
    assert main(["upload", "--host", host, *SOURCES, *ns]) == 0
    assert main(["upload", "--host", host, *SOURCES, *ns]) == 0
    assert len(state.pipelines) == 1 and len(next(iter(state.versions.values()))) == 2
    assert main(["run", "--host", host, *SOURCES, *ns]) == 0
    assert main(["schedule", "--host", host, *SOURCES, *ns, "--name", "nightly"]) == 0
    assert main(["schedules", "--host", host, *ns]) == 0 and "nightly" in capsys.readouterr().out
    stored = "team-vision" if state.multi_user else ""
    assert {p["namespace"] for p in state.pipelines.values()} == {stored}
    assert {e["namespace"] for e in state.experiments.values()} == {stored}
    assert {r["namespace"] for r in state.recurring.values()} == {stored}
    listed = [r for r in state.requests if r["method"] == "GET" and r["path"].endswith(("/pipelines", "/recurringruns"))]
    assert listed and all(r["query"].get("namespace") == namespace for r in listed)
    if state.multi_user:  # another namespace sees none of it
        assert main(["run", "--host", host, *SOURCES, "--namespace", "team-other"]) == 2
        assert "no pipeline finetune-image-classifier on the server in namespace team-other" in capsys.readouterr().err


def test_a_version_name_used_twice_is_the_servers_409_in_one_line(kfp_server, capsys):
    host, state = kfp_server
    assert main(["upload", "--host", host, *SOURCES, "--version-name", "v1"]) == 0
    assert main(["upload", "--host", host, *SOURCES, "--version-name", "v1b"]) == 0
    assert main(["upload", "--host", host, *SOURCES, "--version-name", "v1b"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the KFP server answered 409" in err and "already exist" in err


def test_a_server_that_does_not_answer_is_one_line_not_a_traceback(capsys):
    port = free_port()
    assert main(["run", "--host", f"http://127.0.0.1:{port}", *SOURCES]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the KFP server at http://127.0.0.1:{port} does not answer" in err


@pytest.mark.parametrize("cron, why", [
    ("0 3 * * *", "KFP reads six fields, seconds first, so this is second 0, minute 3, hour *"),
    ("0 0 3 * *", "write '0 0 0 3 * *'"),
    ("0 0 25 * * *", "hour '25' is not in 0-23"),
    ("0 0 3 * * * *", "expected six fields"),
    ("0 0 3 * * 8", "day of week '8' is not in 0-6"),
])
def test_a_cron_kfp_would_misread_or_refuse_is_refused_before_anything_is_sent(kfp_server, cron, why, capsys):
    host, state = kfp_server
    assert main(["upload", "--host", host, *SOURCES]) == 0
    sent = len(state.requests)
    assert main(["schedule", "--host", host, *SOURCES, "--cron", cron]) == 2
    assert why in capsys.readouterr().err
    assert len(state.requests) == sent and state.recurring == {}


def test_the_fake_server_accepts_a_five_field_cron_as_the_real_one_does_and_refuses_concurrency_out_of_range(
        kfp_server):
    """What the CLI guards against is real: robfig/cron v1 parses five fields (kubeflow/pipelines 2.17.0,
    server/api_converter.go:2087-2092), and max_concurrency must be 1..10 (api_converter.go:2084-2086)."""
    import kfp

    host, state = kfp_server
    client = kfp.Client(host=host)
    exp = client.create_experiment("e")
    main(["upload", "--host", host, *SOURCES])
    pipeline_id = next(iter(state.pipelines))
    version = {"pipeline_id": pipeline_id, "version_id": state.versions[pipeline_id][0]["pipeline_version_id"]}
    client.create_recurring_run(exp.experiment_id, "hourly", cron_expression="0 3 * * *", **version)
    from kfp_server_api.exceptions import ApiException

    for bad in ({"cron_expression": "0 0 3 * * *", "max_concurrency": 11},
                {"cron_expression": "3 * *", "max_concurrency": 1}):
        with pytest.raises(ApiException, match="Max concurrency|Schedule cron is not a supported format"):
            client.create_recurring_run(exp.experiment_id, "x", **bad, **version)
    assert [r["display_name"] for r in state.recurring.values()] == ["hourly"]


@pytest.mark.parametrize("value", [0, 11])
def test_max_concurrency_outside_the_servers_bounds_is_refused(kfp_server, value, capsys):
    host, state = kfp_server
    assert main(["upload", "--host", host, *SOURCES]) == 0
    assert main(["schedule", "--host", host, *SOURCES, "--max-concurrency", str(value)]) == 2
    assert f"--max-concurrency {value}: the KFP server takes 1 to 10" in capsys.readouterr().err
    assert state.recurring == {}


@pytest.mark.parametrize("command", ["run", "schedule"])
def test_pipeline_settings_are_refused_where_they_would_be_ignored(kfp_server, command, capsys):
    host, state = kfp_server
    assert main(["upload", "--host", host, *SOURCES]) == 0
    assert main([command, "--host", host, *SOURCES, "--param", "pipeline.finetune_gpus=2"]) == 2
    assert "--param pipeline.finetune_gpus: the pipeline section" in capsys.readouterr().err
    assert not _posts(state, "/runs") and state.recurring == {}
    assert main(["upload", "--host", host, *SOURCES, "--param", "pipeline.finetune_gpus=2"]) == 0


@pytest.mark.parametrize("setting, value", [
    ("pretrained.uri", "https://me:t0ken@weights.example.com/r18.pt"),
    ("pretrained.uri", "https://weights.example.com/r18.pt?X-Amz-Signature=abc&X-Amz-Credential=k"),
    ("data.repo", "https://oauth2:t0ken@git.example.com/team/images.git"),
])
@pytest.mark.parametrize("command", ["upload", "run", "schedule"])
def test_a_credential_never_becomes_a_pipeline_parameter(kfp_server, command, setting, value, capsys):
    host, state = kfp_server
    pin = ["--param", "pretrained.sha256=" + "ab" * 32]
    assert main([command, "--host", host, *SOURCES, *pin, "--param", f"{setting}={value}"]) == 2
    err = capsys.readouterr().err
    assert f"{setting}: " in err and "carries a credential" in err and "finetune-credentials" in err
    assert "t0ken" not in err and "abc" not in err
    assert state.requests == []


def test_generate_refuses_a_credential_in_params_yaml(tmp_path):
    import shutil
    import subprocess
    import sys

    work = tmp_path / "repo"  # a copy of what generate reads and writes, with a token in params.yaml
    for part in ("components", "pipelines", "demo", "infra/k8s/trainjob"):
        shutil.copytree(ROOT / part, work / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    params = (ROOT / "params.yaml").read_text().replace("uri: zoo/", "uri: https://me:t0ken@example.com/zoo/", 1)
    assert "t0ken" in params
    (work / "params.yaml").write_text(params)
    done = subprocess.run([sys.executable, "-m", "pipelines", "generate"], cwd=work, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "generate: params.yaml: pretrained.uri: 'https://example.com/zoo/" in done.stderr
    assert "t0ken" not in done.stderr and "t0ken" not in (work / "pipelines" / "finetune_pipeline.yaml").read_text()


def test_a_digits_only_value_of_a_string_setting_stays_a_string(kfp_server):
    host, state = kfp_server
    assert main(["upload", "--host", host, *SOURCES]) == 0
    assert main(["run", "--host", host, *SOURCES, "--param", "data.rev=20261202",
                 "--param", "pretrained.sha256=" + "1" * 64]) == 0
    parameters = _posts(state, "/runs")[0]["body"]["runtime_config"]["parameters"]
    assert parameters["data_rev"] == "20261202" and parameters["pretrained"]["sha256"] == "1" * 64


def test_namespace_reaches_the_server_for_multi_user_kubeflow(kfp_server):
    host, state = kfp_server
    assert main(["upload", "--host", host, *SOURCES, "--namespace", "team-vision"]) == 0
    assert main(["schedule", "--host", host, *SOURCES, "--namespace", "team-vision", "--name", "nightly"]) == 0
    assert _posts(state, "/experiments")[0]["body"]["namespace"] == "team-vision"
    listed = [r for r in state.requests if r["method"] == "GET" and r["path"].endswith("/recurringruns")]
    assert listed and all(r["query"]["namespace"] == "team-vision" for r in listed)
