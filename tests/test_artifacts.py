"""Each artifact has one owner: components/artifacts/ names the files of every artifact the steps hand
each other, and no other module of the project names them."""

import ast
import re
from pathlib import Path

from components.artifacts import dataset, model, policy, reports, run_record, weights
from helpers import ROOT

OWNERS = (dataset, model, policy, reports, run_record, weights)
SCANNED = ("components", "pipelines", "demo", "infra", "benchmarks")


def _artifact_files() -> set[str]:
    """Every file name an artifact module declares (its UPPER_CASE constants that name a file)."""
    names = set()
    for module in OWNERS:
        for key, value in vars(module).items():
            if key.isupper() and isinstance(value, str) and re.fullmatch(r"[a-z_]+\.(json|csv|pt|png)", value):
                names.add(value)
    return names


def _code_strings(tree: ast.AST):
    """String constants of the code: not docstrings, not a command line's help texts."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body \
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            skip.add(id(node.body[0].value))
        if isinstance(node, ast.keyword) and node.arg in ("help", "description"):
            skip.update(id(n) for n in ast.walk(node.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node


def test_the_artifact_modules_declare_the_files_of_every_artifact():
    assert {"manifest.csv", "report.json", "policy.json", "weights.pt", "pretrained.json", "model.pt",
            "history.json", "summary.json", "metrics.json", "gate.json", "run.json"} <= _artifact_files()


def test_no_module_outside_the_artifact_modules_names_an_artifacts_file():
    files = _artifact_files()
    pattern = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, sorted(files))) + r")(?![\w])")
    found = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.is_relative_to(ROOT / "components" / "artifacts"):
                continue
            for node in _code_strings(ast.parse(path.read_text(), str(path))):
                if pattern.search(node.value):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "read and write artifacts through components/artifacts/:\n" + "\n".join(found)


def test_the_rule_above_finds_a_file_name_in_code():
    tree = ast.parse('"""model.pt in a docstring is prose"""\nx = Path(out) / "model.pt"\n')
    assert [n.value for n in _code_strings(tree)] == ["model.pt"]


def test_an_image_overwritten_after_the_data_step_is_refused_from_a_folder_source_too(image_folder, tmp_path):
    """The manifest's SHA-256 holds for every source: a folder read in place (the default) as for S3."""
    import subprocess
    import sys

    import pytest

    from components.artifacts.dataset import DatasetError
    from components.data import prepare
    from helpers import data_cfg

    prepare(image_folder, tmp_path / "data", data_cfg(image_folder))
    victim = dataset.images(tmp_path / "data", "train")[0]
    assert dataset.load(victim).size == (16, 16)
    other = dataset.images(tmp_path / "data", "train")[1].path.read_bytes()
    victim.path.write_bytes(other)  # another valid image under the same name
    with pytest.raises(DatasetError, match=f"{victim.path} changed after the data step read it"):
        dataset.load(victim)
    # a step that reads it stops with the data's exit code, naming it (augment's preview reads the first)
    proc = subprocess.run([sys.executable, "-m", "components.augment", "--dataset", str(tmp_path / "data"),
                           "--out", str(tmp_path / "aug")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 3 and proc.stderr.strip().splitlines()[-1] == (
        f"augment: error: dataset: {victim.path} changed after the data step read it (manifest sha256 "
        f"{victim.sha256[:12]}): run the pipeline again")
    assert not (tmp_path / "aug").exists()
