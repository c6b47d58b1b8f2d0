"""The explain pipeline end to end with a real tiny transformers model: files, resume, CLI."""

from __future__ import annotations

import json

import pytest

from lightning_interp.autointerp.commands import explain
from lightning_interp.autointerp.explainer import LocalChatModel
from lightning_interp.autointerp.run import ExplainSettings, run_autointerp
from lightning_interp.cli import EXTRA_COMMANDS
from lightning_interp.errors import ConfigError
from lightning_interp.features.dashboard_store import read_store as read_dashboard_store
from lightning_interp.features.layout import read_store
from tests.autointerp.planted import PLANTED, chat_model, chat_tokenizer, planted_store


class Counting:
    """Wraps a chat model and counts the chats it is asked (to see what a resume skips)."""

    def __init__(self, model):
        self.model, self.name, self.chats = model, model.name, 0

    def generate(self, chats, max_new_tokens):
        self.chats += len(chats)
        return self.model.generate(chats, max_new_tokens)

    def yes_probability(self, chats):
        self.chats += len(chats)
        return self.model.yes_probability(chats)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return planted_store(tmp_path_factory.mktemp("planted") / "store")


@pytest.fixture(scope="module")
def local():
    return LocalChatModel(chat_model(), chat_tokenizer(), name="tiny", batch_size=4)


def test_yes_probability_is_a_probability_and_padding_does_not_change_it(local):
    chats = [[{"role": "user", "content": "w1 " * n + "Yes or No"}] for n in (1, 4, 9)]
    batched = local.yes_probability(chats)
    alone = [local.yes_probability([chat])[0] for chat in chats]
    assert all(0.0 < p < 1.0 for p in batched)
    assert batched == pytest.approx(alone, abs=1e-4)  # left padding masked, positions shifted
    answers = local.generate(chats, max_new_tokens=3)
    assert answers == [local.generate([chat], max_new_tokens=3)[0] for chat in chats]


def test_run_writes_results_and_explanations_and_resumes(folder, local):
    store = read_store(folder)
    settings = ExplainSettings(n_explain=3, n_test=3, max_new_tokens=4, model="tiny")
    latents = list(range(len(PLANTED)))
    model = Counting(local)
    results = run_autointerp(folder, store, model, None, latents, settings, 4, progress=False)
    # 6 explanations, then per latent 2 kinds x 2 scorers x (3 + 3) questions.
    assert model.chats == 6 + 6 * 2 * 2 * 6
    saved = json.loads((folder / "autointerp.json").read_text())
    assert saved["settings"]["n_test"] == 3
    assert set(saved["explanations"]) == {str(i) for i in latents}
    for latent, entry in saved["scores"].items():
        assert entry["shuffled_from"] != int(latent)
        for kind in ("real", "shuffled"):
            for scorer in ("detection", "fuzz"):
                assert set(entry[kind][scorer]) == {"auroc", "accuracy", "n"}
                assert entry[kind][scorer]["n"] == 6
    assert saved["summary"]["real"]["detection"]["latents"] == 6
    assert results["summary"] == saved["summary"]
    notes = json.loads((folder / "explanations.json").read_text())
    assert set(notes) == set(saved["explanations"])
    assert all(set(n) == {"text", "score", "scores"} for n in notes.values())
    for latent, note in notes.items():  # each scorer's numbers, real and shuffled, as scored
        real, shuffled = saved["scores"][latent]["real"], saved["scores"][latent]["shuffled"]
        assert set(note["scores"]) == {"detection", "fuzz"}
        assert note["scores"]["fuzz"]["auroc"] == real["fuzz"]["auroc"]
        assert note["scores"]["detection"]["shuffled_accuracy"] == shuffled["detection"]["accuracy"]
    # The dashboard reads them.
    assert read_dashboard_store(folder).explanations == notes

    again = Counting(local)
    rerun = run_autointerp(folder, store, again, None, latents, settings, 4, progress=False)
    assert again.chats == 0 and rerun["scores"] == saved["scores"]
    with pytest.raises(ConfigError, match="other settings"):
        run_autointerp(folder, store, again, None, latents, ExplainSettings(seed=1), 4, False)


def test_an_interrupted_scoring_resumes_where_it_stopped(tmp_path, local):
    folder = planted_store(tmp_path / "store")
    store = read_store(folder)
    settings = ExplainSettings(n_explain=2, n_test=2, max_new_tokens=2, model="tiny")
    run_autointerp(folder, store, local, None, [0, 1], settings, 4, progress=False)
    # Latents 0 and 1 are done; asking for 0..2 explains and scores latent 2 only.
    model = Counting(local)
    run_autointerp(folder, store, model, None, [0, 1, 2], settings, 4, progress=False)
    assert model.chats == 1 + 2 * 2 * 4


def test_command_errors_are_one_line(folder, capsys):
    assert EXTRA_COMMANDS["explain"] == "lightning_interp.autointerp.commands:explain"
    assert explain([str(folder / "missing")]) == 2
    assert "explain: error:" in capsys.readouterr().err
    assert explain([str(folder), "--latent-ids", "11"]) == 2  # a dead latent
    assert "never fired" in capsys.readouterr().err
    assert explain([str(folder), "--latents", "0"]) == 2


def test_command_runs_a_saved_model_and_prints_the_summary(tmp_path, capsys):
    folder = planted_store(tmp_path / "store")
    model_dir = tmp_path / "tiny-chat"
    chat_model().save_pretrained(model_dir)
    chat_tokenizer().save_pretrained(model_dir)
    argv = [str(folder), "--model", str(model_dir), "--embedding-model", "none"]
    argv += ["--latents", "2", "--n-explain", "2", "--n-test", "2", "--max-new-tokens", "2"]
    assert explain([*argv, "--style", "words", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["real"]["detection"]["latents"] == 2
    saved = json.loads((folder / "autointerp.json").read_text())
    assert saved["settings"]["style"] == "words" and saved["settings"]["model"] == str(model_dir)
    assert set(json.loads((folder / "explanations.json").read_text())) == {"0", "1"}
