"""Synthetic activations with a planted sparse dictionary, for ground-truth evaluation.

Activations are sparse non-negative combinations of ``n_features`` unit-norm atoms in a
``d``-dimensional space (superposition when ``n_features > d``), as in Sharkey et al.
(2022) and Elhage et al. (2022). Firing can be made uneven (Zipf), correlated (a
Gaussian copula with a low-rank factor) and hierarchical (children fire only with their
parent), the structures real activations have and SAEs are known to struggle with.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from lightning_interp.data import sharding
from lightning_interp.errors import ConfigError, ShapeMismatchError


class SparseSuperposition:
    """A planted dictionary and a sampler of activations built from it.

    Args:
        d: Activation width.
        n_features: Number of planted atoms.
        firing_probability: Mean probability that a feature is active in a row.
        zipf_exponent: Feature ``i`` fires with probability proportional to
            ``(i + 1) ** -zipf_exponent`` (0 gives every feature the same rate).
        correlation: Share in [0, 1) of each feature's latent Gaussian that comes from
            ``correlation_rank`` shared factors, so features co-fire.
        correlation_rank: Number of shared factors.
        n_parents: Number of parent features with children (0: no hierarchy).
        children_per_parent: Children of each parent. A child fires only when its parent
            does, then with probability ``child_probability``.
        child_probability: Conditional firing probability of a child.
        magnitude_std: Standard deviation of the active magnitudes around 1 (folded
            normal, so magnitudes stay positive).
        noise_std: Standard deviation of isotropic Gaussian noise added to each row.
        offset_norm: Norm of a fixed offset added to every row (what ``b_dec`` should learn).
        seed: Seed of the atoms, the factors and the offset.

    Example:
        >>> data = SparseSuperposition(d=16, n_features=32, seed=0)
        >>> x, coefficients = data.sample(8)
        >>> x.shape, coefficients.shape
        (torch.Size([8, 16]), torch.Size([8, 32]))
    """

    def __init__(
        self,
        d: int,
        n_features: int,
        *,
        firing_probability: float = 0.05,
        zipf_exponent: float = 0.0,
        correlation: float = 0.0,
        correlation_rank: int = 4,
        n_parents: int = 0,
        children_per_parent: int = 0,
        child_probability: float = 0.5,
        magnitude_std: float = 0.2,
        noise_std: float = 0.0,
        offset_norm: float = 0.0,
        seed: int = 0,
    ) -> None:
        if d <= 0 or n_features <= 0:
            raise ConfigError(
                f"d and n_features must be positive, got d={d}, n_features={n_features}"
            )
        if not 0.0 < firing_probability <= 1.0:
            raise ConfigError(f"firing_probability must be in (0, 1], got {firing_probability}")
        if not 0.0 <= correlation < 1.0:
            raise ConfigError(f"correlation must be in [0, 1), got {correlation}")
        if correlation > 0 and correlation_rank < 1:
            raise ConfigError(
                f"correlation > 0 needs correlation_rank >= 1, got {correlation_rank}"
            )
        if not 0.0 <= child_probability <= 1.0:
            raise ConfigError(f"child_probability must be in [0, 1], got {child_probability}")
        for name, value in (
            ("magnitude_std", magnitude_std),
            ("noise_std", noise_std),
            ("offset_norm", offset_norm),
        ):
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if n_parents * (1 + children_per_parent) > n_features:
            raise ConfigError(
                f"a hierarchy of {n_parents} parents with {children_per_parent} children each "
                f"needs {n_parents * (1 + children_per_parent)} features, only {n_features} exist"
            )
        self.d = d
        self.n_features = n_features
        self.correlation = correlation
        self.child_probability = child_probability
        self.magnitude_std = magnitude_std
        self.noise_std = noise_std
        generator = torch.Generator().manual_seed(seed)
        atoms = torch.randn(n_features, d, generator=generator)
        self.atoms = atoms / atoms.norm(dim=1, keepdim=True)
        offset = torch.randn(d, generator=generator)
        self.offset = offset / offset.norm() * offset_norm
        weights = (torch.arange(n_features, dtype=torch.float64) + 1) ** -zipf_exponent
        probabilities = weights / weights.mean() * firing_probability
        self.probabilities = probabilities.clamp(max=1.0).float()
        factors = torch.randn(n_features, correlation_rank, generator=generator)
        self.factors = factors / factors.norm(dim=1, keepdim=True)
        # Parent of each child feature (-1 for none): children follow their parents in order.
        self.parent = torch.full((n_features,), -1, dtype=torch.long)
        for p in range(n_parents):
            first_child = n_parents + p * children_per_parent
            self.parent[first_child : first_child + children_per_parent] = p

    def _firing(self, n: int, generator: torch.Generator) -> Tensor:
        noise = torch.randn(n, self.n_features, generator=generator)
        if self.correlation > 0:
            shared = torch.randn(n, self.factors.shape[1], generator=generator) @ self.factors.T
            noise = math.sqrt(1 - self.correlation) * noise + math.sqrt(self.correlation) * shared
        # Gaussian copula: feature i fires when its unit-variance latent clears its quantile.
        cut = torch.distributions.Normal(0.0, 1.0).icdf(
            1 - self.probabilities.clamp(1e-6, 1 - 1e-6)
        )
        fires = noise > cut
        children = self.parent >= 0
        if children.any():
            coin = torch.rand(n, int(children.sum()), generator=generator) < self.child_probability
            fires[:, children] = fires[:, self.parent[children]] & coin
        return fires

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` rows.

        Args:
            n: Number of rows.
            generator: Source of randomness (default: a fresh unseeded one).

        Returns:
            ``(x, coefficients)``: activations ``[n, d]`` and the planted codes
            ``[n, n_features]`` that produced them.
        """
        if generator is None:
            # Seed a private generator from the global one: reproducible under
            # torch.manual_seed, without re-seeding the global RNG.
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        fires = self._firing(n, generator)
        magnitudes = (
            1 + self.magnitude_std * torch.randn(n, self.n_features, generator=generator)
        ).abs()
        coefficients = fires * magnitudes
        x = coefficients @ self.atoms + self.offset
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn(n, self.d, generator=generator)
        return x, coefficients


