"""All-or-nothing writes (components/atomic.py) under a real SIGKILL."""

import subprocess
import sys
import time

from components.atomic import atomic_dir, atomic_file
from helpers import ROOT

WRITER = """
import sys, time
from components.atomic import atomic_dir, atomic_file
with atomic_dir(sys.argv[1]) as tmp, atomic_file(sys.argv[2]) as part:
    (tmp / "half").write_text("half-written")
    part.write_text("half-written")
    print("writing", flush=True)
    time.sleep(60)
"""


def test_a_killed_writer_leaves_the_old_outputs_and_its_debris_goes_with_the_next_write(tmp_path):
    out, report = tmp_path / "model", tmp_path / "report.json"
    with atomic_dir(out) as tmp:
        (tmp / "whole").write_text("v1")
    report.write_text("v1")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(report)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "writing\n"
    proc.kill()
    proc.wait()
    debris = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert len(debris) == 2 and all(f".tmp-{proc.pid}-" in name for name in debris)
    assert [p.name for p in out.iterdir()] == ["whole"] and report.read_text() == "v1"  # old outputs intact

    with atomic_dir(out) as tmp:
        (tmp / "whole").write_text("v2")
    with atomic_file(report) as tmp:
        tmp.write_text("v2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "report.json"]  # killed writer's temporaries gone
    assert (out / "whole").read_text() == "v2"


def test_a_live_writers_temporaries_are_left_alone(tmp_path):
    out = tmp_path / "model"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(tmp_path / "r.json")], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
        with atomic_dir(out) as tmp:
            (tmp / "whole").write_text("mine")
        time.sleep(0.1)
        assert any(f".tmp-{proc.pid}-" in p.name for p in tmp_path.iterdir())
    finally:
        proc.kill()
        proc.wait()


def test_a_read_only_disk_names_the_output_not_a_temporary(tmp_path):
    """A real read-only file system: a tmpfs mounted ro for the test (needs root, as in CI; skipped elsewhere)."""
    import errno

    import pytest

    from helpers import tmpfs

    with tmpfs(tmp_path / "ro", "size=1m,ro") as disk:
        for write in (atomic_file, atomic_dir):
            with pytest.raises(OSError) as caught:
                with write(disk / "out"):
                    pass
            assert caught.value.errno == errno.EROFS and caught.value.filename == str(disk / "out")
