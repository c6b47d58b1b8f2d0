"""The one batch shape ({site: rows}) and the one place it becomes (inputs, targets)."""

import pytest
import torch

from lightning_interp.data.batches import inputs_and_targets, sites_read, split_batch
from lightning_interp.errors import ConfigError, ShapeMismatchError

X, Y, Z = torch.randn(6, 4), torch.randn(6, 3), torch.randn(6, 2)


def same(got, inputs, targets=None) -> bool:
    """Whether ``got`` is ``(inputs, targets)``, tensor by tensor."""
    if (got[1] is None) != (targets is None):
        return False
    return torch.equal(got[0], inputs) and (targets is None or torch.equal(got[1], targets))


def test_a_named_site_is_read_whatever_the_data_serves():
    assert sites_read("b", None, ["a", "b", "c"]) == ("b", None)
    assert sites_read("a", "c", ["a", "b", "c"]) == ("a", "c")


def test_one_site_is_an_autoencoder_and_two_a_transcoder_pair():
    assert sites_read(None, None, ["a"]) == ("a", None)
    assert sites_read(None, None, ["a", "b"]) == ("a", "b")  # in the order served
    for served in ([], ["a", "b", "c"]):
        with pytest.raises(ConfigError, match="names no site .* set its config.provenance.site"):
            sites_read(None, None, served, "dictionary 'k4'")


def test_site_batches_give_the_rows_each_dictionary_reads():
    batch = {"a": X, "b": Y, "c": Z}
    assert same(inputs_and_targets(batch, "b"), Y)
    assert same(inputs_and_targets(batch, "a", "c"), X, Z)
    assert same(inputs_and_targets({"a": X, "b": Y}), X, Y)  # no site named: the pair
    assert same(inputs_and_targets({"a": X[None]}), X)  # leading dimensions become rows
    with pytest.raises(ConfigError, match="'k4' reads site 'd' but the batch holds"):
        inputs_and_targets(batch, "d", who="dictionary 'k4'")
    with pytest.raises(ShapeMismatchError, match="6 rows but targets have 2"):
        inputs_and_targets({"a": X, "b": Y[:2]})


def test_plain_batches_are_read_as_before():
    for batch in (X, (X,), [X], {"activations": X}, {"inputs": X}):
        assert same(inputs_and_targets(batch, "ignored"), X)
    assert same(inputs_and_targets((X, Y), "ignored"), X, Y)
    assert same(split_batch({"inputs": X, "targets": Y}), X, Y)
