"""The cluster path's conventions: CPUs counted as the job owns them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.skipif(shutil.which("taskset") is None or (os.cpu_count() or 1) < 2, reason="needs taskset, 2+ CPUs")
def test_trial_threads_follow_the_affinity_mask_not_the_node():
    code = ("from types import SimpleNamespace as S; from src.sweeps.trial import threads, usable_cpus; "
            "import os; print(os.cpu_count(), usable_cpus(), threads(S(torch_threads=None, n_jobs=1)))")
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    assert int(out[0]) >= 2 and out[1:] == ["1", "1"]  # the node has more; the job owns one
