"""Typed configuration dataclasses shared by every dictionary architecture."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from lightning_interp.errors import ConfigError

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

BDecInit = Literal["geometric_median", "mean", "zeros"]


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """Return the torch dtype for a name such as ``"bfloat16"`` or ``"torch.float32"``.

    Raises:
        ConfigError: if the name is not a floating dtype a dictionary can hold.
    """
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ConfigError(f"dtype {name} is not supported; use one of {sorted(_DTYPES)}")
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """Return the short name (``"float32"``) of a torch dtype."""
    return str(dtype).removeprefix("torch.")


@dataclass(kw_only=True)
class Provenance:
    """Where a dictionary's training activations came from.

    Attributes:
        backbone: Model id or path of the frozen backbone (e.g. ``"gpt2"``).
        site: Site the dictionary reads (e.g. ``"layers.8.resid_post"``).
        site_out: Site a transcoder writes, if different from ``site``.
        dataset: Dataset the activations were computed on.
        context_size: Tokens per context used when capturing activations.
        normalization: How inputs were normalised before training: ``"none"``, or
            ``"expected_norm"`` (scaled to a fixed mean norm; see ``activation_scale``).
        activation_scale: The factor inputs were multiplied by during training, if any. A
            dictionary saved with a scale other than 1 expects inputs pre-multiplied by it,
            unless the scale has been folded into its weights.
        trained_as: Training-time architecture when it differs from the saved one (a
            BatchTopK dictionary is saved as JumpReLU).
        revision: Hub commit the dictionary was loaded from, filled in by the loader.
        extra: Free-form metadata kept verbatim (e.g. a foreign library's fields).
    """

    backbone: str | None = None
    site: str | None = None
    site_out: str | None = None
    dataset: str | None = None
    context_size: int | None = None
    normalization: str = "none"
    activation_scale: float = 1.0
    trained_as: str | None = None
    revision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class DictionaryConfig:
    """Fields common to every dictionary architecture.

    Attributes:
        d_in: Width of the input activations.
        d_latent: Number of latents (dictionary atoms).
        d_out: Width of the output; ``None`` means ``d_in`` (an autoencoder). Set it for a
            transcoder that reads one site and predicts another.
        dtype: Parameter dtype (``"float32"``, ``"bfloat16"``, ...).
        normalize_decoder: Keep decoder rows at unit norm during training (renormalised
            after each optimizer step, with the gradient component parallel to each row
            removed before the step).
        apply_b_dec_to_input: Subtract ``b_dec`` from the input before encoding (only
            meaningful for autoencoders, where input and output live in the same space).
        skip_connection: Add a learned linear skip ``x @ W_skip.T`` (``W_skip [d_out,
            d_in]``) to the reconstruction, as skip-transcoders do (SAELens
            ``skip_transcoder``, sparsify ``skip_connection``, Gemma Scope 2 affine skip).
        b_dec_init: How training initialises ``b_dec`` from the first batch:
            ``"geometric_median"``, ``"mean"`` or ``"zeros"``.
        provenance: Where the training activations came from.
    """

    architecture: ClassVar[str] = ""

    d_in: int
    d_latent: int
    d_out: int | None = None
    dtype: str = "float32"
    normalize_decoder: bool = True
    apply_b_dec_to_input: bool = True
    skip_connection: bool = False
    b_dec_init: BDecInit = "geometric_median"
    provenance: Provenance = field(default_factory=Provenance)

    def __post_init__(self) -> None:
        if isinstance(self.provenance, dict):
            self.provenance = Provenance(**self.provenance)
        for name in ("d_in", "d_latent"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.d_out is not None and (not isinstance(self.d_out, int) or self.d_out <= 0):
            raise ConfigError(f"d_out must be a positive integer or None, got {self.d_out!r}")
        if self.d_out is not None and self.d_out != self.d_in and self.apply_b_dec_to_input:
            raise ConfigError(
                f"apply_b_dec_to_input=True needs d_out == d_in, got d_in={self.d_in}, "
                f"d_out={self.d_out}; set apply_b_dec_to_input=False for a transcoder"
            )
        self.dtype = dtype_name(dtype_from_name(self.dtype))
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ConfigError(
                f"b_dec_init must be 'geometric_median', 'mean' or 'zeros', got {self.b_dec_init!r}"
            )

    @property
    def output_width(self) -> int:
        """Width of the reconstruction (``d_out`` for transcoders, else ``d_in``)."""
        return self.d_in if self.d_out is None else self.d_out

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict, with ``architecture`` first."""
        return {"architecture": self.architecture, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DictionaryConfig:
        """Build a config from a dict as written by :meth:`to_dict`.

        Raises:
            ConfigError: on unknown or missing keys, naming them.
        """
        values = {k: v for k, v in values.items() if k != "architecture"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} field(s) {unknown}; known fields are {sorted(known)}"
            )
        try:
            return cls(**values)
        except TypeError as err:  # a missing required field
            raise ConfigError(f"invalid {cls.__name__}: {err}") from err

    def replace(self, **changes: Any) -> DictionaryConfig:
        """Return a copy with some fields changed (configs are never mutated in place)."""
        return dataclasses.replace(self, **changes)


def check_k(k: int, d_latent: int, name: str = "k") -> None:
    """Raise ConfigError unless ``0 < k <= d_latent``."""
    if not isinstance(k, int) or not 0 < k <= d_latent:
        raise ConfigError(f"{name} must be an integer in [1, d_latent={d_latent}], got {k!r}")


def check_non_negative(value: float, name: str) -> None:
    """Raise ConfigError if ``value`` is negative."""
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value!r}")
