"""Explanations and their scores on the feature dashboard, rendered and seen in chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lightning_interp.autointerp.run import ExplainSettings, run_autointerp
from lightning_interp.errors import InvalidFeatureStoreError
from lightning_interp.features.dashboard import build_dashboard
from lightning_interp.features.layout import read_store
from tests.autointerp.planted import PLANTED, PlantedExplainer, explanation, planted_store
from tests.features.test_dashboard import assert_not_blank, chromium, index_rows, needs_chromium


@pytest.fixture(scope="module")
def explained(tmp_path_factory) -> Path:
    """The planted store, explained and scored by the ideal planted explainer."""
    folder = planted_store(tmp_path_factory.mktemp("explained") / "store")
    settings = ExplainSettings(n_explain=3, n_test=3, model="planted-explainer")
    latents = list(range(len(PLANTED)))
    model = PlantedExplainer()
    run_autointerp(folder, read_store(folder), model, None, latents, settings, 4, False)
    return folder


def scores_table(page: str) -> dict[str, list[str]]:
    """``{scorer: [auroc, shuffled auroc, accuracy, shuffled accuracy]}`` from a latent page."""
    block = re.search(r'<section class="card" id="scores">(.*?)</section>', page, re.S).group(1)
    rows = re.findall(r"<tr><th>(\w+)</th>(.*?)</tr>", block, re.S)
    cells = {name: re.findall(r"<td[^>]*>([^<]*)</td>", row) for name, row in rows}
    return {name: values for name, values in cells.items() if values}  # not the header


def test_each_latent_page_shows_its_explanation_and_scores(explained, tmp_path):
    site = build_dashboard(explained, tmp_path / "html").parent
    notes = json.loads((explained / "explanations.json").read_text())
    for latent, word in enumerate(PLANTED):
        page = (site / "latents" / f"{latent}.html").read_text(encoding="utf-8")
        text = explanation(word).replace('"', "&#34;")  # autoescaped
        assert f'<p class="explanation">{text}' in page
        table = scores_table(page)
        assert set(table) == {"detection", "fuzz"}
        # The ideal explainer's own explanation is perfect; the shuffled one is not.
        assert table["detection"][0] == "1" and table["fuzz"][0] == "1"
        shuffled = notes[str(latent)]["scores"]["detection"]["shuffled_auroc"]
        assert table["detection"][1] == f"{shuffled:.3g}" and shuffled < 1
    assert 'id="scores"' not in (site / "latents" / f"{len(PLANTED)}.html").read_text()
    rows = {row[0]: row for row in index_rows(site)}
    assert rows[0][5] == 1.0 and rows[0][7] == explanation(PLANTED[0])  # score, explanation


def test_malformed_scores_are_one_typed_error(explained, tmp_path):
    notes = json.loads((explained / "explanations.json").read_text())
    notes["0"]["scores"] = {"detection": {"auroc": "high"}}
    bad = tmp_path / "bad"
    bad.mkdir()
    for path in explained.iterdir():
        if path.is_file():
            (bad / path.name).write_bytes(path.read_bytes())
    (bad / "explanations.json").write_text(json.dumps(notes))
    with pytest.raises(InvalidFeatureStoreError, match="rerun `lightning-interp explain`"):
        build_dashboard(bad, tmp_path / "html")


@needs_chromium
def test_the_scores_show_in_a_browser(explained, tmp_path):
    site = build_dashboard(explained, tmp_path / "html").parent
    page = (site / "latents" / "0.html").as_uri()
    dom = chromium(tmp_path, "--dump-dom", page)
    assert 'The token "w3".' in dom and "Explanation scores" in dom
    assert scores_table(dom)["detection"][0] == "1"
    shot = tmp_path / "latent-0.png"
    chromium(tmp_path, f"--screenshot={shot}", page)
    assert_not_blank(shot)
