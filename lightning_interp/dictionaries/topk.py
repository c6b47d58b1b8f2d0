"""TopK (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024) sparse autoencoders."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_interp.dictionaries.base import Dictionary, DictionaryOutput
from lightning_interp.dictionaries.config import (
    DictionaryConfig,
    Provenance,
    check_k,
    check_non_negative,
)
from lightning_interp.dictionaries.cpu_batch_topk import batch_topk_positions
from lightning_interp.dictionaries.cpu_topk import topk_indices
from lightning_interp.dictionaries.registry import register_dictionary
from lightning_interp.dictionaries.sparse_codes import SparseCodes
from lightning_interp.dictionaries.sparse_ops import (
    SparsePattern,
    gather_encoder,
    sparse_decode,
    top_positive,
)
from lightning_interp.dictionaries.workspace import ReusedBuffer, encoder_gemm
from lightning_interp.errors import ConfigError


@dataclass(kw_only=True)
class TopKConfig(DictionaryConfig):
    """Config of a TopK SAE.

    Attributes:
        k: Active latents per row.
        aux_k: Dead latents used by the AuxK loss; ``None`` means ``d_in // 2`` (Gao et al.).
        aux_coefficient: Weight of the AuxK loss (1/32 in Gao et al.).
    """

    k: int
    aux_k: int | None = None
    aux_coefficient: float = 1 / 32

    def __post_init__(self) -> None:
        super().__post_init__()
        check_k(self.k, self.d_latent)
        if self.aux_k is not None:
            check_k(self.aux_k, self.d_latent, "aux_k")
        check_non_negative(self.aux_coefficient, "aux_coefficient")

    @property
    def effective_aux_k(self) -> int:
        """``aux_k``, or its default of half the input width (at most ``d_latent``)."""
        return self.aux_k if self.aux_k is not None else min(max(self.d_in // 2, 1), self.d_latent)


def keep_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the ``k`` largest pre-activations per row, then ReLU.

    Returns:
        ``(codes, indices, values)``: dense codes ``[N, F]`` and the selected
        ``indices``/``values`` ``[N, k]`` (values after the ReLU).
    """
    values, indices = pre.topk(k, dim=-1, sorted=False)
    values = torch.relu(values)
    codes = torch.zeros_like(pre).scatter_(-1, indices, values)
    return codes, indices, values


class _TopKFamily(Dictionary):
    """Shared AuxK loss and sparse-path plumbing of TopK-style dictionaries."""

    config: TopKConfig

    def __init__(self, config: TopKConfig) -> None:
        super().__init__(config)
        #: Train through the sparse kernels (same results as the dense path, far fewer
        #: FLOPs). Set to False to use plain dense autograd, e.g. to compare the two.
        self.sparse_training = True

        # The pre-activations' memory, reused from step to step (workspace.py says why).
        self._pre_buffer = ReusedBuffer()

    def _use_sparse_path(self) -> bool:
        return self.sparse_training and torch.is_grad_enabled()

    def _training_gemm(self, x: Tensor, *, add_bias: bool = False) -> Tensor:
        """``[N, d_latent]`` encoder GEMM of the training input, in the reused buffer.

        Without ``b_enc`` unless ``add_bias`` (TopK's kernel adds it during its selection).
        """
        flat = self.encoder_input(self._prepare_input(x)).reshape(-1, self.d_in)
        pre = encoder_gemm(flat, self.W_enc, self._pre_buffer)
        return pre.add_(self.b_enc.to(pre.dtype)) if add_bias else pre

    def _sparse_forward(
        self, x: Tensor, pre: Tensor, pattern: SparsePattern
    ) -> tuple[Tensor, Tensor]:
        """Codes at ``pattern`` (ReLU'd) and the reconstruction, through the sparse kernels."""
        values = torch.relu(self._gather_encoder(x, pre, pattern))
        return values, self.with_skip(x, sparse_decode(values, self.W_dec, pattern) + self.b_dec)

    def sparsity_losses(
        self,
        x: Tensor,
        out: DictionaryOutput,
        *,
        target: Tensor,
        sparsity_scale: float,
        dead_mask: Tensor | None,
    ) -> dict[str, Tensor]:
        """AuxK: the top ``aux_k`` dead latents predict the residual (Gao et al. 2024)."""
        zero = out.reconstruction.new_zeros((), dtype=torch.float32)
        if dead_mask is None or self.config.aux_coefficient == 0:
            return {"auxk_loss": zero}
        num_dead = int(dead_mask.sum())
        if num_dead == 0:
            return {"auxk_loss": zero}
        aux_k = min(self.config.effective_aux_k, num_dead)
        residual = (target - out.reconstruction).detach()
        predicted = self._predict_residual(x, out, dead_mask, aux_k)
        variance = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
        auxk = (predicted - residual).pow(2).sum(-1).mean() / variance
        # Fewer dead latents than aux_k means a weaker signal; scale as sparsify does.
        scale = min(num_dead / self.config.effective_aux_k, 1.0)
        return {"auxk_loss": self.config.aux_coefficient * scale * auxk}

    def _predict_residual(
        self, x: Tensor, out: DictionaryOutput, dead_mask: Tensor, aux_k: int
    ) -> Tensor:
        # Decoded without b_dec: the residual is already centred by the main path.
        if out.pattern is None:
            dead_pre = out.pre_activations.masked_fill(~dead_mask, float("-inf"))
            values, indices = dead_pre.topk(aux_k, dim=-1, sorted=False)
            codes = torch.zeros_like(out.pre_activations).scatter_(-1, indices, torch.relu(values))
            return codes @ self.W_dec
        with torch.no_grad():
            dead_ids = dead_mask.nonzero().squeeze(1)
            # Only the positive ones: the rest are zero after the ReLU, gradient included.
            pattern = top_positive(out.pre_activations, dead_ids, aux_k)
        values = torch.relu(self._gather_encoder(x, out.pre_activations, pattern))
        return sparse_decode(values, self.W_dec, pattern)

    def _gather_encoder(self, x: Tensor, pre: Tensor, pattern: SparsePattern) -> Tensor:
        x = self._prepare_input(x).reshape(-1, self.d_in)
        b_dec = self.b_dec if self.config.apply_b_dec_to_input else None
        return gather_encoder(x, b_dec, self.W_enc, self.b_enc, pre, pattern)


