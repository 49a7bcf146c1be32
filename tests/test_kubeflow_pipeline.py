"""The compiled Kubeflow spec, checked as the SDK's own tests do, and the DAG run through kfp.local."""

import subprocess
import sys

import mlflow
import pytest
import yaml

from demo.digits import export_digits
from helpers import ROOT, dvc_data_repo, save_checkpoint

COMPILED = ROOT / "pipelines" / "finetune_pipeline.yaml"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> str:
    """The pipeline compiled by `python -m pipelines generate` in a process of its own."""
    out = tmp_path_factory.mktemp("compiled")
    subprocess.run([sys.executable, "-m", "pipelines", "generate", "--compiled", str(out / "pipeline.yaml"),
                    "--dvc-yaml", str(out / "dvc.yaml"), "--trainjob", str(out / "trainjob.yaml")], check=True,
                   cwd=ROOT)
    return (out / "pipeline.yaml").read_text()


@pytest.fixture(scope="module")
def spec(compiled):
    return list(yaml.safe_load_all(compiled))


def test_compiled_yaml_in_the_repository_is_current_byte_for_byte(compiled):
    # Byte for byte: generating in another process (another protobuf map order) changes nothing, header
    # comment included, so the tree stays clean after `make generate`.
    assert COMPILED.read_text() == compiled, \
        "pipelines/finetune_pipeline.yaml is stale: run `make generate` and commit it"


def test_the_dag_is_the_declaration_tasks_artifacts_and_parameters(spec):
    """Every Kubeflow step of pipelines/dag.py is a task that takes its inputs from the step that writes them."""
    from pipelines.dag import ARTIFACTS, producers, steps_for

    components = spec[0]["components"]
    tasks = {**spec[0]["root"]["dag"]["tasks"], **components["comp-condition-1"]["dag"]["tasks"]}
    steps = steps_for("kubeflow", demo=False)
    assert sorted(tasks) == sorted([f"{s.name.replace('_', '-')}-op" for s in steps] + ["condition-1"])
    for step in steps:
        task = tasks[f"{step.name.replace('_', '-')}-op"]
        assert task["taskInfo"]["name"] == step.name
        wired = task.get("inputs", {}).get("artifacts", {})
        assert sorted(wired) == sorted(step.inputs), step.name
        for name in step.inputs:  # from the producing task, or through the condition's inputs (register)
            producer = f"{producers()[name].name.replace('_', '-')}-op"
            source = wired[name].get("taskOutputArtifact", {}).get("producerTask") or \
                wired[name]["componentInputArtifact"].removeprefix("pipelinechannel--").removesuffix(f"-{name}")
            assert source == producer, name
        outputs = components[task["componentRef"]["name"]]["outputDefinitions"]
        assert not step.output or (step.output in outputs["artifacts"] and step.output in ARTIFACTS)
        assert set(step.values) <= set(outputs.get("parameters", {}))
    parameters = spec[0]["root"]["inputDefinitions"]["parameters"]
    assert sorted(parameters) == sorted(["data_source", "data_repo", "data_rev", "data", "augment", "pretrained",
                                         "finetune", "validate", "register", "tracking"])


def test_pipeline_defaults_are_the_sections_of_params_yaml(spec, params):
    inputs = spec[0]["root"]["inputDefinitions"]["parameters"]
    assert inputs["data_source"]["defaultValue"] == params.data.source
    assert inputs["finetune"]["defaultValue"]["freeze"] == params.finetune.freeze
    assert inputs["validate"]["defaultValue"]["min_accuracy"] == params.validation.min_accuracy
    assert inputs["register"]["defaultValue"]["model_name"] == params.registry.model_name


def test_caching_follows_content_every_moving_input_is_resolved_by_an_uncached_first_task(spec):
    """Kubeflow's cache key is a task's parameter values and input artifacts. The resolve task is
    never cached; the cached tasks that read a moving source take its resolved values, and the
    tasks after them take their artifacts, so a hit means the same content and a change reruns."""
    tasks = {**spec[0]["root"]["dag"]["tasks"], **spec[0]["components"]["comp-condition-1"]["dag"]["tasks"]}
    cached = {name for name, task in tasks.items() if task.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"data-op", "augment-op", "fetch-pretrained-op", "finetune-op"}
    assert tasks["resolve-op"]["cachingOptions"] == {} and not tasks["resolve-op"].get("dependentTasks")
    resolved = {name: {key: value["taskOutputParameter"]["outputParameterKey"]
                       for key, value in task["inputs"].get("parameters", {}).items()
                       if value.get("taskOutputParameter", {}).get("producerTask") == "resolve-op"}
                for name, task in tasks.items()}
    assert resolved["data-op"] == {"data_version": "data_version"}
    assert resolved["fetch-pretrained-op"] == {"pretrained_uri": "pretrained_uri",
                                               "pretrained_version": "pretrained_version"}
    for name in ("augment-op", "finetune-op"):  # no source of their own: upstream artifacts carry the change
        assert resolved[name] == {} and tasks[name]["inputs"]["artifacts"]
    assert tasks["finetune-op"]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"]["producerTask"] == "data-op"
    # the resolve task reads every parameter that names something outside the run
    reads = set(tasks["resolve-op"]["inputs"]["parameters"])
    assert {"data_source", "data_repo", "data_rev", "pretrained"} <= reads


