"""Per-layer transcoders (PLTs): this repo's transcoders as a :class:`TranscoderSet`.

One :class:`~lightning_interp.dictionaries.Dictionary` per layer, each reading
``layers.{l}.mlp_in`` and predicting ``layers.{l}.mlp_out`` (a transcoder: ``d_out`` set,
``provenance.site_out`` naming the output site). This is the special case of a
cross-layer transcoder whose decoders reach their own layer only (circuit-tracer's
``SingleLayerTranscoder`` set; Dunefsky et al. 2024, "Transcoders Find Interpretable LLM
Feature Circuits").

Activation scales used in training are folded into the weights
(:meth:`~lightning_interp.dictionaries.Dictionary.with_scale_folded`), so
:meth:`PerLayerTranscoders.encoder` and :meth:`PerLayerTranscoders.decoder` act on raw
activations, and ``apply_b_dec_to_input`` is folded into the encoder bias.

Skip transcoders (``W_skip``) are refused: their output has a term linear in the MLP input
that is neither a feature nor an error, and the :class:`TranscoderSet` protocol has no
place for it. circuit-tracer routes gradients through that skip path; here, a skip
transcoder would need the protocol extended first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_interp.dictionaries.base import Dictionary
from lightning_interp.errors import ConfigError, ShapeMismatchError

__all__ = ["PerLayerTranscoders"]


def _sites(given: Sequence[str] | None, n: int, kind: str, what: str) -> list[str]:
    sites = [f"layers.{layer}.{kind}" for layer in range(n)] if given is None else list(given)
    if len(sites) != n:
        raise ConfigError(f"{what} has {len(sites)} sites for {n} transcoders; give one per layer")
    return sites


class PerLayerTranscoders(torch.nn.Module):
    """A :class:`~lightning_interp.circuits.TranscoderSet` of one transcoder per layer.

    Args:
        dictionaries: One transcoder per layer, layer ``l`` at index ``l``.
        input_sites: Site each layer reads; default ``layers.{l}.mlp_in``, or the
            dictionaries' ``provenance.site`` when every one records it.
        output_sites: Site each layer replaces; default ``layers.{l}.mlp_out``, or the
            dictionaries' ``provenance.site_out`` when every one records it.

    Raises:
        ConfigError: no dictionaries, a dictionary with a skip connection or without an
            encoder bias (Gated), or a site list of the wrong length.
        ShapeMismatchError: the layers disagree on input or output width.

    Example:
        >>> from lightning_interp import create_dictionary
        >>> tcs = [create_dictionary("topk", d_in=8, d_out=8, d_latent=16, k=2) for _ in range(2)]
        >>> plt = PerLayerTranscoders(tcs)
        >>> plt.input_sites, plt.decoder(0, 1) is None
        (['layers.0.mlp_in', 'layers.1.mlp_in'], True)
    """

    def __init__(
        self,
        dictionaries: Sequence[Dictionary],
        input_sites: Sequence[str] | None = None,
        output_sites: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not dictionaries:
            raise ConfigError("PerLayerTranscoders needs at least one transcoder (one per layer)")
        for layer, dictionary in enumerate(dictionaries):
            if dictionary.config.skip_connection:
                raise ConfigError(
                    f"transcoder of layer {layer} has a skip connection (W_skip), which "
                    f"attribution cannot place in a graph; use transcoders without skip"
                )
            custom_encoder = type(dictionary).encode_pre is not Dictionary.encode_pre
            if not dictionary.has_encoder_bias or custom_encoder:
                raise ConfigError(
                    f"transcoder of layer {layer} ({type(dictionary).__name__}) has no single "
                    f"affine encoder (x @ W_enc + b_enc); use a TopK, BatchTopK, JumpReLU or "
                    f"standard (ReLU) transcoder"
                )
        folded = [d.with_scale_folded() for d in dictionaries]
        widths = {(d.d_in, d.d_out) for d in folded}
        if len(widths) != 1:
            raise ShapeMismatchError(
                f"transcoders disagree on (d_in, d_out): {sorted(widths)}; every layer of one "
                f"backbone must read and write the same widths"
            )
        # Copies (folding copies): freezing them leaves the caller's dictionaries trainable.
        self.layers = torch.nn.ModuleList(folded).requires_grad_(False)
        self.n_layers = len(folded)
        recorded_in = [d.config.provenance.site for d in folded]
        recorded_out = [d.config.provenance.site_out for d in folded]
        if input_sites is None and all(recorded_in):
            input_sites = recorded_in  # type: ignore[assignment]
        if output_sites is None and all(recorded_out):
            output_sites = recorded_out  # type: ignore[assignment]
        self.input_sites = _sites(input_sites, self.n_layers, "mlp_in", "input_sites")
        self.output_sites = _sites(output_sites, self.n_layers, "mlp_out", "output_sites")

    def _layer(self, layer: int) -> Dictionary:
        if not 0 <= layer < self.n_layers:
            raise ConfigError(
                f"layer {layer} is out of range; valid layers are 0..{self.n_layers - 1}"
            )
        return self.layers[layer]

    def d_latent(self, layer: int) -> int:
        """Number of features of ``layer``."""
        return self._layer(layer).d_latent

    def encode(self, layer: int, x: Tensor) -> Tensor:
        """Feature activations of ``layer`` from raw MLP inputs ``[..., d_in]``."""
        return self._layer(layer).encode(x)

    def encoder(self, layer: int) -> tuple[Tensor, Tensor]:
        """``(W_enc [d_in, d_latent], b_enc [d_latent])`` acting on raw inputs.

        With ``apply_b_dec_to_input`` the encoder sees ``x - b_dec``; that shift is folded
        into the bias: ``(x - b_dec) @ W + b = x @ W + (b - b_dec @ W)``.
        """
        dictionary = self._layer(layer)
        w, b = dictionary.W_enc, dictionary.b_enc
        if dictionary.config.apply_b_dec_to_input:
            b = b - dictionary.b_dec @ w
        return w, b

    def decoder(self, source: int, target: int) -> Tensor | None:
        """``W_dec`` of ``source`` when ``target == source``, else ``None``."""
        dictionary = self._layer(source)
        self._layer(target)
        return dictionary.W_dec if source == target else None

    def output_bias(self, target: int) -> Tensor:
        """``b_dec`` of ``target``'s transcoder."""
        return self._layer(target).b_dec
