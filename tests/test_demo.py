"""The demo's two commands as a user first meets them: their help, and a missing path named in one line."""

import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.parametrize("command, paths", [("demo.digits", ["SOURCE", "TARGET"]),
                                           ("demo.zoo", ["SOURCE", "OUT"])])
def test_a_demo_command_prints_its_help_with_each_path_named(command, paths):
    proc = subprocess.run([sys.executable, "-m", command, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    usage = proc.stdout.splitlines()[0]
    assert usage.endswith(" ".join(paths)), usage
    for name in paths:  # each path with its own help line
        assert any(line.split()[:1] == [name] and len(line.split()) > 1
                   for line in proc.stdout.splitlines()), name


def test_a_demo_command_without_its_second_path_says_which_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "demo.zoo", "data/raw/digits-0-4"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("the following arguments are required: OUT")
    assert "Traceback" not in proc.stderr
