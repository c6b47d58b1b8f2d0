"""Interventions check the graph: in the frozen linear regime prediction equals measurement."""

from __future__ import annotations

import pytest
import torch

from lightning_interp.circuits.attribution import attribute
from lightning_interp.circuits.interventions import check_interventions, predicted_effects
from lightning_interp.errors import ConfigError
from tests.circuits import _tiny

IDS = torch.tensor([3, 7, 1, 9, 4, 2])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_linear_and_direct_regimes_match_the_graph(family, scale):
    rm = _tiny.replacement(getattr(_tiny, family)(), _tiny.random_transcoders())
    graph = attribute(rm, IDS)
    report = check_interventions(rm, graph, scale=scale, regimes=("direct", "linear"), top=3)
    assert len(report.results) == 6
    for result in report.results:
        torch.testing.assert_close(result.measured, result.predicted, atol=1e-4, rtol=1e-3)
    linear = [r for r in report.results if r.regime == "linear"]
    direct = [r for r in report.results if r.regime == "direct"]
    # Paths through later features matter: the total differs from the direct effect.
    assert any(
        (a.predicted - b.predicted).abs().max() > 1e-3 for a, b in zip(linear, direct, strict=True)
    )


def test_exact_transcoders_make_the_frozen_regime_agree_for_small_steps():
    """With exact MLP transcoders the free-attention model is the real model; small steps
    keep ReLUs on their side, so the frozen regime is the linear one."""
    model = _tiny.gpt2()
    rm = _tiny.replacement(model, _tiny.exact_transcoders(model))
    graph = attribute(rm, IDS)
    report = check_interventions(rm, graph, scale=1.001, regimes=("frozen", "free"), top=2)
    frozen = [r for r in report.results if r.regime == "frozen"]
    for result in frozen:
        torch.testing.assert_close(result.measured, result.predicted, atol=1e-5, rtol=0.05)
    assert report.worst("free") < 1.0  # the real model moves the same way, not equally


def test_predicted_effects_of_scale_one_are_zero_and_linear_in_the_step():
    rm = _tiny.replacement(_tiny.gpt2(), _tiny.random_transcoders())
    graph = attribute(rm, IDS)
    nodes = graph.indices("feature")[:4]
    assert predicted_effects(graph, nodes, 1.0).abs().max() == 0
    torch.testing.assert_close(
        predicted_effects(graph, nodes, 3.0), -2 * predicted_effects(graph, nodes, 0.0)
    )
    with pytest.raises(ConfigError, match="not a feature"):
        predicted_effects(graph, graph.indices("logit")[:1], 0.0)
    with pytest.raises(ConfigError, match="regimes"):
        check_interventions(rm, graph, regimes=("sideways",))


def test_intervene_command_reports_and_checks_the_linear_regime(tmp_path, capsys):
    import dataclasses
    import json

    from lightning_interp.cli import run_extra_command
    from lightning_interp.dictionaries.config import Provenance
    from lightning_interp.dictionaries.serialization import save_dictionary
    from tests.metrics.lm_helpers import word_tokenizer

    model = _tiny.gpt2()
    model.save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    for layer, tc in enumerate(_tiny.random_transcoders().layers):
        provenance = Provenance(
            backbone=str(tmp_path / "model"),
            site=f"layers.{layer}.mlp_in",
            site_out=f"layers.{layer}.mlp_out",
        )
        tc.config = dataclasses.replace(tc.config, provenance=provenance)
        save_dictionary(tc, tmp_path / "tcs" / f"layer{layer}")
    argv = [
        str(tmp_path / "tcs"),
        "--prompt",
        "w4 w5 w6",
        "--top",
        "2",
        "--regimes",
        "direct,linear",
    ]
    code = run_extra_command("intervene", [*argv, "--json", str(tmp_path / "r.json")])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.out.count(" linear: predicted") == 2
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert len(rows) == 4 and max(r["relative_error"] for r in rows) < 1e-3
    assert run_extra_command("intervene", [*argv, "--features", "9:9:9"]) == 2
    assert "not active" in capsys.readouterr().err