class SyntheticActivations(IterableDataset):
    """Batches of synthetic activations, reproducible per seed and epoch.

    Use with ``DataLoader(dataset, batch_size=None)``: each item is already a batch.
    Batch ``i`` of epoch ``e`` is drawn from its own generator seeded by
    ``(seed, e, i)``, so the stream is the same however it is split: data-loader workers
    and DDP ranks each take every n-th batch instead of repeating the whole epoch.

    Args:
        data: The generator of rows.
        batch_size: Rows per batch.
        num_batches: Batches per epoch (over all workers and ranks).
        seed: Base seed.
    """

    def __init__(
        self, data: SparseSuperposition, batch_size: int, num_batches: int, seed: int = 0
    ) -> None:
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch to draw (otherwise each pass over the dataset starts a new one)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Tensor]:
        epoch = self.epoch
        self.epoch += 1
        shard, shards = sharding.shard()
        for index in range(shard, self.num_batches, shards):
            seed = hash((self.seed, epoch, index)) & (2**62 - 1)
            generator = torch.Generator().manual_seed(seed)
            yield self.data.sample(self.batch_size, generator=generator)[0]


def mean_max_cosine_similarity(learned: Tensor, planted: Tensor) -> float:
    """Mean over planted atoms of the best cosine similarity with any learned atom.

    The recovery score of Sharkey et al. (2022): 1.0 when every planted direction has a
    learned match. Extra learned atoms are not penalised.

    Args:
        learned: Learned atoms (decoder rows), ``[F, d]``.
        planted: Planted atoms, ``[G, d]``.

    Returns:
        The mean max cosine similarity in [-1, 1].
    """
    if learned.shape[-1] != planted.shape[-1]:
        raise ShapeMismatchError(
            f"learned atoms have width {learned.shape[-1]}, planted atoms {planted.shape[-1]}"
        )
    learned = torch.nn.functional.normalize(learned.detach().float(), dim=-1)
    planted = torch.nn.functional.normalize(planted.detach().float(), dim=-1)
    return float((planted @ learned.T).max(dim=1).values.mean())
