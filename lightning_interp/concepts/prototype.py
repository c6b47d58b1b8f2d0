"""ProtoPNet (Chen et al., NeurIPS 2019, "This Looks Like That") over frozen patch tokens.

Reference code ``cfchen-duke/ProtoPNet``: ``model.py`` (``PPNet``: the add-on layers, the
L2 prototype layer ``_l2_convolution``, ``distance_2_similarity`` =
``log((d + 1) / (d + 1e-4))``, min-pooling of the distances over the feature map, the last
layer initialised by ``set_last_layer_incorrect_connection(-0.5)``), ``train_and_test.py``
(cluster and separation costs, the L1 penalty on the last layer's wrong-class
connections; the ``warm_only`` / ``joint`` / ``last_only`` stages), ``push.py``
(``push_prototypes``: each prototype replaced by its nearest training patch among the
images of its class, recording which image and where) and ``settings.py`` (the loss
coefficients 1, 0.8, -0.08, 1e-4; 128-wide prototypes, ``add_on_layers_type='regular'``).

A frozen encoder's patch tokens ``[b, patches, d_in]`` play the reference's feature map
(a pooled embedding ``[b, d_in]`` is one patch). The head is:

1. the add-on layers ``Linear -> ReLU -> Linear -> Sigmoid`` on every token (the
   reference's 1x1 convolutions, Kaiming fan-out initialisation, zero biases);
2. ``m`` prototypes per class, squared L2 distances to every token, min over tokens
   (padding tokens never match);
3. the similarity ``log((d + 1) / (d + 1e-4))`` (or ``-d``) and a last layer without
   bias, 1 from a prototype to its class and ``incorrect_strength`` (-0.5) elsewhere.

Training runs in stages by epoch, in cycles of ``prototype_epochs + last_layer_epochs``:
the *prototype* stage trains the add-on layers and prototypes with
``CE + 0.8 cluster - 0.08 separation`` (the last layer fixed, as the reference's warm and
joint optimizers leave it out); at the start of the *last-layer* stage the prototypes are
*pushed* onto their nearest training patch (the concept module calls
:meth:`ProtoPNet.between_epochs` with the training rows in order); then only the last
layer trains, with ``CE + 1e-4 * L1(wrong-class weights)``. A run that ends inside a
prototype stage is pushed once more when training ends, so a trained head's prototypes
are always real training patches (``push_sample`` / ``push_patch`` record which).

Deviations from the reference, on purpose:

- the prototypes start on distinctive add-on outputs of their class's training patches
  (``prototype_init="class_patches"``, the default; :mod:`.prototype_init`), not at
  ``U(0, 1)`` (``"uniform"``, the reference's start). The max-pooling trains a prototype
  only through each input's nearest patch, so over a frozen encoder a uniform start
  that lies nearer the background stays there: on the planted problem of
  ``docs/prototypes.md`` it left at least one class off its part on 6 of 10 seeds, the
  patch start on none. The start is taken once, before the first epoch, through the initial
  add-on layers; those then move, but the cluster cost pulls the patch the prototype
  sits on (the nearest of its inputs) and the prototype together;
- the encoder is frozen, so its warm and joint stages coincide (the reference's joint
  stage differs only in training the backbone);
- one optimizer with the module's learning rate for every stage (the reference uses
  per-group rates: 3e-3 add-on and prototypes, 1e-4 last layer); each stage's other
  parameters get no gradient at all, so Adam leaves them exactly unchanged;
- cluster and separation costs take the exact minimum over the class's (other classes')
  prototypes; the reference's ``max_dist - max((max_dist - d) * mask)`` is the same value
  whenever ``d <= max_dist``;
- the push reads the whole training set in dataset order on every rank (the reference's
  unshuffled push loader), so the recorded sample index is the training row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_interp.concepts.base import ConceptHead, HeadOutput
from lightning_interp.concepts.card import class_weight_table, markdown_cell
from lightning_interp.concepts.config import HeadConfig
from lightning_interp.concepts.registry import register_head
from lightning_interp.errors import ConfigError, ShapeMismatchError

EPSILON = 1e-4  # the reference's self.epsilon in distance_2_similarity
DEFAULT_PER_CLASS = 10  # the reference's 2000 prototypes for 200 CUB classes

#: What ``between_epochs`` reads: the training rows once, in order, as ``(x, y, mask)``.
RowBatches = Callable[[], Iterable[tuple[Tensor, Tensor, Tensor | None]]]


@dataclass
class ProtoPNetConfig(HeadConfig):
    """Options of :class:`ProtoPNet` (described there)."""

    prototypes_per_class: int | None = None
    prototype_dim: int = 128
    activation: Literal["log", "linear"] = "log"
    incorrect_strength: float = -0.5
    cluster_weight: float = 0.8
    separation_weight: float = -0.08
    l1_weight: float = 1e-4
    prototype_epochs: int = 10
    last_layer_epochs: int = 20
    prototype_init: Literal["class_patches", "uniform"] = "class_patches"
    init_seed: int = 0

    def check(self) -> None:
        """Positive sizes, a stage to train the prototypes in, non-negative penalties."""
        if self.prototypes_per_class is not None and self.prototypes_per_class < 1:
            raise ConfigError(
                f"prototypes_per_class must be >= 1 (or null), got {self.prototypes_per_class}"
            )
        if self.prototype_dim < 1:
            raise ConfigError(f"prototype_dim must be >= 1, got {self.prototype_dim}")
        if self.prototype_epochs < 0 or self.last_layer_epochs < 0:
            raise ConfigError(
                f"prototype_epochs and last_layer_epochs must be >= 0, got "
                f"{self.prototype_epochs}, {self.last_layer_epochs}"
            )
        if self.prototype_epochs + self.last_layer_epochs == 0:
            raise ConfigError("prototype_epochs + last_layer_epochs must be >= 1")
        if self.prototype_init not in ("class_patches", "uniform"):
            raise ConfigError(
                f"prototype_init must be 'class_patches' or 'uniform', got {self.prototype_init!r}"
            )
        if self.cluster_weight < 0 or self.l1_weight < 0:
            raise ConfigError(
                f"cluster_weight and l1_weight must be >= 0, got {self.cluster_weight}, "
                f"{self.l1_weight} (separation_weight is negative: it rewards distance)"
            )


def as_tokens(head: ConceptHead, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``x`` as tokens ``[b, patches, d_in]`` (a pooled ``[b, d_in]`` is one patch)."""
    if x.ndim == 2:
        x = x.unsqueeze(1)
    if x.ndim != 3:
        raise ShapeMismatchError(
            f"{type(head).__name__} reads patch tokens [batch, patches, {head.d_in}] or pooled "
            f"embeddings [batch, {head.d_in}], got {tuple(x.shape)}"
        )
    head.check_input(x)
    if mask is not None and mask.shape != x.shape[:2]:
        raise ShapeMismatchError(
            f"the token mask must be [batch, patches] = {tuple(x.shape[:2])}, got "
            f"{tuple(mask.shape)}"
        )
    return x, (None if mask is None else mask.bool())


