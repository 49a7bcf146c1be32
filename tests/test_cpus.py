import os

import pytest

from components import cpus


@pytest.mark.parametrize("cpu_max, expected", [
    ("200000 100000\n", 2),        # limits.cpu: 2
    ("50000 100000\n", 1),         # 500m: rounded up, never 0
    ("150000 100000\n", 2),        # 1.5
    ("max 100000\n", None),        # no limit: the CPUs the process may run on
])
def test_the_cgroup_cpu_limit_caps_the_cpus_a_step_uses(tmp_path, cpu_max, expected):
    (tmp_path / "cpu.max").write_text(cpu_max)
    affinity = len(os.sched_getaffinity(0))
    assert cpus.available(tmp_path / "cpu.max") == min(affinity, expected or affinity)


def test_without_a_cgroup_file_the_affinity_mask_decides(tmp_path):
    assert cpus.available(tmp_path / "missing") == len(os.sched_getaffinity(0))
