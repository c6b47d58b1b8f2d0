import pytest
import torch

from lightning_interp import create_dictionary, list_architectures
from lightning_interp.dictionaries import SparseCodes
from lightning_interp.dictionaries.sparse_codes import PAD_INDEX
from tests.helpers import example_kwargs


def trained_like(architecture, d_in=12, d_latent=48):
    torch.manual_seed(0)
    dictionary = create_dictionary(
        architecture, d_in=d_in, d_latent=d_latent, dtype="float64", **example_kwargs(architecture)
    ).eval()
    with torch.no_grad():  # some latents fire and some do not, whatever the architecture
        if hasattr(dictionary, "b_enc"):
            dictionary.b_enc.normal_(0, 0.5)
        threshold = getattr(dictionary, "threshold", None)
        if threshold is not None and bool((threshold < 0).any()):
            # BatchTopK before training has no threshold yet and picks across the batch;
            # a trained one codes each row alone, as inference needs.
            threshold.fill_(0.1)
    return dictionary


@pytest.mark.parametrize("architecture", list_architectures())
@pytest.mark.parametrize("chunk_rows", [7, 4096])
def test_sparse_codes_are_the_dense_codes(architecture, chunk_rows):
    dictionary = trained_like(architecture)
    x = torch.randn(3, 10, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sparse = dictionary.encode_sparse(x, chunk_rows=chunk_rows)
    dense = dictionary.encode(x).reshape(30, -1)
    assert sparse.num_rows == 30 and sparse.indices.dtype == torch.int64
    # Chunks run separate matmuls: equal up to rounding (float64), same support.
    torch.testing.assert_close(sparse.to_dense(), dense, atol=1e-10, rtol=0)
    assert torch.equal(sparse.counts(), (dense != 0).sum(-1))
    assert 0 < int(sparse.counts().sum()) < dense.numel()
    # Sorted descending within a row; padding is (PAD_INDEX, 0) at the end.
    assert bool((sparse.values[:, :-1] >= sparse.values[:, 1:]).all())
    assert bool((sparse.values[~sparse.mask] == 0).all())


def test_topk_codes_take_k_entries_a_row_not_the_width():
    dictionary = create_dictionary("topk", d_in=16, d_latent=65536, k=8)
    sparse = dictionary.encode_sparse(torch.randn(64, 16), chunk_rows=16)
    assert sparse.values.shape == (64, 8)  # not [64, 65536]
    assert bool(sparse.mask.all())


def test_cat_pads_to_the_widest_part():
    a = SparseCodes.from_dense(torch.tensor([[0.0, 3.0, 1.0]]))
    b = SparseCodes.from_dense(torch.tensor([[2.0, 0.0, 0.0]]))
    both = SparseCodes.cat([a, b])
    assert both.indices.tolist() == [[1, 2], [0, PAD_INDEX]]
    assert both.to_dense().tolist() == [[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]]
    rows, latents, values = both.coo()
    assert rows.tolist() == [0, 0, 1] and latents.tolist() == [1, 2, 0]
