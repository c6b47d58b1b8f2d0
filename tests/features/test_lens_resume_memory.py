"""Logit lens by hand, resume after a kill, and accumulators bounded on a wide dictionary."""

from __future__ import annotations

import pytest
import torch

from lightning_interp.dictionaries.sparse_codes import SparseCodes
from lightning_interp.features.build import Corpus, build_feature_store
from lightning_interp.features.layout import partial_folder, read_store
from lightning_interp.features.lens import logit_lens
from lightning_interp.features.store import FeatureAccumulator, FeatureSettings
from tests.backbones.tiny_models import bert, gpt2, llama
from tests.features.builder_helpers import SITE, tiny_setup


def test_logit_lens_equals_a_hand_computation_through_rmsnorm():
    torch.manual_seed(0)
    model = llama()
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 2.0)
    w_dec = torch.randn(6, 32)
    lens = logit_lens(model, w_dec, top=3)
    logits = (w_dec * model.model.norm.weight) @ model.lm_head.weight.T
    high, low = logits.topk(3), logits.topk(3, largest=False)
    assert torch.equal(lens["logit_top_ids"], high.indices)
    assert torch.allclose(lens["logit_top_values"], high.values, atol=1e-5)
    assert torch.equal(lens["logit_bottom_ids"], low.indices)
    assert torch.allclose(lens["logit_bottom_values"], low.values, atol=1e-5)


def test_logit_lens_centres_for_layernorm_and_skips_encoders():
    torch.manual_seed(0)
    model = gpt2()
    with torch.no_grad():
        model.transformer.ln_f.weight.uniform_(0.5, 2.0)
    w_dec = torch.randn(4, 32)
    lens = logit_lens(model, w_dec, top=2)
    centred = w_dec - w_dec.mean(-1, keepdim=True)
    logits = (centred * model.transformer.ln_f.weight) @ model.lm_head.weight.T
    assert torch.allclose(lens["logit_top_values"], logits.topk(2).values, atol=1e-5)
    assert logit_lens(bert(), w_dec, top=2) is None  # no LM head
    assert logit_lens(model, torch.randn(4, 7), top=2) is None  # not the residual width


def test_a_killed_build_resumes_to_the_same_store(tmp_path):
    backbone, sae, corpus = tiny_setup(documents=70)
    settings = FeatureSettings(top_k=3, window=5, quantile_bins=2, per_quantile=2)
    full = build_feature_store(
        sae, backbone, corpus, tmp_path / "full", site=SITE, settings=settings, progress=False
    )
    documents = list(corpus.texts)

    def dying():  # killed in the second chunk of 64 documents the tokenizer reads
        for i, text in enumerate(documents):
            if i == 66:
                raise KeyboardInterrupt
            yield text

    killed = Corpus(
        dying, context_size=corpus.context_size, contexts_per_capture=corpus.contexts_per_capture
    )
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build_feature_store(
            sae,
            backbone,
            killed,
            out,
            site=SITE,
            settings=settings,
            checkpoint_every=2,
            progress=False,
        )
    assert not out.exists() and (partial_folder(out) / "progress.json").is_file()
    resumed = Corpus(
        lambda: iter(documents),
        context_size=corpus.context_size,
        contexts_per_capture=corpus.contexts_per_capture,
    )
    build_feature_store(
        sae,
        backbone,
        resumed,
        out,
        site=SITE,
        settings=settings,
        checkpoint_every=2,
        progress=False,
    )
    assert not partial_folder(out).exists()
    a, b = read_store(full), read_store(out)
    assert a["meta"] == b["meta"] and a["vocab"] == b["vocab"]
    for group in ("stats", "contexts"):
        assert a[group].keys() == b[group].keys()
        for name in a[group]:
            assert torch.equal(a[group][name], b[group][name]), name


def test_accumulators_stay_bounded_on_a_wide_dictionary():
    width, k, rows, ctx = 65536, 16, 64, 16
    settings = FeatureSettings(
        top_k=2,
        window=4,
        quantile_bins=2,
        per_quantile=1,
        histogram_bins=4,
        value_sample=4,
        token_sample=64,
    )
    acc = FeatureAccumulator(width, settings)
    size = None
    gen = torch.Generator().manual_seed(0)
    for batch in range(12):
        indices = torch.rand(rows, width, generator=gen).topk(k).indices
        values = torch.rand(rows, k, generator=gen).sort(descending=True).values + 0.01
        ids = torch.randint(0, 50, (rows // ctx, ctx), generator=gen)
        row_index = torch.arange(rows).view(rows // ctx, ctx)
        acc.update(SparseCodes(values, indices, width), ids, row_index, batch * (rows // ctx))
        # After the first batch (the token sample's width is the widest row, <= k).
        size = size or acc.nbytes()
        assert acc.nbytes() == size, f"grew at batch {batch}"
    assert int(acc.count.sum()) == 12 * rows * k
    # The best top example of every latent is its largest activation (values are copied).
    torch.testing.assert_close(acc.ordered("top")["values"][:, 0], acc.act_max, rtol=0, atol=0)
