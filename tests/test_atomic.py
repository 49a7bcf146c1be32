"""All-or-nothing writes (components/atomic.py) under a real SIGKILL."""

import os
import subprocess
import sys
import time
from pathlib import Path

from components.storage.atomic import atomic_dir, atomic_file
from helpers import ROOT

WRITER = """
import sys, time
from components.storage.atomic import atomic_dir, atomic_file
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
    assert len(debris) == 2 and all(f".tmp-{proc.pid}." in name for name in debris)
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
        assert any(f".tmp-{proc.pid}." in p.name for p in tmp_path.iterdir())
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


READER = """
import os, sys, time
out, stop = sys.argv[1], sys.argv[2]
checks = missing = 0
print("reading", flush=True)
while not os.path.exists(stop):
    checks += 1
    if not os.path.exists(os.path.join(out, "whole")):
        missing += 1
print(checks, missing)
"""


def test_a_reader_never_finds_the_output_missing_while_it_is_replaced(tmp_path):
    """Another process looks for the output all the while it is replaced 300 times: it is always there
    (old or new), never absent between two renames."""
    out, stop = tmp_path / "model", tmp_path / "stop"
    with atomic_dir(out) as tmp:
        (tmp / "whole").write_text("0")
    reader = subprocess.Popen([sys.executable, "-c", READER, str(out), str(stop)], stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline() == "reading\n"
    for i in range(300):
        with atomic_dir(out) as tmp:
            (tmp / "whole").write_text(str(i))
    stop.touch()
    checks, missing = map(int, reader.communicate(timeout=60)[0].split())
    assert checks > 1000 and missing == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "stop"]  # no old folder left beside it


def test_the_new_output_is_on_the_disk_before_it_takes_the_old_ones_place(tmp_path, monkeypatch):
    from components.storage import atomic

    events = []
    monkeypatch.setattr(atomic, "_sync_tree", lambda folder: events.append(("sync", folder.name)))
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: events.append(("swap", a.name, b.name)) or False)
    real_replace = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: events.append(("rename", Path(b).name)) or
                        real_replace(a, b))
    for _ in range(2):  # the first creates the output, the second replaces it
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "whole").write_text("x")
    kinds = [e[0] for e in events]
    assert kinds[0] == "sync" and kinds.index("sync", 1) < kinds.index("swap")


def test_an_old_output_that_a_killed_writer_set_aside_is_swept(tmp_path):
    """What a writer killed between its two renames (where no exchange exists) left is a temporary by name."""
    from components.storage.atomic import temporary_prefix

    out = tmp_path / "model"
    aside = tmp_path / (temporary_prefix(out).replace(f"-{os.getpid()}.", "-999999999.") + "x")
    (aside / "old").mkdir(parents=True)
    with atomic_dir(out) as tmp:
        (tmp / "whole").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _in_pid_namespace(code: str, *args, pid: int = 2) -> subprocess.Popen:
    """`code` in a new PID namespace of its own (as a container or a pod on another node runs it), as `pid`
    (the namespace hands out 2, 3, ... in turn: short-lived processes take the ones before it)."""
    outer = ("import subprocess, sys\nfor _ in range(int(sys.argv[1]) - 2): subprocess.run(['true'])\n"
             "sys.exit(subprocess.run([sys.executable, '-c', sys.argv[2], *sys.argv[3:]]).returncode)")
    return subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", outer, str(pid),
                             code, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_writer_in_another_pid_namespace_keeps_its_temporaries_on_a_shared_folder(tmp_path):
    """Two nodes on one ReadWriteMany claim, here two PID namespaces on one folder: the one that starts
    writing later must not take the other's live temporaries (prefix-cache features) for a dead writer's."""
    import pytest

    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a PID namespace here (needs root): {probe.stderr.decode().strip()}")
    out = tmp_path / "prefix-cache"
    # the writer is pid 3 in its namespace; the sweeper, pid 2 in its own, sees no process 3
    writer = _in_pid_namespace(WRITER, str(out), str(tmp_path / "r.json"), pid=3)
    try:
        assert writer.stdout.readline() == "writing\n"
        theirs = sorted(p for p in tmp_path.iterdir() if p.name.startswith(".prefix-cache.tmp-3."))
        assert len(theirs) == 1
        sweeper = _in_pid_namespace("import sys; from pathlib import Path; from components.storage.atomic import "
                                    "atomic_dir\nwith atomic_dir(Path(sys.argv[1])) as tmp: (tmp / 'x').write_text('x')",
                                    str(out))
        assert sweeper.wait(timeout=60) == 0, sweeper.stdout.read()
        assert all(p.exists() for p in theirs)  # the other namespace's live writer keeps them
    finally:
        writer.kill()
        writer.wait()
