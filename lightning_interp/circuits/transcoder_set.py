"""What a replacement model needs from its transcoders: one protocol for PLTs and CLTs.

A *transcoder set* covers the MLPs of layers ``0 .. n_layers - 1`` of one backbone. Layer
``l``'s features read ``input_sites[l]`` (usually ``layers.{l}.mlp_in``) and, for a
cross-layer transcoder (CLT), write to the MLP output of layer ``l`` and of every later
layer; a set of per-layer transcoders (PLTs) is the special case whose decoders from
``l`` reach layer ``l`` only. The MLP output of layer ``t`` is reconstructed as

    mlp_out[t] ≈ sum over s <= t of codes[s] @ decoder(s, t) + output_bias(t)

(circuit-tracer's ``CrossLayerTranscoder`` and the Anthropic "Circuit Tracing" paper).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class TranscoderSet(Protocol):
    """Per-layer encoders and (cross-layer) decoders over one backbone's MLPs.

    Attributes:
        n_layers: Number of layers covered (layer indices ``0 .. n_layers - 1``).
        input_sites: Canonical site each layer's encoder reads, one per layer.
        output_sites: Canonical site each layer's reconstruction replaces, one per layer.
    """

    n_layers: int
    input_sites: list[str]
    output_sites: list[str]

    def d_latent(self, layer: int) -> int:
        """Number of features of ``layer``."""
        ...

    def encode(self, layer: int, x: Tensor) -> Tensor:
        """Feature activations of ``layer`` from its input site's activations ``[..., d_in]``."""
        ...

    def encoder(self, layer: int) -> tuple[Tensor, Tensor]:
        """The affine map before the activation function: ``(W_enc [d_in, d_latent], b_enc)``.

        Pre-activations are ``x @ W_enc + b_enc`` with ``x`` as the input site holds it
        (any input scaling folded in), so attribution can differentiate through it.
        """
        ...

    def decoder(self, source: int, target: int) -> Tensor | None:
        """How ``source``'s features write into ``target``'s MLP output.

        Returns:
            ``[d_latent(source), d_out]``, or ``None`` when ``source`` does not reach
            ``target`` (``target < source``, or a PLT with ``target != source``).
        """
        ...

    def output_bias(self, target: int) -> Tensor:
        """``[d_out]`` bias added to ``target``'s reconstruction."""
        ...
