"""benchmarks/: the GPU check's dry run (what runs without a GPU) and the rules bench_align counts faces by."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_align  # noqa: E402  (benchmarks/ is not a package: its scripts run by path)


def test_gpu_check_dry_run_lists_every_step_and_finds_them_ready():
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    steps = [line.split("(")[1].split(",")[0] for line in lines if line.startswith("would run")]
    assert steps == ["cuda tests", "bench_score", "bench_align", "bench_train"]
    assert "--device cuda" in next(line for line in lines if "bench_align.py" in line)
    assert lines[-1] == "dry run: all steps ready"


def test_align_counts_sure_faces_of_the_configured_size_and_sorts_the_rest_by_kind():
    face, unsure, small = (np.array([0, 0, w, w, p]) for w, p in ((80, 0.99), (80, 0.9), (30, 0.999)))
    assert bench_align.kind_of(face, smallest=60) == "face"
    assert bench_align.kind_of(unsure, smallest=60).startswith("baseline probability < 0.95")
    assert bench_align.kind_of(small, smallest=60).startswith("smaller than the smallest face")
    found = np.array([[2, 2, 80, 80], [300, 300, 400, 400]], float)
    assert bench_align.matched(np.stack([face, small + [500, 500, 500, 500, 0]]), found).tolist() == [True, False]
    assert [bench_align.size_class(h) for h in (1080, 720, 480, 360)] == [1080, 720, 480, 480]