def squared_distances(features: Tensor, prototypes: Tensor) -> Tensor:
    """``relu(|f|^2 - 2 f.p + |p|^2)`` ``[b, m, patches]``, as ``_l2_convolution``, in fp32."""
    f, p = features.float(), prototypes.float()
    cross = torch.einsum("bnd,md->bmn", f, p)
    return F.relu((f * f).sum(-1)[:, None, :] - 2 * cross + (p * p).sum(-1)[None, :, None])


@register_head("protopnet")
class ProtoPNet(ConceptHead):
    """ProtoPNet's prototype layer and last layer over frozen patch tokens.

    The concepts are the prototypes, in class blocks (prototype ``j`` belongs to class
    ``j // (m / classes)``, as the reference's ``prototype_class_identity``); their
    activations are the max-pooled similarities ``[b, m]``, and ``HeadOutput.attention``
    holds the similarity maps ``[b, m, patches]`` (where in the input each prototype was
    found).

    Args:
        d_in: Token width of the encoder.
        concept_names: One name per prototype, class by class
            (:meth:`default_concept_names` makes ``"<class>/prototype_<j>"``).
        class_names: Class names.
        config: The options below as a :class:`ProtoPNetConfig` (or give them as keywords).
        prototypes_per_class: Prototypes per class (``None``: as many names as given,
            divided by the classes; 10 for :meth:`default_concept_names`).
        prototype_dim: Width of the add-on output and the prototypes (reference 128).
        activation: ``"log"`` (``log((d + 1) / (d + 1e-4))``) or ``"linear"`` (``-d``).
        incorrect_strength: Initial last-layer weight to the other classes (-0.5).
        cluster_weight: Weight of the cluster cost (0.8).
        separation_weight: Weight of the separation cost (-0.08: distance is rewarded).
        l1_weight: Weight of the L1 norm of the wrong-class last-layer weights (1e-4).
        prototype_epochs: Epochs of the prototype stage in each cycle.
        last_layer_epochs: Epochs of the last-layer stage in each cycle (the push comes
            first).
        prototype_init: ``"class_patches"``: before the first epoch, the concept module
            starts each class's prototypes on distinctive add-on outputs of its training
            patches (:func:`~lightning_interp.concepts.prototype_init.class_patch_prototypes`;
            once: a trained or loaded head is kept). ``"uniform"``: ``U(0, 1)`` as the
            reference (seed-sensitive over a frozen encoder; see the module docstring).
        init_seed: Seed of the ``"class_patches"`` sampling.

    Example:
        >>> head = ProtoPNet(8, ProtoPNet.default_concept_names(["cat", "dog"], 2),
        ...                  ["cat", "dog"], prototype_dim=4)
        >>> out = head(torch.randn(3, 5, 8))
        >>> out.logits.shape, out.concepts.shape, out.attention.shape
        (torch.Size([3, 2]), torch.Size([3, 4]), torch.Size([3, 4, 5]))
        >>> head.last_layer.weight.tolist()
        [[1.0, 1.0, -0.5, -0.5], [-0.5, -0.5, 1.0, 1.0]]
    """

    config_class = ProtoPNetConfig
    config: ProtoPNetConfig
    reads_tokens = True

    @classmethod
    def default_concept_names(
        cls, class_names: Sequence[str], prototypes_per_class: int | None = None, **_: Any
    ) -> list[str]:
        """Prototype names ``"<class>/prototype_<j>"``, class by class."""
        per = prototypes_per_class or DEFAULT_PER_CLASS
        return [f"{c}/prototype_{j}" for c in class_names for j in range(per)]

    def build_layers(self) -> None:
        """Add-on layers, prototypes, the last layer and the push records."""
        m, classes = self.num_concepts, self.num_classes
        per = self.config.prototypes_per_class
        if m % classes or (per is not None and per * classes != m):
            raise ConfigError(
                f"ProtoPNet needs the same number of prototypes for each of the {classes} "
                f"classes, got {m} prototype names (prototypes_per_class={per}); give "
                f"ProtoPNet.default_concept_names(class_names, k) or k * {classes} names"
            )
        d = self.config.prototype_dim
        self.add_on = nn.Sequential(
            nn.Linear(self.d_in, d), nn.ReLU(), nn.Linear(d, d), nn.Sigmoid()
        )
        for layer in self.add_on:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        self.prototypes = nn.Parameter(torch.rand(m, d))
        self.last_layer = nn.Linear(m, classes, bias=False)
        self.register_buffer("prototype_class", torch.arange(m) // (m // classes), False)
        # Which training row and token each prototype was pushed onto (-1: not pushed).
        self.register_buffer("push_sample", torch.full((m,), -1, dtype=torch.long))
        self.register_buffer("push_patch", torch.full((m,), -1, dtype=torch.long))
        # Whether the prototypes started from data (saved: a loaded head is not restarted).
        self.register_buffer("prototypes_initialised", torch.tensor(False))
        self._stale = True  # prototypes changed since the last push
        self.set_last_layer_incorrect_connection(self.config.incorrect_strength)

    @classmethod
    def upgrade_state(cls, tensors: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
        """Heads saved before the data start existed were trained: mark them initialised."""
        key = f"{prefix}prototypes_initialised"
        if f"{prefix}prototypes" in tensors and key not in tensors:
            tensors = {**tensors, key: torch.tensor(True)}
        return tensors

    @torch.no_grad()
    def set_last_layer_incorrect_connection(self, incorrect_strength: float) -> None:
        """Weights 1 from each prototype to its class and ``incorrect_strength`` elsewhere."""
        own = self.class_identity().T  # [classes, m]
        self.last_layer.weight.copy_(own + incorrect_strength * (1 - own))

    def class_identity(self) -> Tensor:
        """One-hot ``[m, classes]``: the class of each prototype."""
        return F.one_hot(self.prototype_class, self.num_classes).float()

    @property
    def final(self) -> nn.Linear:
        """The last layer (prototype similarities -> classes)."""
        return self.last_layer

    # ------------------------------------------------------------------ forward
    def similarity(self, distances: Tensor) -> Tensor:
        """``log((d + 1) / (d + 1e-4))`` or ``-d``, the reference's distance_2_similarity."""
        if self.config.activation == "log":
            return torch.log((distances + 1) / (distances + EPSILON))
        return -distances

    def features(self, x: Tensor) -> Tensor:
        """The add-on layers' output ``[b, patches, prototype_dim]`` (what prototypes match)."""
        return self.add_on(x)

    def patch_distances(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Squared distances ``[b, m, patches]`` of every token to every prototype.

        Padding tokens (``mask`` False) are at distance ``inf``.
        """
        tokens, mask = as_tokens(self, x, mask)
        distances = squared_distances(self.features(tokens), self.prototypes)
        if mask is not None:
            distances = distances.masked_fill(~mask[:, None, :], float("inf"))
        return distances

    def forward(self, x: Tensor, mask: Tensor | None = None) -> HeadOutput:
        """Logits, max-pooled prototype similarities and the similarity maps."""
        distances = self.patch_distances(x, mask)
        activations = self.similarity(distances.amin(-1))
        maps = self.similarity(distances)  # padding: log(1) = 0, or -inf for "linear"
        if self.config.activation == "log":
            maps = torch.nan_to_num(maps, nan=0.0)
        logits = self.last_layer(activations.to(self.last_layer.weight.dtype))
        return HeadOutput(logits, activations, attention=maps)

    # ------------------------------------------------------------------ training
    def stage(self, epoch: int) -> Literal["prototypes", "last_layer"]:
        """The training stage of ``epoch`` (cycles of prototype, then last-layer epochs)."""
        cycle = self.config.prototype_epochs + self.config.last_layer_epochs
        return "prototypes" if epoch % cycle < self.config.prototype_epochs else "last_layer"

    def training_loss(
        self, x: Tensor, y: Tensor, concepts: Tensor | None, *, epoch: int, mask: Tensor | None
    ) -> dict[str, Tensor | None]:
        """The stage's loss: CE + cluster + separation, or CE + L1 on the last layer."""
        last_only = self.stage(epoch) == "last_layer"
        with torch.set_grad_enabled(torch.is_grad_enabled() and not last_only):
            min_distances = self.patch_distances(x, mask).amin(-1)  # [b, m]
        if not last_only:
            self._stale = True
            self.push_sample.fill_(-1)
            self.push_patch.fill_(-1)
        weight = self.last_layer.weight if last_only else self.last_layer.weight.detach()
        logits = F.linear(self.similarity(min_distances), weight.float())
        task = F.cross_entropy(logits, y)
        own = self.prototype_class[None, :] == y[:, None]  # [b, m]
        cluster = min_distances.masked_fill(~own, float("inf")).amin(-1).mean()
        separation = min_distances.masked_fill(own, float("inf")).amin(-1).mean()
        wrong = 1 - self.class_identity().T
        l1 = (self.last_layer.weight * wrong).abs().sum()
        if last_only:
            loss = task + self.config.l1_weight * l1
        else:
            cfg = self.config
            loss = task + cfg.cluster_weight * cluster + cfg.separation_weight * separation
        return {
            "loss": loss,
            "task_loss": task.detach(),
            "cluster_cost": cluster.detach(),
            "separation_cost": separation.detach(),
            "last_layer_l1": l1.detach(),
        }

    # ------------------------------------------------------------------ push
    def between_epochs(self, epoch: int, rows: RowBatches, *, final: bool = False) -> dict:
        """Start from class patches (once), push when a last-layer stage starts or at the end.

        Called by :class:`~lightning_interp.modules.ConceptBottleneckModule` before each
        training epoch and once when training ends (``final``). The push follows any
        change of the prototypes since the last one.

        Args:
            epoch: The epoch about to start.
            rows: Gives the training rows once, in order, as ``(x, y, mask)`` batches.
            final: Training has ended.

        Returns:
            The start's and the push's reports (empty when neither ran).
        """
        report = {}
        if not final and self.config.prototype_init == "class_patches":
            report.update(self.init_from_patches(rows))
        if self._stale and (final or self.stage(epoch) == "last_layer"):
            report.update(self.push(rows()))
        return report

    def init_from_patches(self, rows: RowBatches) -> dict[str, float]:
        """Start the prototypes on class patches unless already done (reads ``rows`` twice).

        See :func:`~lightning_interp.concepts.prototype_init.class_patch_prototypes`.
        """
        # prototype_init builds on this module's distances: imported here, not at the top.
        from lightning_interp.concepts.prototype_init import class_patch_prototypes

        if bool(self.prototypes_initialised):
            return {}
        report = class_patch_prototypes(self, rows, seed=self.config.init_seed)
        self.prototypes_initialised.fill_(True)
        self._stale = True
        return report

    @torch.no_grad()
    def push(self, batches: Iterable[tuple[Tensor, Tensor, Tensor | None]]) -> dict[str, float]:
        """Project each prototype onto its nearest training patch of its own class.

        As the reference's ``push_prototypes`` (class-specific): over all batches, the
        prototype becomes the add-on output of the closest token among the rows of its
        class; ``push_sample`` / ``push_patch`` record the row (counted over the batches,
        in order) and the token. A prototype whose class has no rows keeps its vector.

        Args:
            batches: ``(x, y, mask)`` with ``x`` tokens ``[b, patches, d_in]`` (or pooled
                ``[b, d_in]``), labels ``[b]`` and an optional token mask.

        Returns:
            ``pushed`` (prototypes that found a patch) and ``push_mean_distance`` (their
            mean squared distance before the push).
        """
        m = self.num_concepts
        device = self.prototypes.device
        best = torch.full((m,), float("inf"), device=device)
        vectors = self.prototypes.detach().float().clone()
        sample = torch.full((m,), -1, dtype=torch.long, device=device)
        patch = torch.full((m,), -1, dtype=torch.long, device=device)
        offset = 0
        # Push in fp32 (outside autocast): the prototype must equal the patch exactly.
        with torch.autocast(device.type, enabled=False):
            for x, y, mask in batches:
                tokens, mask = as_tokens(self, x.to(device).float(), mask)
                features = self.features(tokens)
                distances = squared_distances(features, self.prototypes)
                if mask is not None:
                    distances = distances.masked_fill(~mask.to(device)[:, None, :], float("inf"))
                own = self.prototype_class[None, :, None] == y.to(device)[:, None, None]
                distances = distances.masked_fill(~own, float("inf"))
                flat = distances.transpose(0, 1).flatten(1)  # [m, b * patches]
                value, index = flat.min(-1)
                better = value < best
                rows, cols = index // tokens.shape[1], index % tokens.shape[1]
                best = torch.where(better, value, best)
                vectors[better] = features[rows[better], cols[better]]
                sample = torch.where(better, rows + offset, sample)
                patch = torch.where(better, cols, patch)
                offset += tokens.shape[0]
        self.prototypes.copy_(vectors)
        self.push_sample.copy_(sample)
        self.push_patch.copy_(patch)
        self._stale = False
        found = sample >= 0
        mean = float(best[found].mean()) if found.any() else float("nan")
        return {"pushed": float(found.sum()), "push_mean_distance": mean}

    # ------------------------------------------------------------------ card
    def card_class_table(self, k: int = 5) -> str:
        """The last-layer table, then where each prototype was pushed."""
        lines = ["| prototype | class | training row | token |", "|---|---|---|---|"]
        for j, name in enumerate(self.concept_names):
            row, token = int(self.push_sample[j]), int(self.push_patch[j])
            where = (str(row), str(token)) if row >= 0 else ("not pushed", "–")
            cls = self.class_names[int(self.prototype_class[j])]
            lines.append(
                f"| {markdown_cell(name)} | {markdown_cell(cls)} | {where[0]} | {where[1]} |"
            )
        pushed = (
            "\nEach prototype is the add-on output of one training token (ProtoPNet's push): "
            "the row of the training set and the token it was projected onto.\n\n"
        )
        return class_weight_table(self, k) + pushed + "\n".join(lines) + "\n"
