"""Input-invariant connections between transcoder features (decoder · encoder).

Dunefsky, Chlenski and Nanda 2024, "Transcoders Find Interpretable LLM Feature Circuits"
(section 4): a feature ``i`` of an earlier layer writes its decoder vector into the
residual stream; a feature ``j`` of a later layer reads the residual through its encoder
vector; their *input-invariant* connection is ``W_dec[i] · W_enc[:, j]``, the same for every
input (the *input-dependent* connection multiplies it by ``i``'s activation, which an
attribution graph's edges refine with attention and norms). As in the paper, the pre-MLP
norm between them is left out: its scale depends on the input.

For a cross-layer transcoder, feature ``i`` of layer ``s`` writes ``decoder(s, t)[i]`` into
every MLP output ``t >= s``; all writes with ``t < l`` reach layer ``l``'s input, so the
connection is their sum dotted with the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_interp.circuits.transcoder_set import TranscoderSet
from lightning_interp.errors import ConfigError

__all__ = ["Connection", "FeatureConnections", "connections"]


@dataclass(frozen=True)
class Connection:
    """One feature at the other end of a connection and its weight."""

    layer: int
    feature: int
    weight: float


@dataclass
class FeatureConnections:
    """The strongest connections into and out of one feature.

    Attributes:
        layer: The chosen feature's layer. feature: Its index.
        upstream: Earlier features whose decoders its encoder reads most, by ``|weight|``.
        downstream: Later features whose encoders read its decoder most, by ``|weight|``.
    """

    layer: int
    feature: int
    upstream: list[Connection]
    downstream: list[Connection]


def _write(transcoders: TranscoderSet, source: int, before: int) -> Tensor | None:
    """``[d_latent(source), d_out]``: what ``source``'s features add to layer ``before``'s input."""
    total = None
    for target in range(source, before):
        decoder = transcoders.decoder(source, target)
        if decoder is not None:
            total = decoder if total is None else total + decoder
    return total


def _top(weights: list[tuple[int, Tensor]], top: int) -> list[Connection]:
    if not weights:
        return []
    layers = torch.cat([torch.full((len(w),), layer) for layer, w in weights])
    features = torch.cat([torch.arange(len(w)) for _, w in weights])
    values = torch.cat([w.float() for _, w in weights])
    order = torch.argsort(values.abs(), descending=True, stable=True)[:top]
    return [Connection(int(layers[i]), int(features[i]), float(values[i])) for i in order]


@torch.no_grad()
def connections(
    transcoders: TranscoderSet, layer: int, feature: int, top: int = 10
) -> FeatureConnections:
    """The seed paper's input-invariant connection table for one feature.

    Args:
        transcoders: Per-layer or cross-layer transcoders of one model.
        layer: The chosen feature's layer.
        feature: Its index.
        top: Connections kept on each side.

    Returns:
        Upstream (earlier decoders · this encoder) and downstream (this decoder · later
        encoders) connections, strongest first.

    Raises:
        ConfigError: ``layer`` or ``feature`` out of range, or ``top`` below 1.

    Example:
        >>> from lightning_interp import create_dictionary
        >>> from lightning_interp.circuits import PerLayerTranscoders
        >>> tcs = [create_dictionary("topk", d_in=8, d_out=8, d_latent=16, k=2) for _ in "ab"]
        >>> table = connections(PerLayerTranscoders(tcs), layer=1, feature=3, top=4)
        >>> len(table.upstream), len(table.downstream)
        (4, 0)
    """
    n_layers = transcoders.n_layers
    if not 0 <= layer < n_layers or not 0 <= feature < transcoders.d_latent(layer) or top < 1:
        raise ConfigError(
            f"need 0 <= layer < {n_layers}, 0 <= feature < d_latent(layer) and top >= 1; "
            f"got layer {layer}, feature {feature}, top {top}"
        )
    encoder = transcoders.encoder(layer)[0][:, feature]
    upstream = []
    for source in range(layer):
        write = _write(transcoders, source, layer)
        if write is not None:
            upstream.append((source, write @ encoder.to(write.dtype)))
    downstream = []
    for target in range(layer + 1, n_layers):
        write = _write(transcoders, layer, target)
        if write is not None:
            w_enc = transcoders.encoder(target)[0]
            downstream.append((target, write[feature].to(w_enc.dtype) @ w_enc))
    return FeatureConnections(layer, feature, _top(upstream, top), _top(downstream, top))