# A fixed k cannot fit the rows with more active features than k: a looser FVU bound.
@register_dictionary("topk", example_kwargs={"k": 4}, recovery_fvu=0.15)
class TopKSAE(_TopKFamily):
    """TopK SAE: the ``k`` largest pre-activations survive (then ReLU), the rest are zero."""

    config_class = TopKConfig

    def activation(self, pre: Tensor) -> Tensor:
        """Per-row top-k then ReLU."""
        return keep_topk(pre, self.config.k)[0]

    def encode_sparse_chunk(self, x: Tensor) -> SparseCodes:
        """The ``k`` entries of each row straight from ``topk``: no dense codes."""
        values, indices = self.encode_pre(x).topk(self.config.k, dim=-1, sorted=False)
        return SparseCodes.from_topk(values, indices, self.d_latent)

    def forward_train(self, x: Tensor) -> DictionaryOutput:
        """Training forward pass on ``[N, d_in]``; sparse unless ``sparse_training`` is off.

        The sparse path returns codes as ``indices``/``values`` and only materialises the
        dense codes if asked; gradients reach only the ``k`` selected latents per row.
        """
        if not self._use_sparse_path():
            pre = self.encode_pre(x)
            codes, _, _ = keep_topk(pre, self.config.k)
            return DictionaryOutput(self.with_skip(x, self.decode(codes)), codes, pre)
        with torch.no_grad():
            pre = self._training_gemm(x)
            indices = topk_indices(pre, self.config.k, bias=self.b_enc)  # adds b_enc to pre
            pattern = SparsePattern.from_topk(indices, self.d_latent, presorted=True)
        values, reconstruction = self._sparse_forward(x, pre, pattern)
        values = values.view(-1, self.config.k)
        return DictionaryOutput(reconstruction, pre_activations=pre, pattern=pattern, values=values)


@dataclass(kw_only=True)
class BatchTopKConfig(TopKConfig):
    """Config of a BatchTopK SAE.

    Attributes:
        threshold_momentum: EMA momentum of the inference threshold, estimated during
            training as the smallest selected activation of each batch.
    """

    threshold_momentum: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.threshold_momentum < 1.0:
            raise ConfigError(
                f"threshold_momentum must be in [0, 1), got {self.threshold_momentum!r}"
            )


