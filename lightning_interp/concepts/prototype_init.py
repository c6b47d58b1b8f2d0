"""Starting ProtoPNet's prototypes on distinctive training patches of their class.

The reference (``cfchen-duke/ProtoPNet``, ``model.py``) starts the prototypes at
``U(0, 1)``, and the later part-prototype code we read keeps a data-free start: ProtoPool
(``gmum/ProtoPool``, ``model.py``) and the TesNet-based model of Huang et al. 2023
(``hqhQAQ/EvalProtoPNet``, ``model.py``) use ``torch.rand`` too, ProtoTree
(``M-Nauta/ProtoTree``, ``util/init.py``) ``N(0.5, 0.1)``. This start is ours. It is
needed over a frozen encoder: the max-pooling over patches sends the gradient only
through each input's nearest patch, so a prototype that starts nearer the background
than the class's part learns the background (on the planted problem of
``docs/prototypes.md``, 6 of 10 starting seeds left at least one class off its part).

:func:`class_patch_prototypes` reads the training rows twice:

1. per class, a uniform sample of :data:`CANDIDATES` tokens (random keys from a generator
   seeded with ``seed``, so every rank and every run picks the same ones), as add-on
   outputs;
2. every row, to score each candidate by *class contrast*: its mean min-distance to the
   inputs of the other classes minus that to the inputs of its own class (the
   separation and cluster costs the prototype stage trades, with equal weights). A
   patch of the class's part is close to every input of its class and far from the
   others; a background patch is about as far from both.

Each class's prototypes are then the best-scoring candidate and, for more than one per
class, k-means++ picks (probability proportional to the squared distance to the nearest
pick) among its candidates scoring at least half the best, so they spread over the
class's distinctive parts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_interp.concepts.prototype import as_tokens, squared_distances

if TYPE_CHECKING:
    from lightning_interp.concepts.prototype import ProtoPNet

#: Candidate tokens sampled per class (the scoring pass costs a forward pass of the
#: training set against ``classes * CANDIDATES`` prototypes).
CANDIDATES = 64
#: Distances computed at once while scoring (``rows * candidates * patches``, 64 MB).
CHUNK_ELEMENTS = 1 << 24

Batches = Iterable[tuple[Tensor, Tensor, Tensor | None]]


def _features(head: ProtoPNet, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Add-on outputs ``[b, patches, d]`` in fp32 and the token mask ``[b, patches]``."""
    device = head.prototypes.device
    tokens, mask = as_tokens(head, x.to(device).float(), mask)
    valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)
    return head.features(tokens), valid if mask is None else mask.to(device)


