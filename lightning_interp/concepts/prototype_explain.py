"""Explanations of part-prototype heads, and the part-prototype evaluation measures.

- :func:`nearest_patches`: each prototype's ``k`` closest training tokens (ProtoPNet's
  ``find_nearest.py``, reference code ``cfchen-duke/ProtoPNet``);
- :func:`similarity_maps`: each prototype's similarity to every token of an input (the
  reference's activation maps of ``local_analysis.py``), on the patch grid if given;
- :func:`consistency_score` and :func:`stability_score`: the measures of Huang et al.,
  "Evaluation and Improvement of Interpretability for Self-Explainable Part-Prototype
  Networks" (ICCV 2023; reference code ``hqhQAQ/EvalProtoPNet``,
  ``util/eval_interpretability.py``).

The two scores need annotated part locations. Per input and part: the token holding the
part, or -1 where the part is absent (the reference reads CUB's part keypoints). A
prototype *corresponds* to a part on an input when the part lies inside the region around
the token where the prototype's similarity peaks: within ``radius`` tokens on the patch
grid (Chebyshev distance; the reference's box of ``half_size`` pixels around the peak of
the upsampled map), or along the sequence without a grid. Only the prototypes of each
input's own class are read, as the reference. Scores are fractions in ``[0, 1]`` (the
reference prints percentages).

- Consistency: a prototype is consistent when some part corresponds to it on at least
  ``threshold`` (0.8) of its class's inputs that show that part; the score is the
  fraction of consistent prototypes (a prototype whose class has no input counts as
  inconsistent, as in the reference).
- Stability: the fraction of inputs on which a prototype's corresponding parts stay the
  same when the input is perturbed, averaged over prototypes. The reference perturbs the
  normalised image (:func:`perturb`: Gaussian noise, std 0.2, clipped to 0.25); the head
  sees embeddings, so pass the embeddings of the perturbed images, or perturb the tokens
  themselves on a scale that suits them (a deviation: the noise is then in embedding
  space, not pixel space).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_interp.concepts.prototype import ProtoPNet, as_tokens
from lightning_interp.errors import ShapeMismatchError


@dataclass
class NearestPatches:
    """The ``k`` nearest training tokens of each prototype.

    Attributes:
        sample: Training row of each match ``[m, k]``.
        patch: Token of each match ``[m, k]``.
        distance: Squared distance ``[m, k]`` (ascending per prototype).
    """

    sample: Tensor
    patch: Tensor
    distance: Tensor


@dataclass(frozen=True)
class PartRegion:
    """Where a prototype "is" on an input, for matching it with annotated parts.

    Attributes:
        radius: Half-width of the region around the peak token, in tokens (0: the peak
            only; the reference's ``half_size`` pixels around the upsampled peak).
        grid: ``(h, w)`` patch grid for square regions (``None``: along the sequence).
        skip: Leading tokens that are not patches (1 for a ViT's class token); part
            positions count patches after them.
    """

    radius: int = 0
    grid: tuple[int, int] | None = None
    skip: int = 0


@torch.no_grad()
def nearest_patches(
    head: ProtoPNet,
    x: Tensor,
    mask: Tensor | None = None,
    k: int = 5,
    y: Tensor | None = None,
    batch_size: int = 256,
) -> NearestPatches:
    """Each prototype's ``k`` closest tokens in ``x`` (of its own class when ``y`` is given).

    Args:
        head: A ProtoPNet head.
        x: Tokens ``[n, patches, d_in]`` (or pooled ``[n, d_in]``).
        mask: Token mask ``[n, patches]`` (True at real tokens).
        k: Matches per prototype.
        y: Labels ``[n]``: only tokens of inputs of the prototype's class count.
        batch_size: Inputs per forward pass.
    """
    tokens, mask = as_tokens(head, x, mask)
    width = tokens.shape[1]
    chunks = []
    for start in range(0, len(tokens), batch_size):
        rows = slice(start, start + batch_size)
        distances = head.patch_distances(tokens[rows], None if mask is None else mask[rows])
        if y is not None:
            own = head.prototype_class[None, :, None] == y[rows].to(distances.device)[:, None, None]
            distances = distances.masked_fill(~own, float("inf"))
        chunks.append(distances.transpose(0, 1).flatten(1).cpu())  # [m, rows * patches]
    flat = torch.cat(chunks, dim=1)
    distance, index = flat.topk(min(k, flat.shape[1]), dim=1, largest=False)
    return NearestPatches(index // width, index % width, distance)


@torch.no_grad()
def similarity_maps(
    head: ProtoPNet,
    x: Tensor,
    mask: Tensor | None = None,
    grid: tuple[int, int] | None = None,
    skip: int = 0,
) -> Tensor:
    """Each prototype's similarity to every token ``[b, m, patches]``, or ``[b, m, h, w]``.

    Args:
        head: A ProtoPNet head.
        x: Tokens ``[b, patches, d_in]``.
        mask: Token mask (padding tokens get the similarity of an infinite distance).
        grid: ``(h, w)`` of the patch grid: the maps are reshaped onto it.
        skip: Leading tokens that are not patches (1 for a ViT's class token).
    """
    maps = head(x, mask=mask).attention[:, :, skip:]
    if grid is None:
        return maps
    if grid[0] * grid[1] != maps.shape[-1]:
        raise ShapeMismatchError(
            f"grid {grid} holds {grid[0] * grid[1]} patches but the input has "
            f"{maps.shape[-1]} after skipping {skip}; pass the encoder's patch grid "
            f"(and skip=1 for a class token)"
        )
    return maps.unflatten(-1, grid)


def _peaks(head: ProtoPNet, x: Tensor, mask: Tensor | None) -> Tensor:
    """The token where each prototype's similarity peaks ``[n, m]`` (first of ties)."""
    with torch.no_grad():
        return head.patch_distances(x, mask).argmin(-1).cpu()


def part_correspondence(
    peaks: Tensor, parts: Tensor, radius: int = 0, grid: tuple[int, int] | None = None
) -> Tensor:
    """``[n, m, parts]``: whether each part lies in the region around each prototype's peak.

    Args:
        peaks: Peak token per input and prototype ``[n, m]`` (patch positions).
        parts: Token of each part per input ``[n, parts]`` (-1: absent).
        radius: Half-width of the region in tokens (0: the peak token only).
        grid: ``(h, w)`` patch grid for 2-D regions (``None``: along the sequence).
    """
    present = parts[:, None, :] >= 0
    if grid is None:
        near = (peaks[:, :, None] - parts[:, None, :]).abs() <= radius
    else:
        w = grid[1]
        rows = (peaks[:, :, None] // w - parts[:, None, :] // w).abs()
        cols = (peaks[:, :, None] % w - parts[:, None, :] % w).abs()
        near = torch.maximum(rows, cols) <= radius
    return near & present


def _own_class_correspondence(
    head: ProtoPNet, x: Tensor, y: Tensor, parts: Tensor, mask: Tensor | None, region: PartRegion
) -> tuple[Tensor, Tensor]:
    """Correspondence ``[n, m, parts]`` and ``own`` ``[n, m]`` (prototype of the input's class)."""
    if parts.ndim != 2 or parts.shape[0] != x.shape[0]:
        raise ShapeMismatchError(
            f"parts must be [inputs, parts] = [{x.shape[0]}, k] token positions (-1: absent), "
            f"got {tuple(parts.shape)}"
        )
    peaks = _peaks(head, x, mask) - region.skip
    corresponds = part_correspondence(peaks, parts.cpu(), region.radius, region.grid)
    own = head.prototype_class.cpu()[None, :] == y.cpu()[:, None]
    return corresponds, own


def consistency_score(
    head: ProtoPNet,
    x: Tensor,
    y: Tensor,
    parts: Tensor,
    *,
    mask: Tensor | None = None,
    region: PartRegion = PartRegion(),
    threshold: float = 0.8,
) -> float:
    """Fraction of prototypes that keep to one part across their class's inputs.

    See the module docstring.

    Args:
        head: A ProtoPNet head.
        x: Tokens ``[n, patches, d_in]``.
        y: Labels ``[n]``.
        parts: Part positions ``[n, parts]`` (patch index after ``region.skip``; -1: absent).
        mask: Token mask.
        region: The region around a prototype's peak that a part must fall in.
        threshold: Share of a class's inputs showing a part on which the part must match.
    """
    corresponds, own = _own_class_correspondence(head, x, y, parts, mask, region)
    shown = (parts.cpu() >= 0).float()  # [n, parts]
    consistent = []
    for j in range(head.num_concepts):
        rows = own[:, j]
        hits = corresponds[rows, j].float().sum(0)  # [parts]
        visible = shown[rows].sum(0).clamp_min(1)  # the reference's zero-denominator guard
        consistent.append(bool(rows.any()) and bool((hits / visible >= threshold).any()))
    return float(torch.tensor(consistent, dtype=torch.float).mean())


def stability_score(
    head: ProtoPNet,
    x: Tensor,
    x_perturbed: Tensor,
    y: Tensor,
    parts: Tensor,
    *,
    mask: Tensor | None = None,
    region: PartRegion = PartRegion(),
) -> float:
    """Fraction of inputs on which each prototype's parts survive a perturbation (mean).

    Args:
        head: A ProtoPNet head.
        x: Tokens of the clean inputs.
        x_perturbed: Tokens of the same inputs, perturbed (e.g. embeddings of
            :func:`perturb`-ed images).
        y: Labels.
        parts: Part positions ``[n, parts]`` (-1: absent).
        mask: Token mask (the same for both).
        region: The region around a prototype's peak that a part must fall in.
    """
    if x_perturbed.shape != x.shape:
        raise ShapeMismatchError(
            f"x_perturbed must have the shape of x {tuple(x.shape)}, got {tuple(x_perturbed.shape)}"
        )
    clean, own = _own_class_correspondence(head, x, y, parts, mask, region)
    noisy, _ = _own_class_correspondence(head, x_perturbed, y, parts, mask, region)
    same = (clean == noisy).all(-1)  # [n, m]
    per_prototype = [same[own[:, j], j].float().mean() for j in range(head.num_concepts)]
    kept = [v for v in per_prototype if not torch.isnan(v)]
    return float(torch.stack(kept).mean()) if kept else float("nan")


def perturb(
    x: Tensor, std: float = 0.2, clip: float = 0.25, generator: torch.Generator | None = None
) -> Tensor:
    """``x`` plus Gaussian noise (``std``) clipped to ``[-clip, clip]``, as ``perturb_img``."""
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32) * std
    return x + noise.clamp(-clip, clip).to(x)
