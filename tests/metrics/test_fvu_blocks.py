"""The FVU statistics taken block by block on CPU equal the one-pass float64 statistics."""

from __future__ import annotations

import pytest
import torch

from lightning_interp.metrics import functional
from lightning_interp.metrics.functional import _fvu_update, fraction_of_variance_unexplained
from tests.metrics.test_metrics import reference_fvu


def wide_pair(n: int = 203, d: int = 1024, *, offset: float = 1000.0, noise: float = 1e-4):
    """A large mean over a unit spread, reconstructed almost perfectly: the hard case."""
    generator = torch.Generator().manual_seed(0)
    target = offset + torch.randn(n, d, generator=generator)
    return target + noise * torch.randn(n, d, generator=generator), target


def test_blocks_cover_every_row_once():
    rows = torch.zeros(203, 1024)
    blocks = functional._row_blocks(rows)
    assert len(blocks) > 1  # 32 rows a block at this width: the test exercises the loop
    assert torch.cat([torch.arange(203)[b] for b in blocks]).tolist() == list(range(203))


def test_blocked_statistics_equal_one_block(monkeypatch):
    reconstruction, target = wide_pair()
    blocked = _fvu_update(reconstruction, target)
    monkeypatch.setattr(functional, "_BLOCK_ELEMENTS", 1 << 40)
    assert len(functional._row_blocks(target)) == 1
    whole = _fvu_update(reconstruction, target)
    assert blocked[3] == whole[3] == 203
    # Same float64 products; only the order of float64 additions differs.
    for a, b in zip(blocked[:3], whole[:3], strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0)


# bf16 keeps 8 significant bits: a mean of 3 and visible noise, else it rounds both away.
@pytest.mark.parametrize(
    ("dtype", "offset", "noise"),
    [(torch.float32, 1000.0, 1e-4), (torch.float64, 1000.0, 1e-4), (torch.bfloat16, 3.0, 0.05)],
)
def test_blocked_fvu_of_a_near_perfect_reconstruction_matches_the_reference(dtype, offset, noise):
    reconstruction, target = (t.to(dtype) for t in wide_pair(offset=offset, noise=noise))
    value = float(fraction_of_variance_unexplained(reconstruction, target))
    expected = reference_fvu(reconstruction, target)
    assert 0.0 < expected < 1e-2
    assert value == pytest.approx(expected, rel=1e-6)


def test_float64_inputs_are_not_modified():
    reconstruction, target = (t.double() for t in wide_pair(n=70))
    before = target.clone()
    fraction_of_variance_unexplained(reconstruction, target)
    assert torch.equal(target, before)
