"""Sparse inference codes: the active latents of each row, not a dense ``[N, d_latent]`` tensor.

Analysis (feature stores, dashboards, attribution) reads many tokens through wide
dictionaries: 8,192 tokens at 9,216 latents are 300 MB of dense float32 codes, almost all
zeros. :meth:`Dictionary.encode_sparse` returns :class:`SparseCodes` instead, whose size
grows with the number of active latents. Rows are encoded in chunks, so only one chunk's
dense pre-activations exist at a time (the encoder's matmul needs them anyway).

Rows are padded to the widest row of the batch: TopK rows all have ``k`` entries, JumpReLU
and ReLU rows vary, so their padding is marked by index ``-1`` and value ``0``. Entries of
a row are sorted by decreasing activation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_interp.errors import ShapeMismatchError

#: Index of a padding entry (its value is 0).
PAD_INDEX = -1


@dataclass(frozen=True)
class SparseCodes:
    """Active latents per row, padded to the widest row.

    Attributes:
        values: ``[N, m]`` activations, sorted descending within a row; 0 at padding.
        indices: ``[N, m]`` latent ids (int64); :data:`PAD_INDEX` at padding.
        d_latent: Number of latents of the dictionary that produced them.
    """

    values: Tensor
    indices: Tensor
    d_latent: int

    def __post_init__(self) -> None:
        if self.values.shape != self.indices.shape or self.values.ndim != 2:
            raise ShapeMismatchError(
                f"values and indices must both be [N, m], got {tuple(self.values.shape)} "
                f"and {tuple(self.indices.shape)}"
            )

    @property
    def num_rows(self) -> int:
        """Number of rows ``N``."""
        return self.values.shape[0]

    @property
    def mask(self) -> Tensor:
        """``[N, m]`` bool, True at real (non-padding) entries."""
        return self.indices != PAD_INDEX

    def counts(self) -> Tensor:
        """Active latents per row (the row's L0), ``[N]``."""
        return self.mask.sum(-1)

    def coo(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(rows, latents, values)`` of every active entry, in row order."""
        keep = self.mask
        rows = torch.arange(self.num_rows, device=self.values.device)[:, None].expand_as(keep)
        return rows[keep], self.indices[keep], self.values[keep]

    def to_dense(self) -> Tensor:
        """The dense ``[N, d_latent]`` codes (for checks and small batches)."""
        dense = self.values.new_zeros(self.num_rows, self.d_latent)
        rows, latents, values = self.coo()
        dense[rows, latents] = values
        return dense

    @classmethod
    def from_dense(cls, codes: Tensor) -> SparseCodes:
        """Sparse form of dense ``[..., d_latent]`` codes (leading dims flattened).

        Example:
            >>> codes = torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
            >>> sparse = SparseCodes.from_dense(codes)
            >>> sparse.indices.tolist(), sparse.values.tolist()
            ([[1, 3], [-1, -1]], [[2.0, 1.0], [0.0, 0.0]])
        """
        flat = codes.reshape(-1, codes.shape[-1])
        width = int((flat != 0).sum(-1).max()) if flat.numel() else 0
        # topk on |codes| puts every non-zero first (sorted by size); the rest is padding.
        magnitude, indices = flat.abs().topk(width, dim=-1, sorted=True)
        values = flat.gather(-1, indices)
        padding = magnitude == 0
        return cls(
            values.masked_fill(padding, 0.0),
            indices.masked_fill(padding, PAD_INDEX),
            codes.shape[-1],
        )

    @classmethod
    def empty(cls, d_latent: int, device: torch.device | str | None = None) -> SparseCodes:
        """Codes of zero rows."""
        values = torch.zeros(0, 0, device=device)
        return cls(values, values.long(), d_latent)

    @classmethod
    def from_topk(cls, values: Tensor, indices: Tensor, d_latent: int) -> SparseCodes:
        """From per-row ``topk`` of pre-activations ``[N, k]``, ReLU applied here.

        Sorts each row by value and marks entries the ReLU zeroed as padding, so TopK
        dictionaries never build the dense ``[N, d_latent]`` codes.
        """
        values, order = torch.relu(values).sort(dim=-1, descending=True)
        indices = indices.gather(-1, order)
        padding = values == 0
        return cls(values, indices.masked_fill(padding, PAD_INDEX), d_latent)

    @classmethod
    def cat(cls, parts: Sequence[SparseCodes]) -> SparseCodes:
        """Rows of several batches, padded to the widest."""
        if not parts:
            raise ShapeMismatchError("SparseCodes.cat needs at least one part")
        width = max(p.values.shape[1] for p in parts)

        def pad(t: Tensor, fill: float) -> Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)

        return cls(
            torch.cat([pad(p.values, 0.0) for p in parts]),
            torch.cat([pad(p.indices, PAD_INDEX) for p in parts]),
            parts[0].d_latent,
        )
