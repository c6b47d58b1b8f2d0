"""Codebook features (Tamkin, Taufeeque and Goodman 2023): the sum of k codes chosen by cosine.

"Codebook Features: Sparse and Discrete Interpretability for Neural Networks"
(arXiv:2310.17230) replaces a hidden state ``a`` by the sum of the ``k`` codebook vectors
with the highest cosine similarity to it. Reference code: github.com/taufeeque9/
codebook-features, ``codebook_features/models.py`` (``CodebookLayer``,
``InnerProductSnapFunction``, ``BaseSnapFunction.backward``). What it does, and where this
module differs on purpose:

- Selection: top-``k`` of ``a . c_i / (|a| |c_i|)`` (the reference divides by the code norms
  and, optionally, the input norm, which does not change a row's ranking). Here the codes
  are compared with the input centred on ``b_dec``; the reference applies a LayerNorm with
  learned affine parameters first and writes its output in the normalised space, which
  works there because the whole network is finetuned around it. This dictionary reconstructs
  the raw activation (or predicts another site) so a frozen backbone can use it.
- Output: the *sum* of the chosen codes (the paper's definition), plus ``b_dec``. The
  reference divides the sum by ``k`` (a mean), which only rescales every code by ``k``.
  Codes are therefore ``1.0`` at the ``k`` chosen latents and ``0`` elsewhere, so
  ``decode(codes) = sum of the chosen rows of W_dec + b_dec`` and ``L0 == k`` on every row.
- Keys and codes: the paper's codebook is one matrix, compared with the input and summed
  into the output. So is this one's for an autoencoder (``d_out`` unset): ``W_dec``'s rows
  are both, and there is no ``W_enc``. A transcoder (``d_out`` given) reads one site and
  writes another, where one matrix cannot serve both, so it compares the input with the
  columns of a separate ``W_enc [d_in, d_latent]`` (the keys) and sums ``W_dec``'s rows.
- Gradients: in the reference, the codes receive the output's gradient (they are embedding
  rows), the input gets the output's gradient unchanged (straight-through), and the
  discrete choice gets none; the straight-through input gradient moves the finetuned
  network's hidden states towards codes that serve it. With a frozen backbone nothing
  upstream learns, so here (``straight_through=True``, the default) the keys learn through
  the coefficients instead: each chosen code enters as ``1 + s - stop_gradient(s)`` (``s``
  its cosine similarity), exactly 1 in the forward pass with ``d coefficient / d s = 1``
  backwards, so a chosen key is pulled towards inputs whose residual its code reduces and
  pushed away where it overshoots, as a TopK encoder column is. On the planted-dictionary
  test this keeps codes alive: 6% dead and a mean max cosine of 0.96, against 34% dead and
  0.81 with ``straight_through=False`` (the reference's gradients, no selection gradient).
- Code magnitudes: the reference's codes are free vectors (weight decay 0.01 in its
  config), so ``normalize_decoder`` defaults to ``False`` here; with unit coefficients the
  code norms carry the scale of the activations, and they start at it: the first batch,
  which sets ``b_dec``, also sets every code's norm (see :meth:`CodebookSAE.initialize_b_dec_`;
  the reference's N(0, 1) codes meet LayerNorm-ed inputs, the same idea). Free codes also
  recover the planted dictionary better than unit ones (mean max cosine 0.98 at FVU 0.33,
  against 0.96 at 0.45); the registered example uses unit codes because the recovery test
  checks the unit-norm constraint.
- Left out: the reference's optional k-means initialisation and dead-code replacement
  (``replace_after_steps``, off in its default config; replacing rows with a rank's own
  inputs would also desynchronise DDP replicas), its faiss search and its inference-time
  code-blocking hooks (use :func:`lightning_interp.backbones.steer` to edit codes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_interp.dictionaries.base import Dictionary, DictionaryOutput
from lightning_interp.dictionaries.config import DictionaryConfig, check_k
from lightning_interp.dictionaries.cpu_topk import topk_indices
from lightning_interp.dictionaries.registry import register_dictionary
from lightning_interp.dictionaries.sparse_codes import SparseCodes
from lightning_interp.dictionaries.sparse_ops import SparsePattern, gather_encoder, sparse_decode


@dataclass(kw_only=True)
class CodebookConfig(DictionaryConfig):
    """Config of a codebook-features dictionary.

    Attributes:
        k: Codes summed per row (``k_codebook`` in the reference; it uses 8 on language
            models).
        normalize_decoder: Keep codes at unit norm. Off by default: the codes' norms are
            what scales the output, since every chosen code enters with coefficient 1.
        straight_through: Let the keys learn through the chosen codes' unit coefficients
            (see the module docstring); ``False`` gives the reference's gradients, where
            the choice itself gets none (a transcoder's separate keys then never train).
    """

    k: int
    normalize_decoder: bool = False
    straight_through: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_k(self.k, self.d_latent)


def unit_coefficients(similarity: Tensor, straight_through: bool) -> Tensor:
    """Exactly 1 in the forward pass; with ``straight_through``, the gradient of ``similarity``.

    ``s - s.detach()`` is exactly zero in floating point, so the value is exactly 1.
    """
    if not straight_through:
        return torch.ones_like(similarity.detach())
    return similarity - similarity.detach() + 1


# Every row sums exactly k unit-coefficient codes: rows with fewer or more planted features
# than k cannot be matched (about 3 on average, spread like a Poisson), hence the loose FVU.
@register_dictionary(
    "codebook", example_kwargs={"k": 3, "normalize_decoder": True}, recovery_fvu=0.5
)
class CodebookSAE(Dictionary):
    """Codebook features: output the sum of the ``k`` codes most cosine-similar to the input.

    ``s_i = cos(x - b_dec, key_i)`` for every latent ``i``, the key being the code
    ``W_dec[i]`` itself (an autoencoder) or ``W_enc[:, i]`` (a transcoder); the ``k``
    largest are chosen and ``x_hat = sum_{chosen i} W_dec[i] + b_dec``. See the module
    docstring for the paper, the reference code and the deliberate differences.

    Example:
        >>> from lightning_interp import create_dictionary
        >>> codebook = create_dictionary("codebook", d_in=8, d_latent=32, k=2)
        >>> x = torch.randn(4, 8)
        >>> codes = codebook.encode(x)
        >>> sorted(set(codes.flatten().tolist())), (codes != 0).sum(-1).tolist()
        ([0.0, 1.0], [2, 2, 2, 2])
        >>> hasattr(codebook, "W_enc")  # one matrix: the codes are their own keys
        False
    """

    config_class = CodebookConfig
    config: CodebookConfig
    # Cosine similarity has no bias: the keys are directions.
    has_encoder_bias = False

    def __init__(self, config: CodebookConfig) -> None:
        super().__init__(config)
        if self.keys_are_codes:
            del self.W_enc  # allocated by the base class; the codes are the keys
        #: Train through the sparse kernels (same results as the dense path, far fewer
        #: FLOPs). Set to False to use plain dense autograd, e.g. to compare the two.
        self.sparse_training = True

    @property
    def keys_are_codes(self) -> bool:
        """True for an autoencoder: one codebook ``W_dec``, compared and summed."""
        return self.config.d_out is None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random unit-norm codes; a transcoder's keys random too; zero biases and skip."""
        codes = torch.randn(self.W_dec.shape)
        self.W_dec.copy_(codes / codes.norm(dim=1, keepdim=True))
        if not self.keys_are_codes:
            self.W_enc.copy_(torch.randn(self.W_enc.shape) / self.d_in**0.5)
        self.b_dec.zero_()
        if self.config.skip_connection:
            self.W_skip.zero_()

    @torch.no_grad()
    def fold_scales_(self, scale_in: float, scale_out: float) -> None:
        """As the base class; keys, compared by cosine, need no input scale."""
        if not self.keys_are_codes:
            super().fold_scales_(scale_in, scale_out)
            return
        self.W_dec.div_(scale_out)
        self.b_dec.div_(scale_out)
        if self.config.skip_connection:
            self.W_skip.mul_(scale_in / scale_out)

    @torch.no_grad()
    def initialize_b_dec_(self, sample: Tensor, method: str | None = None) -> None:
        """Set ``b_dec`` as the base class does, then scale free codes to the data.

        With unit coefficients nothing but the code norms can match the activations' scale,
        and Adam grows a norm by at most about ``lr * sqrt(d)`` a step: unit codes would take
        thousands of steps to reach a residual stream's norm. So unless
        ``normalize_decoder``, every code is rescaled to ``median_n |y_n - b_dec| / sqrt(k)``,
        the norm at which ``k`` near-orthogonal codes sum to a typical centred row (the
        reference starts from N(0, 1) codes on LayerNorm-ed inputs, the same idea). Under
        DDP the ranks average their scales, so replicas stay identical.
        """
        super().initialize_b_dec_(sample, method)
        if self.config.normalize_decoder:
            return
        rows = sample.detach().reshape(-1, sample.shape[-1]).float()
        scale = (rows - self.b_dec.float()).norm(dim=-1).median() / self.config.k**0.5
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(scale)
            scale /= torch.distributed.get_world_size()
        norms = self.decoder_norms().clamp_min(1e-8)[:, None]
        self.W_dec.mul_((scale.clamp_min(1e-8) / norms).to(self.W_dec.dtype))

    def _unit_input(self, x: Tensor) -> Tensor:
        """The centred input rows, scaled to unit norm, ``[N, d_in]`` (differentiable)."""
        x = self._prepare_input(x)
        return F.normalize(self.encoder_input(x).reshape(-1, self.d_in), dim=-1)

    def _unit_keys(self) -> Tensor:
        """Keys scaled to unit norm, ``[d_in, d_latent]`` (differentiable)."""
        if self.keys_are_codes:
            return F.normalize(self.W_dec, dim=1).T
        return F.normalize(self.W_enc, dim=0)

    def encode_pre(self, x: Tensor) -> Tensor:
        """Cosine similarity of the (centred) input to every key, ``[..., d_latent]``."""
        similarity = self._unit_input(x) @ self._unit_keys()
        return similarity.view(*x.shape[:-1], self.d_latent)

    def activation(self, pre: Tensor) -> Tensor:
        """1 at the ``k`` most similar codes of each row, 0 elsewhere."""
        indices = pre.topk(self.config.k, dim=-1).indices
        ones = unit_coefficients(pre.gather(-1, indices), self.config.straight_through)
        return torch.zeros_like(pre).scatter(-1, indices, ones)

    def encode_sparse_chunk(self, x: Tensor) -> SparseCodes:
        """The ``k`` chosen codes of each row with coefficient 1: no dense codes."""
        indices = self.encode_pre(x).topk(self.config.k, dim=-1, sorted=False).indices
        ones = torch.ones(indices.shape, dtype=self.dtype, device=indices.device)
        return SparseCodes.from_topk(ones, indices, self.d_latent)

    def forward_train(self, x: Tensor) -> DictionaryOutput:
        """Training forward pass on ``[N, d_in]``; sparse unless ``sparse_training`` is off.

        The sparse path selects without autograd, then differentiates only the ``k`` chosen
        similarities and codes of each row, as TopK's sparse path does.
        """
        if not (self.sparse_training and torch.is_grad_enabled()):
            return super().forward_train(x)
        with torch.no_grad():
            pre = self.encode_pre(x).reshape(-1, self.d_latent)
            indices = topk_indices(pre, self.config.k)  # ascending (cpu_topk.py)
            pattern = SparsePattern.from_topk(indices, self.d_latent, presorted=True)
        if self.config.straight_through:
            similarity = gather_encoder(
                self._unit_input(x), None, self._unit_keys(), pre.new_zeros(()), pre, pattern
            )
        else:
            similarity = pattern.gather(pre)
        ones = unit_coefficients(similarity, self.config.straight_through)
        decoded = sparse_decode(ones, self.W_dec, pattern) + self.b_dec
        return DictionaryOutput(
            self.with_skip(x, decoded),
            pre_activations=pre,
            pattern=pattern,
            values=ones.view(-1, self.config.k),
        )
