"""DevSecOps in the test suite, so CI runs it: SAST (bandit over the project's code, accepted findings
marked in the code), and SCA (a CycloneDX SBOM of the runtime lock; a vulnerability audit that says
"not audited" when it could not look, never a silent pass)."""

import subprocess
import sys
from pathlib import Path

from helpers import ROOT

sys.path.insert(0, str(ROOT / "infra"))
import supply_chain  # noqa: E402

BIN = Path(sys.executable).parent


def test_bandit_finds_nothing_that_is_not_marked_accepted_in_the_code():
    proc = subprocess.run([BIN / "bandit", "-c", "pyproject.toml", "-r", "components", "pipelines", "infra", "-q"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_bandit_would_catch_a_new_finding(tmp_path):
    (tmp_path / "bad.py").write_text("import subprocess\nsubprocess.run('ls ' + input(), shell=True)\n")
    proc = subprocess.run([BIN / "bandit", "-c", str(ROOT / "pyproject.toml"), "-r", str(tmp_path), "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "B602" in proc.stdout


def test_the_sbom_lists_every_runtime_pin_with_its_package_url(tmp_path):
    doc = supply_chain.sbom(tmp_path / "runtime.cdx.json")
    pins = {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1]
            for line in (ROOT / "requirements.lock").read_text().splitlines() if "==" in line}
    listed = {c["name"].lower().replace("_", "-"): c["version"] for c in doc["components"]}
    assert doc["bomFormat"] == "CycloneDX" and listed == pins
    assert all(c["purl"].startswith("pkg:pypi/") for c in doc["components"])


def test_an_audit_that_looked_at_nothing_says_so_and_a_vulnerability_fails(tmp_path):
    skipped = {"dependencies": [{"name": "torch", "skip_reason": "Dependency not found on PyPI"}]}
    assert supply_chain.verdict(skipped)[0] == "not audited"
    found = {"dependencies": [{"name": "torch", "version": "2.14.1", "vulns": [
        {"id": "PYSEC-2099-1", "fix_versions": ["2.14.2"]}]}, {"name": "pillow", "version": "13.0.0", "vulns": []}]}
    state, lines = supply_chain.verdict(found)
    assert state == "audited" and "torch 2.14.1: PYSEC-2099-1 (fixed in 2.14.2)" in lines
    # the real audit, against whatever this machine can reach: a verdict either way, written down
    state, lines, passed = supply_chain.audit(tmp_path / "audit.json")
    assert (tmp_path / "audit.json").exists() and lines
    assert state == "audited" or lines[0].startswith("not audited: ")
    print("\n".join(lines))
