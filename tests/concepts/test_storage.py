"""Concept heads and banks are saved as crash-consistent pairs, as dictionaries are."""

import os
import signal
import warnings

import pytest
import torch

from lightning_interp.concepts import ConceptBank, ConceptHead, SupervisedCBM
from lightning_interp.errors import NonFiniteError
from tests.zoo.helpers import KILL_POINTS, write_then_kill


def _head(names, bottleneck, seed):
    torch.manual_seed(seed)
    head = SupervisedCBM(8, names, ["x", "y"], bottleneck=bottleneck)
    with torch.no_grad():
        for param in head.parameters():
            param.add_(torch.randn_like(param))
    return head.eval()


def _bank(names, seed):
    torch.manual_seed(seed)
    return ConceptBank(names, torch.randn(len(names), 8), intercepts=torch.randn(len(names)))


def _same_head(loaded, expected):
    assert loaded.concept_names == expected.concept_names
    assert loaded.config == expected.config
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def _same_bank(loaded, expected):
    assert loaded.names == expected.names
    assert torch.equal(loaded.vectors, expected.vectors)
    assert torch.equal(loaded.intercepts, expected.intercepts)


# Same tensor names and shapes, different names and config: the silent mix pairing prevents.
KINDS = {
    "head": (
        lambda: _head(["a", "b", "c"], "soft", 0),
        lambda: _head(["d", "e", "f"], "hard", 1),
        lambda obj, folder: obj.save_pretrained(folder),
        ConceptHead.from_pretrained,
        _same_head,
        ("config.json", "model.safetensors"),
    ),
    "bank": (
        lambda: _bank(["a", "b"], 0),
        lambda: _bank(["c", "d"], 1),
        lambda obj, folder: obj.save(folder),
        ConceptBank.load,
        _same_bank,
        ("concepts.json", "concepts.safetensors"),
    ),
}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to kill a writer for real")
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize(("when", "which", "survivor"), KILL_POINTS)
def test_a_writer_killed_at_any_step_leaves_the_old_or_the_new_object(
    tmp_path, kind, when, which, survivor
):
    make_old, make_new, save, load, same, files = KINDS[kind]
    config_name, weights_name = files
    old, new = make_old(), make_new()
    folder = tmp_path / kind
    save(old, folder)
    (folder / "notes.txt").write_text("mine")  # a neighbour the writes keep

    target = (config_name, weights_name)[which]
    status = write_then_kill(lambda: save(new, folder), when=when, target=target)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    mixed = survivor == "new" and target == weights_name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        same(load(folder), {"old": old, "new": new}[survivor])
    assert any("a save was interrupted" in str(w.message) for w in caught) == mixed

    # The next save clears the killed writer's temporary and leaves a consistent pair.
    save(old, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*files, "notes.txt"])
    same(load(folder), old)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_non_finite_weights_are_never_written(tmp_path, kind):
    make_old, make_new, save, load, same, _ = KINDS[kind]
    good, broken = make_old(), make_new()
    save(good, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        tensor = broken.vectors if kind == "bank" else next(broken.parameters())
        tensor.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"1 NaN"):
        save(broken, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    same(load(tmp_path), good)
