"""docs/examples/steering_demo.py on the real offline SmolLM2: the effect docs/steering.md shows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_steering_raises_the_target_token_probability_monotonically():
    run = subprocess.run(
        [sys.executable, str(REPO / "docs/examples/steering_demo.py"), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    probabilities = [result["probabilities"][k] for k in sorted(result["probabilities"], key=int)]
    assert all(a < b for a, b in zip(probabilities[:-1], probabilities[1:], strict=True)), (
        probabilities
    )
    assert probabilities[0] < 0.05 < 0.5 < probabilities[-1]
    # Clamping to 128 from a small code is close to adding 128 - code times the direction.
    assert result["code_at_last_position"] < result["clamp_value"] / 4
    assert result["clamped_probability"] > 0.5
    assert result["target"].strip() in result["steered"]
    assert result["target"].strip() not in result["clean"]
