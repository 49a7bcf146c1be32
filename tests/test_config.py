import pytest
import yaml

from components.config import ConfigError, DataConfig, load_params, parse_section
from helpers import ROOT, data_cfg


def _write(tmp_path, mutate) -> str:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_repository_params_yaml_is_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.registry.alias == "champion"
    assert params.validation.min_accuracy > 0


def test_bad_value_is_rejected_naming_file_and_key(tmp_path):
    path = _write(tmp_path, lambda p: p["finetune"].update(lr=-1))
    with pytest.raises(ConfigError, match=r"params.yaml: finetune.lr: .*greater than 0"):
        load_params(path)


def test_unknown_key_is_rejected_with_its_name(tmp_path):
    path = _write(tmp_path, lambda p: p["augment"].update(flip=0.5))
    with pytest.raises(ConfigError, match=r"augment.flip: Extra inputs are not permitted"):
        load_params(path)


def test_missing_section_is_named(tmp_path):
    path = _write(tmp_path, lambda p: p.pop("validate"))
    with pytest.raises(ConfigError, match=r"validate: Field required"):
        load_params(path)


def test_fractions_that_leave_no_training_data_are_rejected():
    with pytest.raises(ConfigError, match=r"data: .*val_fraction \+ test_fraction"):
        parse_section(DataConfig, {**data_cfg("x").model_dump(), "val_fraction": 0.5, "test_fraction": 0.45}, "data")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        load_params(tmp_path / "nope.yaml")


def test_params_yaml_is_the_only_source_of_defaults():
    """Every key of every section is required: no model holds a default that could differ from params.yaml."""
    from components.config import Params

    sections = {name: field.annotation for name, field in Params.model_fields.items()}
    with_defaults = [f"{name}.{key}" for name, model in sections.items() if hasattr(model, "model_fields")
                     for key, field in model.model_fields.items() if not field.is_required()]
    assert with_defaults == []
    assert [name for name, field in Params.model_fields.items() if not field.is_required()] == ["demo"]


def test_a_section_missing_a_key_names_it(tmp_path):
    path = _write(tmp_path, lambda p: p["finetune"].pop("checkpoint_dir"))
    with pytest.raises(ConfigError, match=r"params.yaml: finetune.checkpoint_dir: Field required"):
        load_params(path)


def test_a_kubeflow_task_setting_is_checked_and_named(tmp_path):
    path = _write(tmp_path, lambda p: p["pipeline"]["tasks"]["data"].update(cpu="two cores"))
    with pytest.raises(ConfigError, match=r"params.yaml: pipeline.tasks.data.cpu: String should match pattern"):
        load_params(path)


def test_a_kubeflow_task_name_that_is_not_a_task_is_refused_and_a_missing_one_named(tmp_path):
    typo = _write(tmp_path, lambda p: p["pipeline"]["tasks"].update(regsiter=p["pipeline"]["tasks"]["register"]))
    with pytest.raises(ConfigError, match=r"params.yaml: pipeline.tasks.regsiter.\[key\]: Input should be 'resolve', "
                                          r"'data', .* or 'register'"):
        load_params(typo)
    missing = _write(tmp_path, lambda p: p["pipeline"]["tasks"].pop("register"))
    with pytest.raises(ConfigError, match=r"params.yaml: pipeline: tasks: no settings for register \(cpu, memory"):
        load_params(missing)
