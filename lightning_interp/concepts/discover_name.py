"""SAE-named concept bottlenecks: Discover-then-Name (Rao et al., ECCV 2024).

The pipeline: a sparse autoencoder on a frozen CLIP's image embeddings *discovers* concepts
(its latents); each latent is *named* by the vocabulary phrase whose CLIP text embedding is
closest (cosine) to the latent's decoder direction; latents that never fire, or whose best
similarity is below ``min_similarity``, are left unnamed; a sparse linear layer on the named
latents' activations classifies. :class:`SAENamedCBM` (``"sae_named_cbm"``) holds all of it:
the dictionary (a registered :mod:`lightning_interp.dictionaries` architecture), the
vocabulary's text embeddings (a :class:`~lightning_interp.concepts.ConceptBank`, built by
the concept module from the phrases and the data module's CLIP text tower as for PCBM),
the names, and the final layer. Trained by
:class:`~lightning_interp.modules.ConceptBottleneckModule`, the optimizer trains the
dictionary (its reconstruction and sparsity loss on the embeddings; labels are not used),
and when training ends :meth:`SAENamedCBM.fit_full_data` names the latents and solves the
final layer on all training rows (:func:`~lightning_interp.concepts.fit_sparse_linear`).
A dictionary trained elsewhere is taken with :meth:`SAENamedCBM.from_dictionary`.

The bottleneck has one unit per vocabulary phrase (``concept_names`` is the vocabulary):
a phrase's activation is the activation of the named latent(s) it names, divided by its
standard deviation on the training rows, and zero for phrases that name no latent, which
get no final-layer weight. The model card lists the named latents.

Reference code: ``neuroexplicit-saar/Discover-then-Name``: ``scripts/train_sae.py`` (a ReLU
SAE with an L1 penalty on CLIP image embeddings, expansion factor 8), ``dncbm/method_utils.py``
(``get_concept_name_similarity_matrix``: unit decoder directions times the vocabulary's
text embeddings, the name the arg-max per latent) and ``scripts/train_linear_probe.py``
(a linear probe on the latents' activations, Adam with an L1 penalty on the weights).
Deviations: the reference names every latent and probes all of them; here latents that
never fire on the training rows, or whose best similarity is below ``min_similarity``, are
left out (the issue's "keep the nameable ones"). Latents that get the same name add up in
that phrase's unit (the reference keeps them as separate units with equal names). The probe
is solved along an elastic-net path to a target density (exact zeros, the label-free CBM's
solver) on activations scaled to unit variance, instead of Adam with an L1 penalty on raw
activations. The decoder is not constrained to unit norm during training (the concept module
has no post-step hook); the L1 penalty is weighted by decoder norms instead (the standard
SAE's penalty), which makes the norm constraint unnecessary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_interp.concepts.bank import ConceptBank
from lightning_interp.concepts.base import ConceptHead, HeadOutput
from lightning_interp.concepts.card import class_weight_table, markdown_cell
from lightning_interp.concepts.config import HeadConfig
from lightning_interp.concepts.registry import register_head
from lightning_interp.concepts.solver import fit_sparse_linear
from lightning_interp.dictionaries import BatchTopKSAE, Dictionary, StandardSAE, create_dictionary
from lightning_interp.errors import ConfigError, EmptyConceptBankError

EXPANSION = 8  # the reference's expansion factor: d_latent = 8 * d_in by default
_ARCHITECTURES = {StandardSAE: "standard", BatchTopKSAE: "batchtopk"}
_CARD_LATENTS = 30  # longer lists of named latents are folded into a <details> block


@dataclass
class SAENamedCBMConfig(HeadConfig):
    """Options of :class:`SAENamedCBM` (described there)."""

    architecture: Literal["standard", "batchtopk"] = "standard"
    d_latent: int = 0
    l1_coefficient: float = 0.1
    k: int = 8
    train_dictionary: bool = True
    name_with: Literal["decoder", "encoder"] = "decoder"
    min_similarity: float = 0.0
    target_density: float = 0.1
    alpha: float = 0.99

    def check(self) -> None:
        """Sizes, the similarity in [-1, 1], the density in (0, 1], ``alpha`` in (0, 1]."""
        if self.d_latent < 0 or self.k < 1 or self.l1_coefficient < 0:
            raise ConfigError(
                f"need d_latent >= 0 (0: {EXPANSION} x d_in), k >= 1 and l1_coefficient >= 0; "
                f"got {self.d_latent}, {self.k}, {self.l1_coefficient}"
            )
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ConfigError(f"min_similarity is a cosine in [-1, 1], got {self.min_similarity}")
        if not 0.0 < self.target_density <= 1.0 or not 0.0 < self.alpha <= 1.0:
            raise ConfigError(
                f"target_density and alpha must be in (0, 1], got {self.target_density}, "
                f"{self.alpha}"
            )


@register_head("sae_named_cbm")
class SAENamedCBM(ConceptHead):
    """A sparse autoencoder's latents, named by a vocabulary, as a concept bottleneck.

    Args:
        d_in: Embedding width (CLIP's projection width).
        concept_names: The vocabulary: the phrases latents can be named by.
        class_names: Class names.
        config: The options below as a :class:`SAENamedCBMConfig` (or give them as keywords).
        architecture: The dictionary: ``"standard"`` (ReLU + L1, the reference's) or
            ``"batchtopk"``.
        d_latent: Latents (0: ``8 * d_in``, the reference's expansion factor).
        l1_coefficient: The standard SAE's L1 weight.
        k: BatchTopK's active latents per row.
        train_dictionary: Whether the optimizer trains the dictionary (off for a dictionary
            taken with :meth:`from_dictionary`).
        name_with: Name latents by their ``"decoder"`` direction (the reference) or their
            ``"encoder"`` direction.
        min_similarity: Latents whose best cosine to the vocabulary is below this stay
            unnamed.
        target_density: Share of non-zero final-layer weights the solver stops at.
        alpha: L1 share of the final layer's elastic net.

    Example:
        >>> bank = ConceptBank(["stripes", "spots", "wings"], torch.randn(3, 8))
        >>> head = SAENamedCBM.from_bank(bank, ["zebra", "bird"], d_latent=16)
        >>> head(torch.randn(4, 8)).concepts.shape
        torch.Size([4, 3])
    """

    full_data_fit = "after"
    config_class = SAENamedCBMConfig
    config: SAENamedCBMConfig

    def build_layers(self) -> None:
        """The dictionary, the vocabulary, the names, the scale and the final layer."""
        cfg = self.config
        sizes = {"d_in": self.d_in, "d_latent": cfg.d_latent or EXPANSION * self.d_in}
        # Decoder norms stay free: the standard SAE's L1 is weighted by them instead.
        if cfg.architecture == "standard":
            options = {"l1_coefficient": cfg.l1_coefficient}
        else:
            options = {"k": cfg.k}
        self.dictionary = create_dictionary(
            cfg.architecture, normalize_decoder=False, **sizes, **options
        )
        self.dictionary.requires_grad_(cfg.train_dictionary)
        d_latent, n = self.dictionary.d_latent, self.num_concepts
        self.register_buffer("vocabulary", torch.zeros(n, self.d_in))
        self.register_buffer("latent_concept", torch.full((d_latent,), -1, dtype=torch.long))
        self.register_buffer("latent_similarity", torch.zeros(d_latent))
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("b_dec_initialized", torch.tensor(False))
        self.final_layer = nn.Linear(n, self.num_classes)
        self.final_layer.requires_grad_(False)  # solved in fit_full_data

    @classmethod
    def from_bank(cls, bank: ConceptBank, class_names: Sequence[str], **kwargs: Any) -> SAENamedCBM:
        """A head whose vocabulary is ``bank`` (phrases embedded by CLIP's text tower)."""
        head = cls(bank.width, bank.names, class_names, **kwargs)
        head.vocabulary.copy_(bank.normalized())
        return head

    @classmethod
    def from_dictionary(
        cls,
        dictionary: Dictionary,
        bank: ConceptBank,
        class_names: Sequence[str],
        **kwargs: Any,
    ) -> SAENamedCBM:
        """A head over a dictionary trained elsewhere (not trained further by default).

        Raises:
            ConfigError: the dictionary is not a standard or BatchTopK SAE subtracting
                ``b_dec`` from its input.
            ShapeMismatchError: its width is not the vocabulary's.
        """
        architecture = _ARCHITECTURES.get(type(dictionary))
        if architecture is None or not dictionary.config.apply_b_dec_to_input:
            raise ConfigError(
                f"an SAE-named CBM reads a standard or BatchTopK dictionary that subtracts "
                f"b_dec from its input, got {type(dictionary).__name__}; train one of those "
                f"on the embeddings"
            )
        bank.check_width(torch.zeros(1, dictionary.d_in))
        extra = {"l1_coefficient": dictionary.config.l1_coefficient}
        if architecture == "batchtopk":
            extra = {"k": dictionary.config.k}
        options = {"train_dictionary": False, **extra, **kwargs}
        head = cls.from_bank(
            bank, class_names, architecture=architecture, d_latent=dictionary.d_latent, **options
        )
        folded = dictionary.with_scale_folded()  # the head reads raw embeddings
        head.dictionary.load_state_dict(folded.state_dict())
        head.b_dec_initialized.fill_(True)
        return head

    @property
    def final(self) -> nn.Linear:
        """The sparse concept-to-class layer."""
        return self.final_layer

    @property
    def named(self) -> Tensor:
        """Boolean ``[d_latent]``: the latents that carry a name."""
        return self.latent_concept >= 0

    def concept_activations(self, x: Tensor) -> Tensor:
        """Each phrase's activation: the sum over the latents it names, scaled ``[b, n]``."""
        self.check_input(x)
        codes = self.dictionary.encode(x).float()
        named = self.named
        out = codes.new_zeros(codes.shape[0], self.num_concepts)
        out.index_add_(1, self.latent_concept[named], codes[:, named])
        return out / self.scale

    def forward(self, x: Tensor, mask: Tensor | None = None) -> HeadOutput:
        """Logits of the sparse layer over the named latents' scaled activations."""
        z = self.concept_activations(x)
        return HeadOutput(self.final_layer(z.to(self.final_layer.weight.dtype)), z)

    def training_loss(
        self, x: Tensor, y: Tensor, concepts: Tensor | None, *, epoch: int, mask: Tensor | None
    ) -> dict[str, Tensor | None]:
        """The dictionary's loss on the embeddings (``None`` once it is not trained).

        ``b_dec`` starts at the geometric median of the first batch, as the dictionary
        module does.
        """
        self.check_input(x)
        if not self.config.train_dictionary:
            return {"loss": None}
        if not bool(self.b_dec_initialized):
            with torch.no_grad():
                self.dictionary.initialize_b_dec_(x)
            self.b_dec_initialized.fill_(True)
        terms = self.dictionary.loss(x, self.dictionary.forward_train(x))
        return {k: (v if k == "loss" else v.detach()) for k, v in terms.items()}

    @torch.no_grad()
    def latent_directions(self) -> Tensor:
        """Unit direction of each latent in embedding space ``[d_latent, d_in]``."""
        weight = self.dictionary.W_dec if self.config.name_with == "decoder" else None
        if weight is None:
            weight = self.dictionary.W_enc.T
        return torch.nn.functional.normalize(weight.float(), dim=-1)

    @torch.no_grad()
    def name_latents(self) -> tuple[Tensor, Tensor]:
        """Each latent's closest phrase and its cosine, ``([d_latent] long, [d_latent])``."""
        if not bool(self.vocabulary.abs().sum() > 0):
            raise ConfigError(
                "this head has no vocabulary embeddings; build it with SAENamedCBM.from_bank "
                "(or from_dictionary) over a bank of phrases embedded by CLIP's text tower"
            )
        similarity = self.latent_directions() @ self.vocabulary.float().T
        best, index = similarity.max(dim=-1)
        return index, best

    @torch.no_grad()
    def fit_full_data(
        self, x: Tensor, y: Tensor, val: tuple[Tensor, Tensor] | None = None
    ) -> dict[str, Any]:
        """Name the latents, keep the nameable ones, solve the sparse layer on ``x``.

        Args:
            x: All training embeddings (which latents fire, the scale, the final layer).
            y: Their labels.
            val: Not used.

        Raises:
            EmptyConceptBankError: no latent fires and passes ``min_similarity``.
        """
        self.check_input(x)
        x = x.float()
        index, best = self.name_latents()
        fires = (self.dictionary.encode(x) > 0).any(dim=0)
        keep = fires & (best >= self.config.min_similarity)
        if not keep.any():
            raise EmptyConceptBankError(
                f"no latent both fires on the training rows ({int(fires.sum())} do) and "
                f"reaches min_similarity {self.config.min_similarity} (best "
                f"{float(best.max()):.3f}); lower min_similarity or train the dictionary longer"
            )
        self.latent_concept.copy_(torch.where(keep, index, torch.full_like(index, -1)))
        self.latent_similarity.copy_(best)
        self.scale.fill_(1.0)
        raw = self.concept_activations(x)
        active = torch.zeros(self.num_concepts, dtype=torch.bool, device=x.device)
        active[index[keep]] = True
        self.scale.copy_(raw.std(0).clamp_min(1e-6))
        fit = fit_sparse_linear(
            raw[:, active] / self.scale[active],
            y,
            self.num_classes,
            alpha=self.config.alpha,
            target_density=self.config.target_density,
        )
        weight = torch.zeros_like(self.final_layer.weight, dtype=torch.float32)
        weight[:, active] = fit.weight
        self.final_layer.weight.copy_(weight)
        self.final_layer.bias.copy_(fit.bias)
        return {
            "named_latents": int(keep.sum()),
            "named_concepts": int(active.sum()),
            "dead_latents": int((~fires).sum()),
            "final_density": int((weight != 0).sum()) / weight.numel(),
            "final_lambda": fit.lam,
        }

    def named_latents(self) -> list[tuple[int, str, float]]:
        """``(latent, name, cosine)`` of every named latent, most similar first."""
        rows = [
            (i, self.concept_names[int(c)], float(self.latent_similarity[i]))
            for i, c in enumerate(self.latent_concept.tolist())
            if c >= 0
        ]
        return sorted(rows, key=lambda row: -row[2])

    def card_class_table(self, k: int = 5) -> str:
        """The class-concept weight table, then the named latents with their similarity."""
        rows = self.named_latents()
        if not rows:
            unfitted = "\nNo latent is named yet (the head is not fitted).\n"
            return class_weight_table(self, k) + unfitted
        lines = ["| latent | name | cosine |", "|---|---|---|"]
        lines += [f"| {i} | {markdown_cell(name)} | {sim:.3f} |" for i, name, sim in rows]
        table = "\n".join(lines)
        if len(rows) > _CARD_LATENTS:
            table = f"<details>\n<summary>all named latents</summary>\n\n{table}\n\n</details>"
        intro = (
            f"\n{len(rows)} of {self.dictionary.d_latent} dictionary latents are named (the "
            f"vocabulary phrase closest to the latent's {self.config.name_with} direction in "
            "CLIP space):\n\n"
        )
        return class_weight_table(self, k) + intro + table + "\n"
