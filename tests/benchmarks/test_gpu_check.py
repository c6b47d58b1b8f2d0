"""The GPU check skips cleanly without CUDA and says so in its report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_the_check_skips_and_writes_the_report(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "gpu-check skipped" in proc.stdout and "no CUDA device" in proc.stdout
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["status"] == "skipped" and not report["device"]["cuda_available"]
    assert report["device"]["torch"] == torch.__version__
    assert "cuda_tests" not in report and "step_benchmark" not in report
    markdown = out.with_suffix(".md").read_text()
    assert "Status: **skipped**" in markdown and "no CUDA device" in markdown


def test_the_quickstart_recipe_for_the_gpu_keeps_the_model_and_data(tmp_path):
    import yaml

    from benchmarks.gpu_check import quickstart_recipe

    recipe = yaml.safe_load(quickstart_recipe(tmp_path, tmp_path / "t.json", steps=7).read_text())
    original = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    assert recipe["model"] == original["model"]
    trainer, data = recipe["trainer"], recipe["data"]["init_args"]
    assert (trainer["accelerator"], trainer["devices"], trainer["precision"]) == (
        "gpu",
        1,
        "bf16-mixed",
    )
    assert [c["class_path"] for c in trainer["callbacks"]] == [
        "benchmarks.throughput.TokensPerSecond"
    ]
    assert data["train_tokens"] == 7 * data["batch_size"]
    assert data["model"] == original["data"]["init_args"]["model"]
