"""A step's command line as a user meets it: expected failures are one message naming the setting or
file and a distinct exit code, never a traceback (unless --debug); a real bug still shows one."""

import errno
import os
import subprocess
import sys

import yaml

from components import cli
from helpers import ROOT


def _step(module: str, *args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"components.{module}", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _params(tmp_path, **sections) -> str:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in sections.items():
        raw[section].update(values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return str(tmp_path / "params.yaml")


def _one_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    return lines[0]


def test_a_wrong_setting_is_one_line_naming_it_with_exit_code_2(tmp_path):
    proc = _step("finetune", "--params", _params(tmp_path, finetune={"lr": -0.1}), "--dataset", "d", "--policy", "p",
                 "--weights", "w", "--out", str(tmp_path / "m"))
    assert proc.returncode == 2
    assert _one_line(proc).startswith("finetune: error: ") and "finetune.lr" in proc.stderr


def test_a_missing_folder_is_input_data_exit_code_3(tmp_path):
    proc = _step("data", "--params", _params(tmp_path), "--source", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "out"))
    assert proc.returncode == 3
    assert _one_line(proc) == f"data: error: data.source: {tmp_path / 'nowhere'} is not a directory"


def test_an_unknown_architecture_names_pretrained_arch_with_exit_code_4(tmp_path):
    zoo = tmp_path / "zoo.pt"
    zoo.write_bytes(b"")
    proc = _step("fetch_pretrained", "--params", _params(tmp_path, pretrained={"arch": "resnet19", "uri": str(zoo)}),
                 "--out", str(tmp_path / "pre"))
    assert proc.returncode == 4, proc.stderr
    assert _one_line(proc).startswith("fetch_pretrained: error: ")


def test_debug_shows_the_traceback(tmp_path):
    proc = _step("data", "--params", _params(tmp_path), "--source", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "out"), "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "DataError" in proc.stderr


def test_storage_errors_name_the_file_and_a_full_disk_says_so():
    full = OSError(errno.ENOSPC, "No space left on device", "/data/prepared/.manifest.csv.tmp-1")
    assert cli.describe(full) == "/data/prepared/.manifest.csv.tmp-1: no space left on the disk"
    denied = PermissionError(errno.EACCES, "Permission denied", "/artifacts/model")
    assert cli.describe(denied) == "/artifacts/model: Permission denied"


def test_a_bug_keeps_its_traceback_and_exit_code_1(capsys):
    def main(argv):
        return {}["missing"]

    assert cli.run(main, []) == 1
    assert "Traceback" in capsys.readouterr().err


def test_expected_errors_map_to_their_codes(capsys):
    from components.config import ConfigError
    from components.finetune import TrainingError

    for err, code in ((ConfigError("finetune.lr: must be > 0"), 2), (TrainingError("diverged"), 5),
                      (TimeoutError("registry lock held"), 6), (FileNotFoundError(2, "No such file", "/x"), 7)):
        def main(argv, err=err):
            raise err

        assert cli.run(main, []) == code
        assert "Traceback" not in capsys.readouterr().err


def test_a_full_disk_is_one_line_naming_the_file_with_exit_code_7(tmp_path):
    """A real full disk: a 1 MiB tmpfs mounted for the test (needs root, as in CI; skipped elsewhere).
    torch.save alone would say "[enforce fail at inline_container.cc] unexpected pos", naming nothing."""
    from helpers import save_checkpoint, tmpfs

    with tmpfs(tmp_path / "disk") as disk:
        zoo = save_checkpoint(tmp_path / "zoo.pt", "resnet18", ["a", "b"])
        proc = subprocess.run(
            [sys.executable, "-m", "components.fetch_pretrained", "--params",
             _params(tmp_path, pretrained={"arch": "resnet18", "uri": str(zoo)}), "--out", str(disk / "pre")],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
            env={**os.environ, "FINETUNE_CACHE": str(tmp_path / "cache")})
        assert proc.returncode == 7, proc.stderr
        assert _one_line(proc) == f"fetch_pretrained: error: {disk / 'pre' / 'weights.pt'}: no space left on the disk"
        assert list(disk.iterdir()) == []  # nothing half-written left behind


def test_a_step_process_ends_without_sweeping_what_it_built_and_keeps_its_code_and_output(tmp_path):
    """run_process: the collector's last sweep is skipped (a cycle's __del__ is not called at exit), while
    the exit code, atexit handlers, buffered output and a file the step wrote are all as with sys.exit."""
    script = tmp_path / "step.py"
    script.write_text(
        "import atexit, sys\n"
        "from components import cli\n"
        "class Cycle:\n"
        "    def __del__(self):\n"
        "        print('swept at exit')\n"
        "def main(argv):\n"
        "    c = Cycle(); c.me = c\n"
        "    atexit.register(lambda: print('atexit ran', flush=True))\n"
        f"    open({str(tmp_path / 'out.txt')!r}, 'w').write('written')\n"
        "    sys.stdout.write('buffered output')\n"
        "    return int(argv[-1])\n"
        "if sys.argv[1] == 'plain':\n"
        "    sys.exit(cli.run(main))\n"
        "cli.run_process(main)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    plain = subprocess.run([sys.executable, str(script), "plain", "3"], capture_output=True, text=True, env=env)
    assert plain.returncode == 3 and "swept at exit" in plain.stdout  # what the test tells apart
    proc = subprocess.run([sys.executable, str(script), "process", "3"], capture_output=True, text=True, env=env)
    assert proc.returncode == 3, proc.stderr
    assert "buffered output" in proc.stdout and "atexit ran" in proc.stdout
    assert "swept at exit" not in proc.stdout
    assert (tmp_path / "out.txt").read_text() == "written"
