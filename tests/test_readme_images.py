"""scripts/readme_images.py (make readme-images) still takes both README screenshots: a short real multirun, the
MLflow UI and headless Chromium, end to end (--quick: 3 epochs; the pictures in docs/img come from the full run)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import ROOT


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium package (headless browser)")
def test_the_script_writes_both_screenshots_at_readme_size(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "scripts/readme_images.py", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("runs_view.png", "report.png"):
        path = tmp_path / name
        assert str(path) in done.stdout.splitlines()
        with Image.open(path) as img:
            img.verify()  # a whole PNG, not a truncated one
        with Image.open(path) as img:
            assert img.format == "PNG" and 1200 <= img.width <= 1400 and 500 <= img.height <= 1600, (name, img.size)
            assert len(img.convert("L").getcolors(1 << 16) or range(1 << 16)) > 50, name  # not a blank page
        assert path.stat().st_size <= 300_000, name