def test_register_runs_only_under_the_gate_condition(spec):
    dag = spec[0]["root"]["dag"]["tasks"]
    assert "register-op" not in dag
    condition = dag["condition-1"]
    assert condition["taskInfo"]["name"] == "validate-passed"
    assert condition["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--validate-op-Output'] == true"
    assert "register-op" in spec[0]["components"]["comp-condition-1"]["dag"]["tasks"]


def test_tasks_with_side_effects_are_never_cached_and_get_mlflow_settings_from_the_cluster(spec, params):
    validate = spec[0]["root"]["dag"]["tasks"]["validate-op"]
    register = spec[0]["components"]["comp-condition-1"]["dag"]["tasks"]["register-op"]
    assert validate["cachingOptions"] == {} and register["cachingOptions"] == {}  # enableCaching false is omitted
    assert spec[0]["root"]["dag"]["tasks"]["finetune-op"]["cachingOptions"] == {"enableCache": True}
    executors = spec[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    from pipelines.dag import steps_for

    credentialed = {f"exec-{s.name.replace('_', '-')}-op" for s in steps_for("kubeflow", demo=False) if s.credentials}
    # every task that reads S3 or talks to MLflow: finetune (the live run), and augment, which reads images
    assert {"exec-resolve-op", "exec-data-op", "exec-augment-op", "exec-fetch-pretrained-op", "exec-finetune-op",
            "exec-validate-op", "exec-register-op"} == credentialed
    for name in credentialed:
        assert executors[name]["configMapAsEnv"][0]["configMapName"] == params.pipeline.mlflow_config_map
        secret = executors[name]["secretAsEnv"][0]
        assert secret["secretName"] == params.pipeline.mlflow_secret
        env = {e["secretKey"]: e["envVar"] for e in secret["keyToEnv"]}
        assert env["MLFLOW_TRACKING_PASSWORD"] == "MLFLOW_TRACKING_PASSWORD"
        assert env["AWS_SECRET_ACCESS_KEY"] == "FINETUNE_AWS_SECRET_ACCESS_KEY"  # not the launcher's (s3_env.py)
    spec_text = yaml.safe_dump(spec)
    assert "AWS_SECRET_ACCESS_KEY: " not in spec_text  # names of keys in a Secret, never values


def _quantity(value: str, units: dict) -> float:
    number = value.rstrip("".join(units))
    return float(number) * units.get(value[len(number):], 1)


def test_every_task_is_sized_timed_out_and_retried_as_params_yaml_says(spec, params):
    from pipelines.dag import steps_for

    executors = spec[0]["deploymentSpec"]["executors"]
    from pipelines.image import reference

    assert {e["container"]["image"] for e in executors.values()} == {reference(params.pipeline.image)}
    assert all("pip install" not in " ".join(e["container"]["command"]) for e in executors.values())
    platform = spec[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = {**spec[0]["root"]["dag"]["tasks"], **spec[0]["components"]["comp-condition-1"]["dag"]["tasks"]}
    for step in steps_for("kubeflow", demo=False):
        name, wanted = step.name.replace("_", "-"), params.pipeline.tasks[step.name]
        resources = executors[f"exec-{name}-op"]["container"]["resources"]
        cpu = _quantity(wanted.cpu, {"m": 0.001})
        memory = _quantity(wanted.memory, {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}) / 1e9  # KFP writes GB
        assert resources["cpuRequest"] == resources["cpuLimit"] == cpu, step.name  # Guaranteed QoS
        assert resources["memoryRequest"] == resources["memoryLimit"] == pytest.approx(memory), step.name
        assert platform[f"exec-{name}-op"]["activeDeadlineSeconds"] == str(wanted.timeout_s), step.name
        retry = tasks[f"{name}-op"].get("retryPolicy")
        if wanted.retries:
            from pipelines.finetune_pipeline import retry_window_s

            window = retry_window_s(wanted, params.pipeline.retry_backoff_s)
            assert retry == {"maxRetryCount": wanted.retries, "backoffDuration": f"{params.pipeline.retry_backoff_s}s",
                             "backoffFactor": 2.0, "backoffMaxDuration": f"{window}s"}, step.name
        else:
            assert retry is None, step.name
        assert "accelerator" not in resources  # finetune_gpus: 0 in params.yaml


def test_the_gpu_task_gets_gpus_a_node_selector_and_tolerations(params, tmp_path):
    from components.config import override
    from pipelines.finetune_pipeline import compile_pipeline, make_pipeline

    gpu = override(params.pipeline, finetune_gpus=2, gpu_node_selector={"cloud.google.com/gke-accelerator": "l4"})
    out = compile_pipeline(tmp_path / "gpu.yaml", make_pipeline(params.model_copy(update={"pipeline": gpu})))
    spec = list(yaml.safe_load_all(out.read_text()))
    resources = spec[0]["deploymentSpec"]["executors"]["exec-finetune-op"]["container"]["resources"]
    assert {"resourceCount": "2", "resourceType": "nvidia.com/gpu"}.items() <= resources["accelerator"].items()
    platform = spec[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert platform["exec-finetune-op"]["nodeSelector"] == {"labels": {"cloud.google.com/gke-accelerator": "l4"}}
    assert platform["exec-finetune-op"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                            "effect": "NoSchedule"}]
    assert "nodeSelector" not in platform["exec-validate-op"]  # only the task that trains asks for GPUs
    assert platform["exec-finetune-op"]["emptyDirMounts"] == [{"volumeName": "dshm", "mountPath": "/dev/shm",
                                                              "medium": "Memory"}]  # NCCL among its processes


def test_pipeline_tasks_name_exactly_the_kubeflow_steps(params):
    from components.config import TASKS
    from pipelines.dag import steps_for

    assert TASKS == tuple(s.name for s in steps_for("kubeflow", demo=False))


def test_validation_reports_are_kubeflow_visualisations(spec):
    outputs = spec[0]["components"]["comp-validate-op"]["outputDefinitions"]["artifacts"]
    kinds = {name: o["artifactType"]["schemaTitle"] for name, o in outputs.items()}
    assert kinds["confusion"] == "system.ClassificationMetrics"
    assert kinds["decision"] == "system.Markdown" and kinds["report"] == "system.HTML"
    assert kinds["metrics"] == "system.Metrics"


@pytest.mark.e2e
def test_kfp_local_run_registers_only_when_the_gate_passes(tmp_path, mlflow_server, s3_env, monkeypatch, params):
    """The whole DAG through kfp.local, logging to a real MLflow server, with the dataset taken at a git
    tag from a DVC remote on a real S3 server."""
    from pipelines.finetune_pipeline import run_local

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    repo = tmp_path / "data-repo"
    dvc_data_repo(repo, s3_env["endpoint"], "digits", [("v1", lambda d: export_digits([5, 6, 7], d)),
                                                        ("v2", lambda d: export_digits([5, 6, 7, 8], d))])
    zoo = save_checkpoint(tmp_path / "zoo.pt", "resnet18", ["0", "1", "2", "3"])
    raw = params.model_dump(mode="json", by_alias=True)
    raw["data"].update(source="digits", repo=str(repo), rev="v1")
    raw["pretrained"]["uri"] = str(zoo)
    raw["augment"].update(image_size=16, preview_images=2)
    raw["finetune"].update(max_epochs=2, freeze=["conv1", "bn1"])
    raw["register"]["model_name"] = "kfp-local-digits"
    raw["tracking"]["experiment"] = "kfp-local"

    raw["validate"].update(min_accuracy=1.0, min_macro_f1=1.0, min_class_recall=1.0)  # 2 epochs: never perfect
    (tmp_path / "fail.yaml").write_text(yaml.safe_dump(raw))
    run_local(tmp_path / "fail.yaml", tmp_path / "outputs-fail")
    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient()
    assert client.search_model_versions("name = 'kfp-local-digits'") == []

    raw["validate"].update(min_accuracy=0.3, min_macro_f1=0.0, min_class_recall=0.0)
    (tmp_path / "pass.yaml").write_text(yaml.safe_dump(raw))
    run_local(tmp_path / "pass.yaml", tmp_path / "outputs-pass")
    version = client.get_model_version_by_alias("kfp-local-digits", "champion")
    run = client.get_run(version.run_id)
    assert run.data.tags["pipeline_runner"] == "kfp" and run.info.status == "FINISHED"
    assert run.info.run_name.startswith(version.tags["pipeline_run_id"][-8:])  # a short unique part first
    history = client.get_metric_history(run.info.run_id, "val_loss")  # logged live by the finetune task
    assert len({m.timestamp for m in history}) == 2 and run.info.start_time < min(m.timestamp for m in history)
    assert run.data.tags["kfp_run_id"] == version.tags["pipeline_run_id"] != ""
    assert run.data.params["finetune.max_epochs"] == "2"  # arrived through Kubeflow as a float, logged as set
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2
    runs = client.search_runs([client.get_experiment_by_name("kfp-local").experiment_id])
    assert sorted(r.data.tags["gate_passed"] for r in runs) == ["false", "true"]
    dataset = run.inputs.dataset_inputs[0].dataset  # the data of tag v1: three classes, not v2's four
    assert run.data.tags["data_source"] == f"{repo}@v1:digits" and dataset.digest.endswith(".dir")
    assert run.data.tags["data_fingerprint"] == dataset.digest == version.tags["data_fingerprint"]
    # the classes of v1 are measured, not v2's (whether a 2-epoch 16-pixel model already recalls a 7 is luck)
    assert "test_recall_7" in run.data.metrics and "test_recall_8" not in run.data.metrics
