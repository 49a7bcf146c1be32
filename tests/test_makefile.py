"""The Makefile as a user first meets it: `make help`, and a bare `make`, list every target and what it does."""

import re
import subprocess

from helpers import ROOT


def test_a_bare_make_and_make_help_list_every_described_target():
    described = re.findall(r"^([a-z][a-z-]*):[^\n#]*## (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert len(described) > 15
    for command in (["make", "-s"], ["make", "-s", "help"]):
        out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        lines = out.splitlines()
        assert "make run" in lines[0] and "make test" in lines[0]
        listed = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:]}
        assert listed == {name: text.strip() for name, text in described}, command
