"""The typed config of a cross-layer transcoder, and what its weights cost in memory.

Decoders are kept one tensor per *source* layer, ``W_dec[s]`` of shape
``[d_latent(s), n_targets(s), d_out]`` with ``n_targets(s) = n_layers - s`` (targets
``s .. n_layers - 1``), as circuit-tracer's ``CrossLayerTranscoder`` keeps them (its
``W_dec_{s}.safetensors`` files). A feature's writes to every layer it reaches are then one
contiguous row ``W_dec[s][i]``: decoding a source layer is one matmul (or one sparse gather)
for all its targets, and the concatenated decoder norm of the sparsity penalty is one
reduction. The blocks number ``n_layers * (n_layers + 1) / 2`` (78 for 12 layers), so
decoder memory grows quadratically with depth; a PLT (``cross_layer=False``) keeps one
target per source.

:func:`clt_memory` counts it: a 12-layer model with ``d_model = 768`` at width 16x
(12,288 features per layer) holds 736M decoder weights (78 blocks of 12,288 x 768) plus
113M encoder weights, 850M parameters in all: 3.40 GB in float32, and 13.6 GB with the
gradients and Adam's two moments (16 bytes per parameter), before activations. Per-layer
transcoders of the same width need 12 blocks: 227M parameters, 3.6 GB to train.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from lightning_interp._validation import dataclass_from_dict, validate_fields
from lightning_interp.dictionaries.config import check_k, check_non_negative, check_scale
from lightning_interp.errors import ConfigError

CLTActivation = Literal["jumprelu", "topk", "batchtopk"]
ReconstructionLoss = Literal["fvu", "mse"]


@dataclass(kw_only=True)
class CLTConfig:
    """Config of a :class:`~lightning_interp.circuits.clt.CrossLayerTranscoder`.

    Attributes:
        n_layers: Layers covered, ``0 .. n_layers - 1``.
        d_latent: Features per layer: one width for every layer, or one per layer.
        d_in: Width of the input sites; ``None`` until a training module fills it from the
            data module's site widths.
        d_out: Width of the output sites; ``None`` means ``d_in``.
        activation: ``"jumprelu"`` (Anthropic's CLTs), ``"topk"`` (``k`` per row and layer)
            or ``"batchtopk"`` (``k * rows`` per layer across the batch; a JumpReLU at an
            estimated threshold at inference).
        k: Active features per row and layer (TopK, BatchTopK).
        aux_k: Dead features per layer the AuxK loss uses (TopK, BatchTopK); ``None``
            means ``d_in // 2``.
        aux_coefficient: Weight of the AuxK loss (1/32, Gao et al.).
        threshold_momentum: EMA momentum of BatchTopK's inference thresholds.
        sparsity_coefficient: Weight of the tanh penalty (JumpReLU; Anthropic's lambda).
        tanh_scale: ``c`` of the tanh penalty.
        bandwidth: Width of the JumpReLU straight-through kernel.
        initial_threshold: JumpReLU threshold every feature starts with.
        pre_act_loss_coefficient: Weight of Anthropic's pre-activation loss on dead
            features (JumpReLU); ``None`` turns it off.
        reconstruction_loss: ``"fvu"``: per output layer, the squared error divided by that
            layer's (detached) batch variance, summed over layers, so every layer counts
            alike whatever its scale (the standardised MSE of the crosslayer-transcoder
            trainer). ``"mse"``: the plain squared error summed over layers (the paper's
            ``sum_l ||y_hat^l - y^l||^2``, for activations normalised beforehand).
        cross_layer: ``False`` gives per-layer transcoders (each layer decodes to itself).
        input_sites: Site each layer reads; default ``layers.{l}.mlp_in``.
        output_sites: Site each layer reconstructs; default ``layers.{l}.mlp_out``.
        input_scales: Factor each input site was multiplied by in training (default 1);
            the transcoder-set view (:meth:`encoder`, :meth:`encode`) takes raw inputs.
        output_scales: Same for the output sites.
        dtype: Parameter dtype.
        backbone: The backbone the activations came from (provenance).
    """

    n_layers: int
    d_latent: int | list[int]
    d_in: int | None = None
    d_out: int | None = None
    activation: CLTActivation = "jumprelu"
    k: int | None = None
    aux_k: int | None = None
    aux_coefficient: float = 1 / 32
    threshold_momentum: float = 0.99
    sparsity_coefficient: float = 1e-3
    tanh_scale: float = 4.0
    bandwidth: float = 0.05
    initial_threshold: float = 0.05
    pre_act_loss_coefficient: float | None = None
    reconstruction_loss: ReconstructionLoss = "fvu"
    cross_layer: bool = True
    input_sites: list[str] | None = None
    output_sites: list[str] | None = None
    input_scales: list[float] | None = None
    output_scales: list[float] | None = None
    dtype: str = "float32"
    backbone: str | None = None

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.n_layers <= 0:
            raise ConfigError(f"n_layers must be a positive integer, got {self.n_layers!r}")
        widths = self.widths
        if len(widths) != self.n_layers or any(w <= 0 for w in widths):
            raise ConfigError(
                f"d_latent must be a positive integer or a list of {self.n_layers} of them "
                f"(one per layer), got {self.d_latent!r}"
            )
        for name in ("d_in", "d_out"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
        if self.activation in ("topk", "batchtopk"):
            if self.k is None:
                raise ConfigError(f"activation={self.activation!r} needs k, the active features")
            for width in widths:
                check_k(self.k, width)
                if self.aux_k is not None:
                    check_k(self.aux_k, width, "aux_k")
        elif self.k is not None:
            raise ConfigError(
                f"k={self.k} is only read by activation='topk' or 'batchtopk'; remove it or "
                f"set the activation"
            )
        if not 0.0 <= self.threshold_momentum < 1.0:
            raise ConfigError(
                f"threshold_momentum must be in [0, 1), got {self.threshold_momentum}"
            )
        for name in ("aux_coefficient", "sparsity_coefficient"):
            check_non_negative(getattr(self, name), name)
        if self.pre_act_loss_coefficient is not None:
            check_non_negative(self.pre_act_loss_coefficient, "pre_act_loss_coefficient")
        for name in ("tanh_scale", "bandwidth", "initial_threshold"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("input_sites", "output_sites", "input_scales", "output_scales"):
            value = getattr(self, name)
            if value is not None and len(value) != self.n_layers:
                raise ConfigError(
                    f"{name} has {len(value)} entries but n_layers is {self.n_layers}; give "
                    f"one per layer or leave it out"
                )
        for name in ("input_scales", "output_scales"):
            for scale in getattr(self, name) or []:
                check_scale(scale, name)

    @property
    def widths(self) -> list[int]:
        """Features of each layer."""
        if isinstance(self.d_latent, int):
            return [self.d_latent] * self.n_layers
        return list(self.d_latent)

    @property
    def output_width(self) -> int:
        """Width of the output sites (``d_out``, else ``d_in``)."""
        if self.d_in is None:
            raise ConfigError(
                "this CLT config leaves d_in open; give it, or train through "
                "CrossLayerTranscoderModule on a data module, which fills it from the sites"
            )
        return self.d_in if self.d_out is None else self.d_out

    def n_targets(self, source: int) -> int:
        """Output layers features of ``source`` write to (1 for a PLT)."""
        return self.n_layers - source if self.cross_layer else 1

    def sites(self) -> tuple[list[str], list[str]]:
        """``(input_sites, output_sites)``, the defaults filled in."""
        inputs = self.input_sites or [f"layers.{i}.mlp_in" for i in range(self.n_layers)]
        outputs = self.output_sites or [f"layers.{i}.mlp_out" for i in range(self.n_layers)]
        return list(inputs), list(outputs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with ``architecture: "clt"`` first."""
        return {"architecture": "clt", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CLTConfig:
        """The config written by :meth:`to_dict` (unknown or missing keys are refused)."""
        return dataclass_from_dict(cls, {k: v for k, v in values.items() if k != "architecture"})

    def replace(self, **changes: Any) -> CLTConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def clt_memory(
    n_layers: int,
    d_model: int,
    d_latent: int,
    *,
    d_out: int | None = None,
    cross_layer: bool = True,
    bytes_per_parameter: int = 4,
    optimizer_states: int = 2,
) -> dict[str, int]:
    """Parameter count and training bytes of a CLT, from integers (nothing is allocated).

    Args:
        n_layers: Layers covered.
        d_model: Input width (the MLP input).
        d_latent: Features per layer.
        d_out: Output width (default ``d_model``).
        cross_layer: ``False`` for per-layer transcoders.
        bytes_per_parameter: 4 for float32.
        optimizer_states: Tensors the optimizer keeps per parameter (Adam: 2).

    Returns:
        ``decoder_blocks``, ``encoder_parameters``, ``decoder_parameters``, ``parameters``,
        ``weight_bytes`` and ``training_bytes`` (weights, gradients and optimizer states).

    Example:
        >>> memory = clt_memory(12, 768, 16 * 768)
        >>> memory["decoder_blocks"], memory["parameters"], memory["training_bytes"] // 10**9
        (78, 849650688, 13)
    """
    d_out = d_model if d_out is None else d_out
    blocks = n_layers * (n_layers + 1) // 2 if cross_layer else n_layers
    encoder = n_layers * (d_model * d_latent + d_latent)
    # Decoders, the output biases, and one threshold per feature (JumpReLU / BatchTopK).
    decoder = blocks * d_latent * d_out
    parameters = encoder + decoder + n_layers * d_out + n_layers * d_latent
    weight_bytes = parameters * bytes_per_parameter
    return {
        "decoder_blocks": blocks,
        "encoder_parameters": encoder,
        "decoder_parameters": decoder,
        "parameters": parameters,
        "weight_bytes": weight_bytes,
        "training_bytes": weight_bytes * (2 + optimizer_states),
    }
