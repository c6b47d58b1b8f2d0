"""The shuffling buffer: uniform draws without replacement, refills at half, determinism."""

import pytest
import torch

from lightning_interp.data.buffer import ShufflingBuffer
from lightning_interp.errors import ConfigError, ShapeMismatchError


def contexts(first: int, count: int, length: int = 16) -> torch.Tensor:
    """Rows labelled by context: column 0 is the context id, column 1 the position."""
    ids = torch.arange(first, first + count).repeat_interleave(length)
    positions = torch.arange(length).repeat(count)
    return torch.stack([ids, positions], dim=1).float()


def drain(buffer: ShufflingBuffer, batch_size: int) -> list[torch.Tensor]:
    batches = []
    while len(buffer) >= batch_size:
        batches.append(buffer.take(batch_size))
    return batches


def test_batches_mix_many_contexts():
    buffer = ShufflingBuffer(320, seed=0)
    buffer.add(contexts(0, 20))  # 20 contexts of 16 consecutive tokens
    batch = buffer.take(32)
    assert batch.shape == (32, 2)
    assert len(batch[:, 0].unique()) >= 12  # in order, 32 rows would span 2 contexts


def test_draws_without_replacement_until_empty():
    buffer = ShufflingBuffer(256, seed=3)
    rows = contexts(0, 16)
    buffer.add(rows)
    batches = drain(buffer, 16)
    assert len(buffer) == 0 and len(batches) == 16
    taken = torch.cat(batches)
    assert not torch.equal(taken, rows)  # shuffled
    key = taken[:, 0] * 16 + taken[:, 1]
    assert torch.equal(taken[key.argsort()], rows)  # each row exactly once


def test_draws_are_uniform():
    # Each of 8 rows lands in the first batch of 2 with probability 1/4.
    counts = torch.zeros(8)
    for seed in range(2000):
        buffer = ShufflingBuffer(8, seed=seed)
        buffer.add(torch.arange(8.0).unsqueeze(1))
        counts[buffer.take(2).long().squeeze(1)] += 1
    assert ((counts / 2000 - 0.25).abs() < 0.04).all()


def test_needs_refill_at_half_and_mixes_old_with_new():
    buffer = ShufflingBuffer(64, seed=0)
    assert buffer.needs_refill and not buffer.is_full
    buffer.add(contexts(0, 4))
    assert buffer.is_full and not buffer.needs_refill
    buffer.take(31)
    assert len(buffer) == 33 and not buffer.needs_refill
    buffer.take(1)
    assert len(buffer) == 32 and buffer.needs_refill
    buffer.add(contexts(4, 2))
    assert not buffer.needs_refill
    labels = torch.cat(drain(buffer, 16))[:, 0]
    assert (labels < 4).sum() == 32 and (labels >= 4).sum() == 32
    first_half = labels[:32]
    assert (first_half < 4).any() and (first_half >= 4).any()


def test_deterministic_under_seed():
    def run(seed):
        buffer = ShufflingBuffer(64, seed=seed)
        out = []
        for first in range(0, 12, 4):
            buffer.add(contexts(first, 4))
            out += drain(buffer, 16)[:2]
        return torch.cat(out)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_dict_rows_stay_aligned():
    buffer = ShufflingBuffer(100, seed=0)
    x = torch.arange(100.0)
    buffer.add({"inputs": x.unsqueeze(1).repeat(1, 3), "targets": -x, "ids": x.long()})
    batch = buffer.take(10)
    assert set(batch) == {"inputs", "targets", "ids"} and batch["inputs"].shape == (10, 3)
    assert torch.equal(batch["inputs"][:, 0], -batch["targets"])
    assert torch.equal(batch["ids"].float(), batch["inputs"][:, 2])
    assert torch.equal(buffer.column("ids"), buffer.rows()["ids"])


@pytest.mark.parametrize("pending", [False, True])
def test_state_dict_restores_the_shuffle(pending):
    original = ShufflingBuffer(64, seed=5)
    original.add(contexts(0, 4))
    original.take(40)
    if pending:
        original.add(contexts(4, 1))
    state = original.state_dict()
    assert set(state) == {"generator", "shuffle_pending"}  # RNG only, no rows
    restored = ShufflingBuffer(64, seed=123)
    restored.add(original.rows())
    restored.load_state_dict(state)
    for first in (5, 9):
        expected, actual = drain(original, 8), drain(restored, 8)
        assert all(torch.equal(a, b) for a, b in zip(expected, actual, strict=True))
        original.add(contexts(first, 4))
        restored.add(contexts(first, 4))


def test_errors():
    with pytest.raises(ConfigError):
        ShufflingBuffer(0)
    buffer = ShufflingBuffer(8)
    with pytest.raises(ConfigError, match="cannot take"):
        buffer.take(1)
    buffer.add({"a": torch.zeros(4, 2)})
    with pytest.raises(ShapeMismatchError, match="keys"):
        buffer.add({"b": torch.zeros(4, 2)})
    with pytest.raises(ShapeMismatchError):
        buffer.add({"a": torch.zeros(4, 3)})
    with pytest.raises(ShapeMismatchError, match="leading"):
        ShufflingBuffer(8).add({"a": torch.zeros(4, 2), "b": torch.zeros(3, 2)})
    with pytest.raises(ShapeMismatchError):
        buffer.add(torch.zeros(4, 2))


def test_to_moves_rows_in_place_and_keeps_the_draws():
    moved, kept = ShufflingBuffer(64, seed=3), ShufflingBuffer(64, seed=3)
    for buffer in (moved, kept):
        buffer.add(torch.arange(40.0).view(20, 2))
        buffer.take(4)  # shuffled and partly taken
        buffer.add(torch.arange(40.0, 60.0).view(10, 2))  # pending until the next take
    assert moved.to(torch.device("cpu")) is moved
    torch.testing.assert_close(moved.rows(), kept.rows(), rtol=0, atol=0)
    torch.testing.assert_close(moved.take(8), kept.take(8), rtol=0, atol=0)