def batch_topk(pre: Tensor, k: int) -> Tensor:
    """Keep the ``k * N`` largest ReLU'd pre-activations across the whole ``[N, F]`` batch."""
    acts = torch.relu(pre)
    flat = acts.flatten()
    values, indices = flat.topk(min(k * pre.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter_(0, indices, values).view_as(pre)


@register_dictionary("batchtopk", example_kwargs={"k": 3}, recovery_fvu=0.12)
class BatchTopKSAE(_TopKFamily):
    """BatchTopK SAE: ``k * batch`` latents are active across a batch, not ``k`` per row.

    Training selects across the batch; a single threshold (the EMA of the smallest
    selected activation) replaces the batch dependence at inference, and
    :meth:`to_inference` exports a :class:`~lightning_interp.dictionaries.JumpReLUSAE`
    with that threshold.
    """

    config_class = BatchTopKConfig
    config: BatchTopKConfig

    def __init__(self, config: BatchTopKConfig) -> None:
        super().__init__(config)
        # -1 marks "not yet estimated": encode falls back to batch selection until then.
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32))

    def activation(self, pre: Tensor) -> Tensor:
        """JumpReLU at the learned threshold, or batch top-k before one is estimated."""
        if self.threshold < 0:
            return batch_topk(pre, self.config.k)
        return pre * (pre > self.threshold.to(pre.dtype))

    def forward_train(self, x: Tensor) -> DictionaryOutput:
        """Batch-level top-k; updates the threshold estimate when in training mode.

        Sparse unless ``sparse_training`` is off: rows then hold different numbers of
        active latents, which the sparse pattern carries as CSR row offsets.
        """
        if not self._use_sparse_path():
            pre = self.encode_pre(x).reshape(-1, self.d_latent)
            codes = batch_topk(pre, self.config.k)
            if self.training:
                self._update_threshold(codes)
            return DictionaryOutput(self.with_skip(x, self.decode(codes)), codes, pre)
        with torch.no_grad():
            pre = self._training_gemm(x, add_bias=True)
            count = min(self.config.k * pre.shape[0], pre.numel())
            flat = batch_topk_positions(pre, count)  # the CPU kernel (cpu_batch_topk.py)
            if flat is None:
                flat = torch.relu(pre).flatten().topk(count, sorted=False).indices.sort().values
            pattern = SparsePattern.from_flat(flat, pre.shape[0], self.d_latent, presorted=True)
        values, reconstruction = self._sparse_forward(x, pre, pattern)
        if self.training:
            self._update_threshold(values)
        return DictionaryOutput(reconstruction, pre_activations=pre, pattern=pattern, values=values)

    @torch.no_grad()
    def _update_threshold(self, codes: Tensor) -> None:
        active = codes[codes > 0]
        if active.numel() == 0:
            return
        smallest = active.min().float()
        if self.threshold < 0:
            self.threshold.copy_(smallest)
        else:
            m = self.config.threshold_momentum
            self.threshold.mul_(m).add_((1 - m) * smallest)

    def to_inference(self) -> Dictionary:
        """A JumpReLU SAE with this dictionary's weights and its threshold on every latent."""
        from lightning_interp.dictionaries.jumprelu import JumpReLUConfig, JumpReLUSAE

        # A tensor comparison: Feature Choice (choice.py) keeps one threshold per latent.
        if bool((self.threshold < 0).any()):
            raise ConfigError(
                "this BatchTopK dictionary has no threshold estimate yet (it has not "
                "trained); train it first or save with inference_form=False"
            )
        cfg = self.config
        provenance = Provenance(**{**vars(cfg.provenance), "trained_as": self.architecture})
        provenance.extra = {**provenance.extra, "k": cfg.k}
        jump = JumpReLUSAE(
            JumpReLUConfig(
                d_in=cfg.d_in,
                d_latent=cfg.d_latent,
                d_out=cfg.d_out,
                dtype=cfg.dtype,
                normalize_decoder=cfg.normalize_decoder,
                apply_b_dec_to_input=cfg.apply_b_dec_to_input,
                skip_connection=cfg.skip_connection,
                b_dec_init=cfg.b_dec_init,
                initial_threshold=max(float(self.threshold.min()), 1e-12),
                provenance=provenance,
            )
        ).to(device=self.device, dtype=self.dtype)
        # Training-only state (the threshold estimate; choice.py's densities) has no slot.
        wanted = jump.export_tensors().keys() - {"threshold"}
        weights = {k: v for k, v in self.export_tensors().items() if k in wanted}
        weights["threshold"] = self.threshold.float().expand(cfg.d_latent).clone()
        jump.import_tensors(weights)
        return jump
