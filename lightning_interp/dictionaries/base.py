"""The :class:`Dictionary` base class: encode, decode, losses and the unit-norm constraint."""

from __future__ import annotations

import dataclasses
from os import PathLike
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_interp._dtypes import dtype_from_name, dtype_name
from lightning_interp.dictionaries.config import DictionaryConfig, check_fits_in_memory, check_scale
from lightning_interp.dictionaries.output import DictionaryOutput, squared_error
from lightning_interp.dictionaries.rowwise import row_dots
from lightning_interp.dictionaries.sparse_codes import SparseCodes
from lightning_interp.dictionaries.sparse_ops import affine
from lightning_interp.errors import ConfigError, CorruptFileError, ShapeMismatchError

# Re-exported from output.py: callers have always imported them from here.
__all__ = ["Dictionary", "DictionaryOutput", "squared_error"]


class Dictionary(nn.Module):
    """A sparse dictionary: ``x -> codes -> reconstruction``.

    Subclasses define the nonlinearity (:meth:`activation`) and their loss terms
    (:meth:`sparsity_losses`), and register themselves with
    :func:`~lightning_interp.dictionaries.register_dictionary`.

    Calling a dictionary returns the reconstruction, as SAELens users expect; use
    :meth:`forward_train` for codes, pre-activations and the loss inputs.

    Tensors follow SAELens's layout: ``W_enc [d_in, d_latent]``, ``b_enc [d_latent]``,
    ``W_dec [d_latent, d_out]``, ``b_dec [d_out]``, and with ``config.skip_connection``
    ``W_skip [d_out, d_in]`` (reconstruction ``decode(codes) + x @ W_skip.T``).

    Args:
        config: The architecture's config dataclass.
    """

    config_class: ClassVar[type[DictionaryConfig]] = DictionaryConfig
    architecture: ClassVar[str] = ""
    # Gated SAEs replace b_enc with their own gate and magnitude biases.
    has_encoder_bias: ClassVar[bool] = True
    # Capabilities loops and generic tests ask for: a closed-form learner (semi-NMF) has
    # fit_step(x, reduce=...) instead of backward + optimizer; some refuse d_out/skips.
    fits_in_closed_form: ClassVar[bool] = False
    supports_transcoding: ClassVar[bool] = True

    def __init__(self, config: DictionaryConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ConfigError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        check_fits_in_memory(config, type(self).__name__)
        self.config = config
        dtype = dtype_from_name(config.dtype)
        d_in, d_latent, d_out = config.d_in, config.d_latent, config.output_width
        self.W_enc = nn.Parameter(torch.empty(d_in, d_latent, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(d_latent, d_out, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        if self.has_encoder_bias:
            self.b_enc = nn.Parameter(torch.zeros(d_latent, dtype=dtype))
        if config.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, dtype=dtype))
        self.reset_parameters()

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random unit-norm decoder rows, encoder tied to the decoder's transpose.

        Tying the initial encoder to the decoder (Gao et al. 2024, Conerly et al. 2024)
        starts every latent pointing at its own atom, which cuts dead latents early on.
        """
        generator_dtype = torch.float32
        w_dec = torch.randn(self.W_dec.shape, dtype=generator_dtype)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        if not self.config.normalize_decoder:
            w_dec *= 0.1  # Anthropic's April 2024 update: small decoder rows when unconstrained
        self.W_dec.copy_(w_dec)
        if self.config.output_width == self.config.d_in:
            self.W_enc.copy_(w_dec.T)
        else:
            self.W_enc.copy_(torch.randn(self.W_enc.shape) / self.config.d_in**0.5)
        self.b_dec.zero_()
        if self.has_encoder_bias:
            self.b_enc.zero_()
        if self.config.skip_connection:
            # A zero skip starts as a plain dictionary; training grows it where it helps.
            self.W_skip.zero_()

    # ------------------------------------------------------------------ properties
    @property
    def d_in(self) -> int:
        """Input width."""
        return self.config.d_in

    @property
    def d_latent(self) -> int:
        """Number of latents."""
        return self.config.d_latent

    @property
    def d_out(self) -> int:
        """Output width (``d_in`` unless this is a transcoder)."""
        return self.config.output_width

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype."""
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        """Parameter device."""
        return self.W_dec.device

    # ------------------------------------------------------------------ forward pieces
    def check_input(self, x: Tensor) -> None:
        """Raise :class:`ShapeMismatchError` unless ``x`` is ``[..., d_in]``."""
        if x.ndim == 0 or x.shape[-1] != self.d_in:
            site = self.config.provenance.site
            where = f" (trained on {site!r})" if site else ""
            raise ShapeMismatchError(
                f"{type(self).__name__} expects inputs with last dimension d_in={self.d_in}"
                f"{where}, got shape {tuple(x.shape)}; check that the activations come from "
                f"the site and model this dictionary was trained on"
            )

    def _prepare_input(self, x: Tensor) -> Tensor:
        self.check_input(x)
        # Under autocast the matmuls pick their own dtype; otherwise bf16 activations must
        # meet the parameters in the parameters' dtype rather than fail.
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != self.dtype:
            x = x.to(self.dtype)
        return x

    def encoder_input(self, x: Tensor) -> Tensor:
        """The input as the encoder sees it (centred on ``b_dec`` when configured)."""
        return x - self.b_dec if self.config.apply_b_dec_to_input else x

    def encode_pre(self, x: Tensor) -> Tensor:
        """Encoder pre-activations, ``[..., d_latent]``."""
        x = self._prepare_input(x)
        flat = self.encoder_input(x).reshape(-1, self.d_in)
        # A GEMM and an in-place bias add: addmm's bias broadcast costs more (sparse_ops.affine).
        pre = affine(flat, self.W_enc, self.b_enc)
        return pre.view(*x.shape[:-1], self.d_latent)

    def activation(self, pre: Tensor) -> Tensor:
        """The inference nonlinearity mapping pre-activations to codes."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Sparse codes for ``x`` (``[..., d_in]`` to ``[..., d_latent]``)."""
        return self.activation(self.encode_pre(x))

    @torch.no_grad()
    def encode_sparse(self, x: Tensor, *, chunk_rows: int = 4096) -> SparseCodes:
        """Codes of ``x`` (``[..., d_in]``, leading dims flattened) as :class:`SparseCodes`.

        ``chunk_rows`` rows at a time: memory never holds ``[N, d_latent]`` dense codes.

        Example:
            >>> from lightning_interp import create_dictionary
            >>> sae = create_dictionary("topk", d_in=8, d_latent=32, k=3)
            >>> x = torch.randn(5, 8)
            >>> sparse = sae.encode_sparse(x)
            >>> sparse.indices.shape, torch.equal(sparse.to_dense(), sae.encode(x))
            (torch.Size([5, 3]), True)
        """
        rows = x.reshape(-1, x.shape[-1])
        parts = [self.encode_sparse_chunk(chunk) for chunk in rows.split(chunk_rows)]
        return SparseCodes.cat(parts) if parts else SparseCodes.empty(self.d_latent, x.device)

    def encode_sparse_chunk(self, x: Tensor) -> SparseCodes:
        """:class:`SparseCodes` of ``[n, d_in]`` rows; architectures may skip the dense codes."""
        return SparseCodes.from_dense(self.encode(x))

    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruction from codes (``[..., d_latent]`` to ``[..., d_out]``)."""
        if codes.shape[-1] != self.d_latent:
            raise ShapeMismatchError(
                f"decode expects codes with last dimension d_latent={self.d_latent}, "
                f"got shape {tuple(codes.shape)}"
            )
        return codes @ self.W_dec + self.b_dec

    def with_skip(self, x: Tensor, reconstruction: Tensor) -> Tensor:
        """``reconstruction + x @ W_skip.T`` (raw ``x``, as SAELens and sparsify) if skipping."""
        if not self.config.skip_connection:
            return reconstruction
        x = self._prepare_input(x)
        return reconstruction + (x @ self.W_skip.T).to(reconstruction.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruct ``x`` (for a transcoder: predict the output site)."""
        return self.with_skip(x, self.decode(self.encode(x)))

    def forward_train(self, x: Tensor) -> DictionaryOutput:
        """One training forward pass on ``[N, d_in]`` activations.

        The default uses the inference nonlinearity; architectures whose training form
        differs (BatchTopK, Gated) override this.
        """
        pre = self.encode_pre(x)
        codes = self.activation(pre)
        return DictionaryOutput(self.with_skip(x, self.decode(codes)), codes, pre)

    # ------------------------------------------------------------------ losses
    def loss(
        self,
        x: Tensor,
        out: DictionaryOutput,
        *,
        target: Tensor | None = None,
        sparsity_scale: float = 1.0,
        dead_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Loss terms for one batch; ``"loss"`` is the total to minimise.

        Args:
            x: The input batch ``[N, d_in]``.
            out: The result of :meth:`forward_train` on ``x``.
            target: What to reconstruct; defaults to ``x`` (a transcoder passes its output
                site).
            sparsity_scale: Multiplier on the sparsity penalty, ramped from 0 to 1 during
                sparsity warm-up.
            dead_mask: Boolean ``[d_latent]``, latents currently considered dead (for
                auxiliary losses that revive them).

        Returns:
            A dict with ``"loss"`` (the total), ``"mse_loss"`` (squared L2 error summed over
            features, averaged over rows) and the architecture's own terms.
        """
        # Losses are reduced in float32 even under bf16 autocast: a bf16 sum over millions
        # of squared errors loses the small differences training follows.
        target = (x if target is None else target).float()
        terms = {"mse_loss": squared_error(out.reconstruction.float(), target)}
        terms.update(
            self.sparsity_losses(
                x, out, target=target, sparsity_scale=sparsity_scale, dead_mask=dead_mask
            )
        )
        terms["loss"] = sum(v for k, v in terms.items() if k.endswith("loss"))
        return terms

    def sparsity_losses(
        self,
        x: Tensor,
        out: DictionaryOutput,
        *,
        target: Tensor,
        sparsity_scale: float,
        dead_mask: Tensor | None,
    ) -> dict[str, Tensor]:
        """Architecture-specific loss terms; keys ending in ``loss`` are added to the total.

        Other keys (e.g. ``"l1"``, the unscaled penalty) are logged only.
        """
        return {}

    def decoder_norms(self) -> Tensor:
        """L2 norm of each decoder row, ``[d_latent]``."""
        return self.W_dec.norm(dim=1)

    # ------------------------------------------------------------------ constraints
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm (after an optimizer step)."""
        self.W_dec.div_(self.decoder_norms().clamp_min(1e-8)[:, None])

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Project out the gradient component along each decoder row (before a step).

        With unit-norm rows, that component only changes a row's norm, which the
        renormalisation undoes anyway; removing it keeps Adam's moments meaningful.
        """
        grad = self.W_dec.grad
        if grad is None:
            return
        w = self.W_dec
        # No temporary the size of W_dec (three of them cost ~50 ms a step at 16384 x 768).
        dots = row_dots(grad, w)
        squared = w.norm(dim=1, keepdim=True).square_().clamp_min_(1e-8)
        grad.addcmul_(w, dots.div_(squared), value=-1)

    @torch.no_grad()
    def initialize_b_dec_(self, sample: Tensor, method: str | None = None) -> None:
        """Set ``b_dec`` from a sample of (target) activations.

        Args:
            sample: ``[N, d_out]`` activations the decoder should be centred on.
            method: ``"geometric_median"``, ``"mean"`` or ``"zeros"``; defaults to
                ``config.b_dec_init``.
        """
        from lightning_interp.dictionaries.init import geometric_median

        method = method or self.config.b_dec_init
        if sample.ndim == 0 or sample.shape[-1] != self.d_out:
            raise ShapeMismatchError(
                f"b_dec has width {self.d_out}; got a sample of shape {tuple(sample.shape)}"
            )
        sample = sample.detach().reshape(-1, sample.shape[-1]).float()
        if method == "zeros":
            centre = torch.zeros(sample.shape[-1])
        elif method == "mean":
            centre = sample.mean(0)
        elif method == "geometric_median":
            centre = geometric_median(sample)
        else:
            raise ConfigError(f"unknown b_dec initialisation {method!r}")
        self.b_dec.copy_(centre.to(self.b_dec))

    # ------------------------------------------------------------------ serialisation
    def export_tensors(self) -> dict[str, Tensor]:
        """Tensors as written to ``model.safetensors`` (SAELens names and layout)."""
        return {name: t.detach() for name, t in self.state_dict().items()}

    def import_tensors(self, tensors: dict[str, Tensor], *, assign: bool = False) -> None:
        """Load tensors in the layout written by :meth:`export_tensors` (strict).

        Args:
            tensors: Name to tensor, as in ``model.safetensors``.
            assign: Adopt the given tensors instead of copying into existing ones (used
                when the dictionary was built on the meta device).

        Raises:
            CorruptFileError: a tensor is not floating point (weights must be).
        """
        not_float = {
            name: dtype_name(t.dtype) for name, t in tensors.items() if not t.is_floating_point()
        }
        if not_float:
            raise CorruptFileError(
                f"dictionary weights must be floating point, got {not_float}; convert them "
                f"to float32 (or the config's dtype) before loading"
            )
        self.load_state_dict(tensors, strict=True, assign=assign)

    def expected_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes :meth:`export_tensors` produces, used to validate files before loading."""
        return {name: tuple(t.shape) for name, t in self.export_tensors().items()}

    def with_scale_folded(self) -> Dictionary:
        """A copy that takes raw activations when this one was trained on scaled ones.

        If training inputs were multiplied by ``s_in = provenance.activation_scale`` and
        targets by ``s_out = provenance.output_scale`` (``activation_scale_out``, or
        ``s_in`` for an autoencoder), then ``copy(x) == self(s_in * x) / s_out``, with
        ``W_enc * s_in``, ``W_dec / s_out``, ``b_dec / s_out`` and ``W_skip * s_in / s_out``
        (see :meth:`fold_scales_`). Codes, and so thresholds and TopK selections, are
        unchanged. This is SAELens's folding of ``norm_scaling_factor`` at the end of
        training, with separate input and output factors for transcoders. The copy records
        scales of 1 and keeps the folded factors in ``provenance.extra``
        (``folded_activation_scale``, and ``folded_activation_scale_out`` when different).

        Raises:
            ConfigError: a scale is 0, negative or not finite (folding would write inf or
                sign-flipped weights), or differs between input and output while ``b_dec``
                is applied to the input.
        """
        import copy

        provenance = self.config.provenance
        # Re-checked here: the config is validated when built, but may have been edited.
        check_scale(provenance.activation_scale, "provenance.activation_scale")
        check_scale(provenance.output_scale, "provenance.activation_scale_out")
        scale_in, scale_out = float(provenance.activation_scale), float(provenance.output_scale)
        folded = copy.deepcopy(self)
        if scale_in == 1.0 and scale_out == 1.0:
            return folded
        if self.config.apply_b_dec_to_input and scale_in != scale_out:
            raise ConfigError(
                f"cannot fold input scale {scale_in} and output scale {scale_out}: with "
                f"apply_b_dec_to_input=True, b_dec is used on both sides; set one scale"
            )
        with torch.no_grad():
            folded.fold_scales_(scale_in, scale_out)
        extra = {**provenance.extra, "folded_activation_scale": scale_in}
        if scale_out != scale_in:
            extra["folded_activation_scale_out"] = scale_out
        provenance = dataclasses.replace(
            provenance,
            activation_scale=1.0,
            activation_scale_out=None,
            normalization="folded",
            extra=extra,
        )
        folded.config = self.config.replace(provenance=provenance)
        return folded

    @torch.no_grad()
    def fold_scales_(self, scale_in: float, scale_out: float) -> None:
        """Rescale the weights in place so ``self(x)`` becomes ``old(scale_in * x) / scale_out``.

        Encoder weights take the input scale and everything added to the output the output
        scale. With ``apply_b_dec_to_input`` the two are equal, so ``b_dec / s`` is also the
        right centre for the raw input: ``(s x - b_dec) W_enc = (x - b_dec / s)(s W_enc)``.
        Biases and thresholds in code space are unchanged. An architecture with other input-
        or output-side parameters extends this method.
        """
        self.W_enc.mul_(scale_in)
        self.W_dec.div_(scale_out)
        self.b_dec.div_(scale_out)
        if self.config.skip_connection:
            self.W_skip.mul_(scale_in / scale_out)

    def to_inference(self) -> Dictionary:
        """The form to save for inference (BatchTopK becomes JumpReLU); default: ``self``."""
        return self

    def config_for_save(self) -> DictionaryConfig:
        """The config as it should be written, with the dtype of the actual parameters."""
        return self.config.replace(dtype=dtype_name(self.dtype))

    def save_pretrained(
        self, directory: str | PathLike[str], *, inference_form: bool = True
    ) -> None:
        """Write ``config.json`` and ``model.safetensors`` to ``directory``, atomically.

        Args:
            directory: Target folder; created if missing. Other files in it are left alone.
            inference_form: Save the inference form: BatchTopK as a JumpReLU threshold,
                and an input normalisation scale folded into the weights (see
                :meth:`with_scale_folded`). Pass ``False`` to keep the training form.
        """
        from lightning_interp.dictionaries.serialization import save_dictionary

        dictionary = self.to_inference().with_scale_folded() if inference_form else self
        save_dictionary(dictionary, directory)

    @classmethod
    def from_pretrained(cls, source: str | PathLike[str], **kwargs: Any) -> Dictionary:
        """Load a dictionary; see :func:`lightning_interp.load_dictionary`.

        Called on a subclass, it checks that the loaded dictionary is of that class.
        """
        from lightning_interp.zoo import load_dictionary

        dictionary = load_dictionary(source, **kwargs)
        if not isinstance(dictionary, cls):
            raise ConfigError(
                f"{source} holds a {type(dictionary).__name__} ({dictionary.architecture!r}), "
                f"not a {cls.__name__}; load it with Dictionary.from_pretrained or "
                f"lightning_interp.load_dictionary"
            )
        return dictionary

    def push_to_hub(
        self,
        repo_id: str,
        *,
        site: str | None = None,
        private: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        card_data: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        commit_message: str | None = None,
    ) -> Any:
        """Publish this dictionary (inference form) with a model card, in one commit.

        Args:
            repo_id: Target Hub repo (``org/name``), created if missing.
            site: Repo folder to publish into (default: the repo root); other sites
                already in the repo stay and are listed in the regenerated card.
            private: Create the repo private.
            revision: Branch to commit to (created from ``main`` if missing).
            token: Hub token (default: the logged-in one).
            card_data: Card metadata to set or override (e.g. ``{"license": "mit"}``).
            metrics: Evaluation results (``fvu``, ``l0``, ``dead_fraction``,
                ``ce_loss_recovered``, ``tokens_trained``) for the card.
            commit_message: Commit summary.

        Returns:
            A :class:`~lightning_interp.zoo.publish.PublishResult` (repo, commit sha, URL).
        """
        from lightning_interp.zoo.publish import push_to_hub

        return push_to_hub(
            self,
            repo_id,
            site=site,
            metrics=metrics,
            private=private,
            revision=revision,
            token=token,
            card_data=card_data,
            commit_message=commit_message,
        )

    def extra_repr(self) -> str:
        """Shapes and dtype, shown in ``repr``."""
        return f"d_in={self.d_in}, d_latent={self.d_latent}, d_out={self.d_out}, dtype={self.dtype}"
