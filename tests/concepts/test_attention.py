"""The concept-slot head's attention: SDPA and xformers paths equal the formula."""

import pytest
import torch

from lightning_interp.concepts.attention import attention, attention_reference


def qkv(b=3, h=2, m=5, n=7, d=8, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, -3:] = False
    mask[2, -1] = False
    return make(b, h, m, d), make(b, h, n, d), make(b, h, n, d), mask.to(device)


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_equals_the_reference(masked):
    q, k, v, mask = qkv()
    mask = mask if masked else None
    out = attention(q, k, v, mask, backend="sdpa")
    torch.testing.assert_close(out, attention_reference(q, k, v, mask), atol=1e-6, rtol=1e-5)


def test_masked_keys_get_no_weight():
    q, k, v, mask = qkv()
    v_changed = v.clone()
    v_changed[0, :, -3:] = 1e4  # values at masked positions must not matter
    torch.testing.assert_close(attention(q, k, v, mask), attention(q, k, v_changed, mask))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers runs on CUDA only")
def test_xformers_equals_sdpa_on_cuda():
    pytest.importorskip("xformers.ops")
    q, k, v, mask = qkv(n=8, device="cuda", dtype=torch.float16)
    fast = attention(q, k, v, mask, backend="xformers")
    torch.testing.assert_close(fast, attention(q, k, v, mask, backend="sdpa"), atol=2e-3, rtol=2e-3)


def test_concept_slots_map_only_when_asked_and_same_output():
    from lightning_interp.concepts import ConceptSlotAttention

    torch.manual_seed(0)
    head = ConceptSlotAttention(8, ["a", "b", "c"], ["x", "y"], d_attn=8, heads=2)
    x, mask = torch.randn(4, 6, 8), torch.rand(4, 6) > 0.3
    mask[:, 0] = True
    fused = head(x, mask, return_attention=False)
    with_maps = head(x, mask)
    assert fused.attention is None
    assert with_maps.attention.shape == (4, 3, 6)
    torch.testing.assert_close(with_maps.logits, fused.logits)
    torch.testing.assert_close(with_maps.concept_logits, fused.concept_logits)
