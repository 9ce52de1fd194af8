"""tests/gpu_check.sh fails loudly (issue 28): without CUDA it stops at once with a non-zero exit, and its
comparison helper (tests/gpu_compare.py) fails on any difference beyond the stated tolerance."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from gpu_compare import main as compare  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path; on a GPU machine the script itself runs")
def test_gpu_check_without_cuda_fails_at_once(tmp_path):
    done = subprocess.run(["bash", str(REPO / "tests" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120, env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin:" + str(Path(sys.executable).parent)})
    assert done.returncode != 0
    assert "no CUDA device" in done.stdout
    assert not (tmp_path / "gpu_check" / "pip.log").exists()  # nothing installed, nothing built


def test_gpu_compare_passes_equal_records_and_fails_on_a_difference(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    record = {"val": {"mean": {"ap": 0.5, "loss": 0.7}}, "train_seconds": 12.0, "steps": 40}
    a.write_text(json.dumps(record))
    b.write_text(json.dumps({**record, "train_seconds": 99.0}))     # timing fields are not compared
    assert compare(["summary", str(a), str(b)]) == 0
    b.write_text(json.dumps({**record, "val": {"mean": {"ap": 0.5 + 1e-9, "loss": 0.7}}}))
    assert compare(["summary", str(a), str(b)]) == 1                 # rtol 0: any difference fails
    assert compare(["summary", str(a), str(b), "--rtol", "1e-6"]) == 0
    b.write_text(json.dumps({**record, "val": {"mean": {"ap": float("nan"), "loss": 0.7}}}))
    assert compare(["summary", str(a), str(b), "--rtol", "1"]) == 1  # a NaN on one side is a difference
    b.write_text(json.dumps({"val": {"mean": {"ap": 0.5}}, "steps": 40}))
    assert compare(["summary", str(a), str(b)]) == 1                 # a missing field is a difference
