"""The feature store against a dense brute force on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from lightning_interp.features.build import build_feature_store
from lightning_interp.features.layout import read_store
from lightning_interp.features.store import FeatureSettings
from tests.features.builder_helpers import SITE, dense_pass, tiny_setup

SETTINGS = FeatureSettings(
    top_k=4,
    window=6,
    quantile_bins=3,
    per_quantile=2,
    correlated=5,
    histogram_bins=12,
    log10_min=-3.0,
    log10_max=1.0,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    backbone, sae, corpus = tiny_setup()
    out = tmp_path_factory.mktemp("fs") / "store"
    build_feature_store(sae, backbone, corpus, out, site=SITE, settings=SETTINGS, progress=False)
    return read_store(out), dense_pass(backbone, sae, corpus), sae


def test_counts_densities_means_and_maxima(built):
    store, dense, _ = built
    stats, codes = store["stats"], dense.codes
    fired = codes > 0
    assert store["meta"]["corpus"]["tokens"] == len(codes)
    assert torch.equal(stats["count"], fired.sum(0))
    assert torch.allclose(stats["density"], fired.float().mean(0))
    assert torch.allclose(stats["max_activation"], codes.max(0).values)
    mean = codes.sum(0) / fired.sum(0).clamp(min=1)
    assert torch.allclose(stats["mean_activation"], mean, atol=1e-6)
    dead = ~fired.any(0)
    assert dead.any(), "the tiny dictionary should have dead latents to check"
    for name, tensor in stats.items():
        assert not tensor.float().isnan().any(), name
    assert (stats["mean_activation"][dead] == 0).all() and (stats["quantiles"][dead] == 0).all()


def test_deciles_and_histogram_equal_a_direct_computation(built):
    store, dense, _ = built
    assert store["meta"]["quantiles"] == "exact"
    probs = torch.arange(1, 10, dtype=torch.float64) / 10
    bins = SETTINGS.histogram_bins
    for latent in range(dense.codes.shape[1]):
        firings = dense.codes[:, latent][dense.codes[:, latent] > 0].double()
        if not len(firings):
            continue
        expected = torch.quantile(firings, probs).float()
        assert torch.allclose(store["stats"]["quantiles"][latent], expected, atol=1e-6)
        edges = (firings.log10() - SETTINGS.log10_min) / (SETTINGS.log10_max - SETTINGS.log10_min)
        idx = (edges * bins).floor().long().clamp(0, bins - 1)
        assert torch.equal(store["stats"]["histogram"][latent], torch.bincount(idx, minlength=bins))


def _examples(dense, latent):
    """(value, source, context, position) of each context's max of ``latent``, brute force."""
    out = []
    ctx = dense.ids.shape[1]
    for row in (dense.codes[:, latent] > 0).nonzero().squeeze(1).tolist():
        out.append((float(dense.codes[row, latent]), int(dense.source[row])))
    best: dict[int, tuple[float, int]] = {}
    for value, source in out:  # rows in corpus order: the first max of a context wins
        context = source // ctx
        if context not in best or value > best[context][0]:
            best[context] = (value, source)
    return sorted(best.values(), key=lambda e: (-e[0], e[1]))


def test_top_contexts_equal_a_dense_brute_force(built):
    store, dense, _ = built
    contexts = store["contexts"]
    ctx = dense.ids.shape[1]
    centre = SETTINGS.center
    flat_ids = dense.ids.reshape(-1)
    code_at = {int(s): i for i, s in enumerate(dense.source)}
    checked = 0
    for latent in range(dense.codes.shape[1]):
        expected = _examples(dense, latent)[: SETTINGS.top_k]
        n = len(expected)
        got_sources = contexts["top_source"][latent]
        assert got_sources[:n].tolist() == [s for _, s in expected]
        assert (got_sources[n:] == -1).all() and (contexts["top_values"][latent, n:] == 0).all()
        for slot, (value, source) in enumerate(expected):
            assert contexts["top_values"][latent, slot] == pytest.approx(value)
            assert contexts["top_center"][latent, slot] == centre
            context, position = divmod(source, ctx)
            for w in range(SETTINGS.window):
                pos = position - centre + w
                token = contexts["top_tokens"][latent, slot, w]
                act = contexts["top_activations"][latent, slot, w]
                if not 0 <= pos < ctx:
                    assert token == -1 and act == 0
                    continue
                g = context * ctx + pos
                assert token == flat_ids[g]
                want = dense.codes[code_at[g], latent] if g in code_at else torch.tensor(0.0)
                assert act == want.half()
            checked += 1
    assert checked > 20


def test_quantile_examples_are_real_examples_in_their_bins(built):
    store, dense, _ = built
    c = store["contexts"]
    q, per = SETTINGS.quantile_bins, SETTINGS.per_quantile
    for latent in range(dense.codes.shape[1]):
        examples = dict((s, v) for v, s in _examples(dense, latent))
        top = store["stats"]["max_activation"][latent]
        for slot in range(q * per):
            source = int(c["quantile_source"][latent, slot])
            if source < 0:
                assert c["quantile_values"][latent, slot] == 0
                continue
            value = float(c["quantile_values"][latent, slot])
            assert examples[source] == pytest.approx(value)
            b = slot // per
            assert b / q * top - 1e-6 < value <= (b + 1) / q * top + 1e-6
        # Bins holding at most S examples in all keep them all when the max came first.
        assert (c["quantile_source"][latent] >= 0).sum() <= len(examples)


def test_correlated_latents_are_jaccard_of_firing(built):
    store, dense, _ = built
    fired = (dense.codes > 0).double()
    co = fired.T @ fired  # exact small integers
    n = fired.sum(0)
    jaccard = co / (n[:, None] + n[None, :] - co).clamp(min=1)
    jaccard.fill_diagonal_(0)
    c = SETTINGS.correlated
    for latent in range(fired.shape[1]):
        pairs = [
            (-float(jaccard[latent, j]), j)
            for j in range(fired.shape[1])
            if co[latent, j] > 0 and j != latent
        ]
        expected = sorted(pairs)[:c]
        ids = store["stats"]["correlated_ids"][latent]
        assert ids[: len(expected)].tolist() == [j for _, j in expected]
        assert (ids[len(expected) :] == -1).all()
        values = store["stats"]["correlated_values"][latent, : len(expected)]
        assert torch.allclose(values, torch.tensor([-v for v, _ in expected]).float())


def test_vocab_and_store_json(built):
    store, _, sae = built
    meta = store["meta"]
    assert meta["format"] == "lightning-interp-feature-store" and meta["version"] == 1
    assert meta["dictionary"]["d_latent"] == sae.d_latent and meta["dictionary"]["site"] == SITE
    assert meta["logit_lens"] == 10 and meta["correlation"] == "jaccard"
    ids = set(store["contexts"]["top_tokens"].unique().tolist()) - {-1}
    ids |= set(store["stats"]["logit_top_ids"].unique().tolist())
    assert ids <= {int(i) for i in store["vocab"]}
    assert all(isinstance(v, str) for v in store["vocab"].values())
