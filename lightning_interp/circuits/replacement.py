"""The replacement model: a backbone whose MLPs are replaced by transcoders plus error terms.

Each layer ``t``'s MLP output is replaced by the transcoder set's reconstruction
``sum over s <= t of codes[s] @ decoder(s, t) + output_bias(t)`` plus an error term
``true MLP output - reconstruction``, so the forward reproduces the original model (to
float rounding). This is circuit-tracer's ``ReplacementModel`` (``replacement_model.py``:
``setup_attribution`` computes the same error vectors) and the "local replacement model"
of Ameisen et al. 2025, "Circuit Tracing: Revealing Computational Graphs in Language
Models", here on a transformers model through forward hooks at canonical sites.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_interp.backbones import Backbone
from lightning_interp.backbones.hooks import add_reader, add_writer
from lightning_interp.backbones.sites import get_module
from lightning_interp.circuits._freeze import FreezeState, frozen
from lightning_interp.circuits.transcoder_set import TranscoderSet
from lightning_interp.errors import ConfigError, ShapeMismatchError

__all__ = ["ReplacementModel", "ReplacementRun"]

CodesFn = Callable[[int, Tensor], Tensor]
ErrorFn = Callable[[int, Tensor, Tensor], Tensor]


@dataclass
class ReplacementRun:
    """One prompt through the replacement model (batch of one, positions first).

    Attributes:
        input_ids: ``[n_pos]`` token ids.
        logits: ``[n_pos, vocab]`` logits of the original model.
        embeddings: ``[n_pos, d_model]`` residual stream entering block 0 (token plus
            position embeddings where the model adds them).
        mlp_in: Per layer, ``[n_pos, d_in]`` the transcoder's input.
        mlp_out: Per layer, ``[n_pos, d_out]`` the true MLP output.
        activations: Per layer, ``[n_pos, d_latent]`` feature activations.
        reconstructions: Per layer, ``[n_pos, d_out]`` the transcoders' reconstruction.
        errors: Per layer, ``[n_pos, d_out]`` ``mlp_out - reconstruction``.
        freeze: Attention patterns and norm scales recorded in this forward.
    """

    input_ids: Tensor
    logits: Tensor
    embeddings: Tensor
    mlp_in: list[Tensor]
    mlp_out: list[Tensor]
    activations: list[Tensor]
    reconstructions: list[Tensor]
    errors: list[Tensor]
    freeze: FreezeState


class ReplacementModel:
    """A backbone with every MLP output replaced by transcoder features plus an error term.

    Args:
        backbone: The model (GPT-2 or Llama family; others with LayerNorm or Llama-style
            RMSNorm and plain softmax attention).
        transcoders: A :class:`~lightning_interp.circuits.TranscoderSet` covering every
            layer of the backbone.
        transcoder_source: Where the transcoders came from, recorded in graph metadata.

    Raises:
        ConfigError: the transcoders cover a different number of layers, or a site is
            unknown to the backbone.

    Example:
        >>> import torch, transformers
        >>> from lightning_interp import create_dictionary
        >>> from lightning_interp.circuits import PerLayerTranscoders
        >>> model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        ...     n_layer=2, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0))
        >>> tcs = [create_dictionary("topk", d_in=16, d_out=16, d_latent=32, k=4) for _ in "ab"]
        >>> rm = ReplacementModel(Backbone(model), PerLayerTranscoders(tcs))
        >>> run = rm.run(torch.tensor([1, 2, 3]))
        >>> bool(torch.allclose(rm.forward(run.input_ids)[0], run.logits, atol=1e-5))
        True
    """

    def __init__(
        self,
        backbone: Backbone,
        transcoders: TranscoderSet,
        *,
        transcoder_source: str | None = None,
    ) -> None:
        self.backbone = backbone
        self.transcoders = transcoders
        self.n_layers = transcoders.n_layers
        n_blocks = backbone.site_map.towers[0].num_layers
        if self.n_layers != n_blocks:
            raise ConfigError(
                f"transcoders cover {self.n_layers} layers but {backbone.name} has {n_blocks} "
                f"blocks; give one transcoder layer per block"
            )
        site_map = backbone.site_map
        self._in_sites = [site_map.resolve(s)[0] for s in transcoders.input_sites]
        self._out_sites = [site_map.resolve(s)[0] for s in transcoders.output_sites]
        self._embed_site = site_map.resolve("embeddings")[0]
        self.transcoder_source = transcoder_source or type(transcoders).__name__
        self.unembed = backbone.model.get_output_embeddings()
        if not isinstance(self.unembed, nn.Linear):
            raise ConfigError(f"{backbone.name} has no linear LM head; load it with causal_lm=True")

    # ------------------------------------------------------------------ pieces
    def input_ids(self, prompt: str | Tensor | Sequence[int]) -> Tensor:
        """``[1, n_pos]`` token ids of a prompt (text, or ids)."""
        if isinstance(prompt, str):
            ids = self.backbone.encode(prompt)["input_ids"]
        else:
            ids = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
            self.backbone.check_token_ids(ids)
        if ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ShapeMismatchError(f"expected one non-empty prompt, got ids {tuple(ids.shape)}")
        return ids.to(self.backbone.device)

    def reconstruct(self, target: int, codes: Sequence[Tensor]) -> Tensor:
        """``target``'s MLP output from the codes of layers ``0..target``."""
        out = self.transcoders.output_bias(target)
        for source in range(target + 1):
            decoder = self.transcoders.decoder(source, target)
            if decoder is not None:
                out = out + codes[source].to(decoder.dtype) @ decoder
        return out

    def pre_activations(self, layer: int, x: Tensor) -> Tensor:
        """Encoder pre-activations of ``layer`` at MLP inputs ``x``."""
        w_enc, b_enc = self.transcoders.encoder(layer)
        return x.to(w_enc.dtype) @ w_enc + b_enc

    @contextlib.contextmanager
    def hooked(
        self,
        *,
        codes_fn: CodesFn | None = None,
        output_fn: Callable[[int, Tensor], Tensor] | None = None,
        embed_fn: Callable[[Tensor], Tensor] | None = None,
        record: dict[str, list[Tensor]] | None = None,
    ) -> Iterator[None]:
        """Hooks that read MLP inputs and rewrite MLP outputs for forwards inside.

        Args:
            codes_fn: ``(layer, mlp_in) -> codes`` stored for the layer's MLP output.
            output_fn: ``(layer, true mlp_out) -> new mlp_out``; with ``codes_fn`` the
                function sees ``self._codes`` of the layers run so far.
            embed_fn: Rewrites the residual stream entering block 0.
            record: Filled with ``"mlp_in"``, ``"mlp_out"`` and ``"embeddings"`` per layer.
        """
        record = {} if record is None else record
        for key in ("mlp_in", "mlp_out", "embeddings"):
            record.setdefault(key, [])
        self._codes: list[Tensor] = []
        model = self.backbone.model
        handles = []

        def reader(layer: int) -> Callable[[Any, Tensor], None]:
            def store(_site: Any, x: Tensor) -> None:
                record["mlp_in"].append(x)
                if codes_fn is not None:
                    self._codes.append(codes_fn(layer, x))

            return store

        def writer(layer: int) -> Callable[[Tensor], Tensor]:
            def write(out: Tensor) -> Tensor:
                record["mlp_out"].append(out)
                return out if output_fn is None else output_fn(layer, out)

            return write

        def embed(x: Tensor) -> Tensor:
            record["embeddings"].append(x)
            return x if embed_fn is None else embed_fn(x)

        try:
            site = self._embed_site
            handles.append(add_writer(get_module(model, site.module_path), site, embed))
            for layer in range(self.n_layers):
                site_in, site_out = self._in_sites[layer], self._out_sites[layer]
                handles.append(
                    add_reader(get_module(model, site_in.module_path), site_in, reader(layer))
                )
                handles.append(
                    add_writer(get_module(model, site_out.module_path), site_out, writer(layer))
                )
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _call(self, input_ids: Tensor) -> Tensor:
        return self.backbone.model(input_ids=input_ids).logits

    # ------------------------------------------------------------------ forwards
    @torch.no_grad()
    def run(self, prompt: str | Tensor | Sequence[int]) -> ReplacementRun:
        """One forward recording features, errors, embeddings and frozen patterns/scales."""
        ids = self.input_ids(prompt)
        record: dict[str, list[Tensor]] = {}
        state = FreezeState("record")

        def codes(layer: int, x: Tensor) -> Tensor:
            return self.transcoders.encode(layer, x.to(self.transcoders.encoder(layer)[0].dtype))

        with self.hooked(codes_fn=codes, record=record), frozen(self.backbone.model, state):
            logits = self._call(ids)[0]
        activations = [c[0] for c in self._codes]
        recon = [self.reconstruct(t, activations) for t in range(self.n_layers)]
        mlp_out = [o[0] for o in record["mlp_out"]]
        return ReplacementRun(
            input_ids=ids[0],
            logits=logits,
            embeddings=record["embeddings"][0][0],
            mlp_in=[x[0] for x in record["mlp_in"]],
            mlp_out=mlp_out,
            activations=activations,
            reconstructions=recon,
            errors=[o - r.to(o.dtype) for o, r in zip(mlp_out, recon, strict=True)],
            freeze=state,
        )

    @torch.no_grad()
    def forward(
        self,
        prompt: str | Tensor | Sequence[int],
        *,
        codes_fn: CodesFn | None = None,
        error_fn: ErrorFn | None = None,
        freeze: FreezeState | None = None,
        embed_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Logits ``[1, n_pos, vocab]`` of the replacement model.

        Args:
            prompt: Text or token ids.
            codes_fn: ``(layer, mlp_in) -> codes``; default the transcoders' encoding.
            error_fn: ``(layer, true mlp_out, reconstruction) -> error``; default the live
                error ``true - reconstruction``, which reproduces the original model.
            freeze: Attention patterns and norm scales to replay (``run().freeze`` with
                ``mode="replay"``), or ``None`` to leave them live.
            embed_fn: Rewrites the residual stream entering block 0.
        """
        ids = self.input_ids(prompt)

        def encode(layer: int, x: Tensor) -> Tensor:
            return self.transcoders.encode(layer, x.to(self.transcoders.encoder(layer)[0].dtype))

        def output(layer: int, out: Tensor) -> Tensor:
            recon = self.reconstruct(layer, self._codes).to(out.dtype)
            error = out - recon if error_fn is None else error_fn(layer, out, recon)
            return recon + error

        freezing = frozen(self.backbone.model, freeze) if freeze else contextlib.nullcontext()
        with (
            self.hooked(codes_fn=codes_fn or encode, output_fn=output, embed_fn=embed_fn),
            freezing,
        ):
            return self._call(ids)

    def meta(self) -> dict[str, Any]:
        """Provenance of the replacement model for graph metadata."""
        return {
            "backbone": self.backbone.name,
            "family": self.backbone.site_map.family,
            "transcoders": self.transcoder_source,
            "transcoder_class": type(self.transcoders).__name__,
            "input_sites": list(self.transcoders.input_sites),
            "output_sites": list(self.transcoders.output_sites),
            "n_layers": self.n_layers,
        }
