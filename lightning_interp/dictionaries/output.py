"""What a dictionary's training forward pass returns, and the reconstruction loss on it.

The fraction of variance unexplained is a metric, not a loss: it is defined once, in
:mod:`lightning_interp.metrics.functional`, for the training step and the metric class alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class DictionaryOutput:
    """Everything a training step needs from one forward pass.

    Codes are held densely (``codes``) or, by the sparse TopK-family paths, as a
    :class:`~lightning_interp.dictionaries.sparse_ops.SparsePattern` of active entries
    and their ``values``; ``codes`` then materialises the dense tensor only when asked,
    and :meth:`l0_per_row` / :meth:`fired_latents` answer from the sparse form.

    Attributes:
        reconstruction: The decoded output, ``[N, d_out]``.
        pre_activations: Encoder outputs before the nonlinearity, ``[N, d_latent]``.
        pattern: Active entries (sparse form only).
        values: Their activations: ``[N, k]`` for a fixed ``k`` per row, else ``[nnz]``.
        extras: Architecture-specific tensors (e.g. a Gated SAE's magnitude path).
    """

    def __init__(
        self,
        reconstruction: Tensor,
        codes: Tensor | None = None,
        pre_activations: Tensor | None = None,
        extras: dict[str, Tensor] | None = None,
        *,
        pattern: Any = None,
        values: Tensor | None = None,
    ) -> None:
        if codes is None and (pattern is None or values is None):
            raise ValueError("give dense codes, or a sparse pattern and its values")
        self.reconstruction = reconstruction
        self.pre_activations = pre_activations
        self.pattern = pattern
        self.values = values
        self.extras = extras or {}
        self._codes = codes

    @property
    def indices(self) -> Tensor | None:
        """Active latents ``[N, k]`` when the sparse form has a fixed ``k`` per row."""
        return None if self.pattern is None else self.pattern.indices

    @property
    def codes(self) -> Tensor:
        """Dense codes ``[N, d_latent]`` (materialised once from the sparse form if needed)."""
        if self._codes is None:
            self._codes = self.pattern.dense(self.values)
        return self._codes

    def l0_per_row(self) -> Tensor:
        """Number of active latents in each row, ``[N]``."""
        if self._codes is not None:
            return (self._codes != 0).sum(-1)
        active = self.values.reshape(-1) != 0
        return torch.bincount(self.pattern.rows[active], minlength=self.pattern.num_rows)

    def fired_latents(self) -> Tensor:
        """Boolean ``[d_latent]``: which latents were active in at least one row."""
        if self._codes is not None:
            return (self._codes != 0).reshape(-1, self._codes.shape[-1]).any(0)
        active = self.values.reshape(-1) != 0
        return torch.bincount(self.pattern.cols[active], minlength=self.pattern.d_latent) > 0


def squared_error(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Mean over rows of the squared L2 error, the convention of SAELens and Anthropic."""
    return (reconstruction - target).pow(2).sum(-1).mean()
