"""Input-invariant connections agree with a brute-force loop over feature pairs."""

from __future__ import annotations

import pytest
import torch

from lightning_interp.circuits import TranscoderSet
from lightning_interp.circuits.connections import connections
from lightning_interp.errors import ConfigError
from tests.circuits import _tiny


class _TinyCLT:
    """Random cross-layer weights in the TranscoderSet layout (decoders reach later layers)."""

    def __init__(self, n_layers=3, d=6, latent=5, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.n_layers = n_layers
        self.input_sites = [f"layers.{i}.mlp_in" for i in range(n_layers)]
        self.output_sites = [f"layers.{i}.mlp_out" for i in range(n_layers)]
        self.w_enc = [torch.randn(d, latent, generator=gen) for _ in range(n_layers)]
        self.w_dec = {
            (s, t): torch.randn(latent, d, generator=gen)
            for s in range(n_layers)
            for t in range(s, n_layers)
        }

    def d_latent(self, layer):
        return self.w_enc[layer].shape[1]

    def encode(self, layer, x):
        return torch.relu(x @ self.w_enc[layer])

    def encoder(self, layer):
        return self.w_enc[layer], torch.zeros(self.d_latent(layer))

    def decoder(self, source, target):
        return self.w_dec.get((source, target))

    def output_bias(self, target):
        return torch.zeros(self.w_enc[0].shape[0])


def _brute(tcs, layer, feature):
    up, down = [], []
    for src in range(tcs.n_layers):
        for i in range(tcs.d_latent(src)):
            for tgt in range(tcs.n_layers):
                for j in range(tcs.d_latent(tgt)):
                    if not src < tgt:
                        continue
                    total = 0.0
                    for mid in range(src, tgt):
                        dec = tcs.decoder(src, mid)
                        if dec is not None:
                            total += float(dec[i] @ tcs.encoder(tgt)[0][:, j])
                    if (tgt, j) == (layer, feature):
                        up.append((src, i, total))
                    if (src, i) == (layer, feature):
                        down.append((tgt, j, total))
    return up, down


@pytest.mark.parametrize(
    "tcs", [_TinyCLT(), _tiny.random_transcoders(n_layers=3)], ids=["clt", "plt"]
)
def test_connections_match_brute_force(tcs):
    assert isinstance(tcs, TranscoderSet)
    table = connections(tcs, layer=1, feature=2, top=4)
    up, down = _brute(tcs, 1, 2)
    for got, want in ((table.upstream, up), (table.downstream, down)):
        want = sorted(want, key=lambda c: -abs(c[2]))[:4]
        assert len(got) == len(want) == 4
        assert [(c.layer, c.feature) for c in got] == [(w[0], w[1]) for w in want]
        torch.testing.assert_close(
            torch.tensor([c.weight for c in got]), torch.tensor([w[2] for w in want])
        )


def test_first_and_last_layers_have_one_side_only():
    tcs = _TinyCLT()
    assert connections(tcs, 0, 0).upstream == []
    assert connections(tcs, 2, 0).downstream == []
    with pytest.raises(ConfigError, match="layer"):
        connections(tcs, 3, 0)
