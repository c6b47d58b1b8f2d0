"""What a CLT's training forward pass returns, and its reconstruction and AuxK losses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_interp.dictionaries.output import squared_error
from lightning_interp.dictionaries.sparse_ops import SparsePattern, sparse_decode
from lightning_interp.metrics.functional import fraction_of_variance_unexplained

if TYPE_CHECKING:
    from lightning_interp.circuits.clt import CrossLayerTranscoder


class CLTOutput:
    """Reconstructions of every output layer and each source layer's codes.

    Codes are held densely, or (TopK-style sparse training) as a
    :class:`~lightning_interp.dictionaries.sparse_ops.SparsePattern` and its values, as
    :class:`~lightning_interp.dictionaries.output.DictionaryOutput` holds them.

    Attributes:
        reconstruction: ``[N, n_layers, d_out]``, in training units.
        pre_activations: Per source layer, ``[N, d_latent]``.
    """

    def __init__(self, reconstruction: Tensor) -> None:
        self.reconstruction = reconstruction
        self.pre_activations: list[Tensor] = []
        self._codes: list[Tensor | None] = []
        self._sparse: list[tuple[SparsePattern, Tensor] | None] = []

    def add_dense(self, pre: Tensor, codes: Tensor) -> None:
        """Record the next source layer's dense codes."""
        self.pre_activations.append(pre)
        self._codes.append(codes)
        self._sparse.append(None)

    def add_sparse(self, pre: Tensor, pattern: SparsePattern, values: Tensor) -> None:
        """Record the next source layer's active entries and their values."""
        self.pre_activations.append(pre)
        self._codes.append(None)
        self._sparse.append((pattern, values))

    def is_sparse(self, layer: int) -> bool:
        """Whether ``layer`` went through the sparse kernels (its pre-activations: no graph)."""
        return self._sparse[layer] is not None

    def codes(self, layer: int) -> Tensor:
        """Dense codes ``[N, d_latent]`` of ``layer`` (materialised once if sparse)."""
        if self._codes[layer] is None:
            pattern, values = self._sparse[layer]
            self._codes[layer] = pattern.dense(values.reshape(-1))
        return self._codes[layer]

    def active(self, layer: int) -> tuple[Tensor, Tensor]:
        """``(rows, features)`` of the nonzero codes of ``layer``."""
        if self._codes[layer] is not None:
            rows, cols = self._codes[layer].nonzero(as_tuple=True)
            return rows, cols
        pattern, values = self._sparse[layer]
        keep = values.reshape(-1) != 0
        return pattern.rows[keep], pattern.cols[keep]

    def l0(self, layer: int) -> Tensor:
        """Mean active features per row of ``layer``."""
        rows = self.reconstruction.shape[0]
        return torch.tensor(self.active(layer)[0].numel() / max(rows, 1))

    def fired(self, layer: int, width: int) -> Tensor:
        """Boolean ``[width]``: features of ``layer`` active in at least one row."""
        return torch.bincount(self.active(layer)[1], minlength=width) > 0


def reconstruction_terms(
    reconstruction: Tensor, targets: Sequence[Tensor], mode: str
) -> dict[str, Tensor]:
    """The reconstruction loss summed over output layers, and each layer's FVU (logged).

    Args:
        reconstruction: ``[N, n_layers, d_out]`` in float32.
        targets: One ``[N, d_out]`` float32 batch per output layer.
        mode: ``"fvu"``: each layer's squared error over its detached batch variance (a
            normalised MSE, so quiet early layers count as much as loud late ones);
            ``"mse"``: the plain squared error (SAELens/Anthropic convention: summed over
            features, averaged over rows).
    """
    total = reconstruction.new_zeros(())
    terms: dict[str, Tensor] = {}
    for layer, target in enumerate(targets):
        predicted = reconstruction[:, layer]
        error = squared_error(predicted, target)
        if mode == "fvu":
            variance = (target - target.mean(0)).pow(2).sum(-1).mean().detach()
            error = error / variance.clamp_min(1e-12)
        total = total + error
        terms[f"fvu/{layer}"] = fraction_of_variance_unexplained(predicted.detach(), target)
    terms["reconstruction_loss"] = total
    return terms


def auxk_loss(
    clt: CrossLayerTranscoder,
    inputs: Sequence[Tensor],
    out: CLTOutput,
    residual: Tensor,
    dead_masks: Sequence[Tensor],
) -> Tensor:
    """AuxK (Gao et al. 2024) across layers: dead features predict the residual they reach.

    Each source layer's top ``aux_k`` dead pre-activations per row are decoded (through the
    sparse kernels if the layer's step used them) into every layer that source writes; their
    sum predicts the detached residual ``[N, n_layers, d_out]``, normalised by its variance.
    Scaled down, as in sparsify and :class:`~lightning_interp.dictionaries.TopKSAE`, when
    fewer features are dead than AuxK would use.
    """
    cfg = clt.config
    aux_k = cfg.aux_k if cfg.aux_k is not None else max(cfg.d_in // 2, 1)
    predicted = torch.zeros_like(residual)
    used = 0
    for source, x in enumerate(inputs):
        dead_ids = dead_masks[source].nonzero().squeeze(1)
        if dead_ids.numel() == 0:
            continue
        k = min(aux_k, dead_ids.numel())
        pre, w_dec = out.pre_activations[source], clt.W_dec[source]
        w_flat = w_dec.view(w_dec.shape[0], -1)
        if out.is_sparse(source):
            with torch.no_grad():
                local = pre.detach().index_select(-1, dead_ids).topk(k, dim=-1).indices
            pattern = SparsePattern.from_topk(dead_ids[local], pre.shape[-1])
            values = torch.relu(clt._gather(source, x.reshape(-1, x.shape[-1]), pre, pattern))
            decoded = sparse_decode(values, w_flat, pattern)
        else:  # the dense path's pre-activations carry autograd: the same sum, densely
            values, local = pre.index_select(-1, dead_ids).topk(k, dim=-1)
            codes = torch.zeros_like(pre).scatter(-1, dead_ids[local], torch.relu(values))
            decoded = codes.to(w_flat.dtype) @ w_flat
        width = cfg.n_targets(source)
        predicted[:, source : source + width] += decoded.view(-1, width, w_dec.shape[-1]).float()
        used += k
    if used == 0:
        return residual.new_zeros(())
    variance = (residual - residual.mean(0)).pow(2).sum((-2, -1)).mean().clamp_min(1e-8)
    loss = (predicted - residual).pow(2).sum((-2, -1)).mean() / variance
    return min(used / (aux_k * cfg.n_layers), 1.0) * loss