def sample_candidates(
    head: ProtoPNet, batches: Batches, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Up to :data:`CANDIDATES` random tokens per class: features ``[k, d]``, classes ``[k]``.

    Every real token of every row gets a random key; each class keeps its smallest keys
    (a uniform sample without replacement, read in one pass).
    """
    kept_f, kept_c, kept_k = [], [], []
    for x, y, mask in batches:
        features, valid = _features(head, x, mask)
        keys = torch.rand(valid.shape, generator=generator).to(valid.device)
        classes = y.to(valid.device)[:, None].expand_as(valid)
        kept_f.append(features[valid])
        kept_c.append(classes[valid])
        kept_k.append(keys[valid])
        f, c, k = torch.cat(kept_f), torch.cat(kept_c), torch.cat(kept_k)
        # Sort by key, then (stably) by class: a token's rank within its class is its
        # position minus where its class starts.
        order = k.argsort()
        order = order[c[order].argsort(stable=True)]
        c_sorted = c[order]
        starts = torch.searchsorted(c_sorted, c_sorted, right=False)
        keep = order[torch.arange(len(order), device=c.device) - starts < CANDIDATES]
        kept_f, kept_c, kept_k = [f[keep]], [c[keep]], [k[keep]]
    if not kept_f:
        return torch.empty(0, head.config.prototype_dim), torch.empty(0, dtype=torch.long)
    return kept_f[0], kept_c[0]


def class_contrast(
    head: ProtoPNet, batches: Batches, candidates: Tensor, classes: Tensor
) -> Tensor:
    """Each candidate's mean min-distance to other-class inputs minus to own-class inputs."""
    sums = torch.zeros(head.num_classes, len(candidates), device=candidates.device)
    counts = torch.zeros(head.num_classes, device=candidates.device)
    for x, y, mask in batches:
        features, valid = _features(head, x, mask)
        # Candidates in chunks: [b, k, patches] at once would be 0.8 GB for 200 classes,
        # 197 ViT tokens and a batch of 80.
        chunk = max(1, CHUNK_ELEMENTS // (features.shape[0] * features.shape[1]))
        nearest = torch.cat(
            [
                squared_distances(features, part)
                .masked_fill(~valid[:, None, :], float("inf"))
                .amin(-1)
                for part in candidates.split(chunk)
            ],
            dim=1,
        )  # [b, k]
        rows = torch.nn.functional.one_hot(y.to(candidates.device), head.num_classes).float()
        sums += rows.T @ nearest
        counts += rows.sum(0)
    own = sums[classes, torch.arange(len(classes))] / counts[classes].clamp_min(1)
    others = (sums.sum(0) - sums[classes, torch.arange(len(classes))]) / (
        counts.sum() - counts[classes]
    ).clamp_min(1)
    return others - own


def spread_picks(features: Tensor, scores: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``k`` rows of ``features``: the best score, then k-means++ among the distinctive ones.

    The distinctive ones score at least half the best (at least ``k`` of them; all, when
    no candidate scores above 0), so the later picks spread over the class's parts, not
    onto the background that k-means++ alone would favour for being far away.
    """
    best = float(scores.max())
    size = max(k, int((scores >= best / 2).sum())) if best > 0 else len(scores)
    pool = scores.argsort(descending=True)[:size]
    picks = [pool[0]]
    for _ in range(1, k):
        nearest = torch.cdist(features[pool], features[torch.stack(picks)]).amin(-1) ** 2
        if float(nearest.sum()) > 0:
            weights = nearest.cpu()
        else:  # fewer distinct candidates than prototypes: repeat one
            weights = torch.ones(len(pool))
        picks.append(pool[torch.multinomial(weights, 1, generator=generator).item()])
    return torch.stack(picks)


@torch.no_grad()
def class_patch_prototypes(
    head: ProtoPNet, rows: Callable[[], Batches], seed: int = 0
) -> dict[str, float]:
    """Set each class's prototypes to distinctive add-on outputs of its training patches.

    In fp32 outside autocast, so a prototype equals its patch's add-on output. A class
    without training rows keeps its prototypes.

    Args:
        head: A ProtoPNet head (its add-on layers, as they are now, project the tokens).
        rows: Gives the training rows once per call, in order, as ``(x, y, mask)``.
        seed: Seed of the candidate sampling and the k-means++ picks.

    Returns:
        ``initialised`` (prototypes started on a patch) and ``init_contrast`` (the mean
        class contrast of the picks, in squared add-on distance).
    """
    generator = torch.Generator().manual_seed(seed)
    device = head.prototypes.device
    with torch.autocast(device.type, enabled=False):
        candidates, classes = sample_candidates(head, rows(), generator)
        if not len(candidates):
            return {"initialised": 0.0}
        scores = class_contrast(head, rows(), candidates, classes)
    per = head.num_concepts // head.num_classes
    vectors = head.prototypes.detach().float().clone()
    chosen = []
    for c in range(head.num_classes):
        own = (classes == c).nonzero().flatten()
        if len(own):
            picks = own[spread_picks(candidates[own], scores[own], per, generator)]
            vectors[c * per : (c + 1) * per] = candidates[picks]
            chosen.append(picks)
    head.prototypes.copy_(vectors.to(head.prototypes))
    picked = torch.cat(chosen)
    return {"initialised": float(len(picked)), "init_contrast": float(scores[picked].mean())}
