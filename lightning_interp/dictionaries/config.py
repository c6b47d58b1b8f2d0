"""Typed configuration dataclasses shared by every dictionary architecture.

Every field is checked against its type hint when a config is built
(:func:`~lightning_interp._validation.validate_fields`),
so a value read from JSON, YAML or a checkpoint's hyper-parameters that has the wrong type
(``"false"`` for a bool, ``true`` for an int, a string for the provenance) is refused with a
one-line :class:`~lightning_interp.errors.ConfigTypeError` naming the field and the fix. The
check is driven by the dataclass fields, so a new architecture's config gets it for free.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from lightning_interp._dtypes import dtype_from_name, dtype_name
from lightning_interp._validation import dataclass_from_dict, describe, validate_fields
from lightning_interp.errors import ConfigError, ConfigTypeError

BDecInit = Literal["geometric_median", "mean", "zeros"]

#: Upper bound on a config's weight count (W_enc, W_dec, W_skip and biases): 2**40, about
#: 4.4 TB in float32, far beyond any published SAE (16M latents on a 4096-wide model would be
#: 1.4e11). Larger values are refused at validation, before anything is allocated; they come
#: from typos or from hostile checkpoint hyper-parameters, not from real dictionaries.
MAX_PARAMETERS = 2**40


def check_scale(value: float, name: str) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number > 0.

    A scale multiplies activations; folding it into weights divides by it, so 0, a negative
    or a non-finite scale would write inf or sign-flipped weights.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigTypeError(f"{name} must be a number, got {describe(value)}")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(
            f"{name} must be a finite number > 0 (the factor activations were multiplied by), "
            f"got {value!r}; record the real scale, or 1.0 for unscaled activations"
        )


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
            unless the scale has been folded into its weights. Must be finite and > 0.
        activation_scale_out: The factor a transcoder's targets (its output site) were
            multiplied by; ``None`` means the same as ``activation_scale`` (an autoencoder
            reads and writes one site). Must be finite and > 0 when given.
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
    activation_scale_out: float | None = None
    trained_as: str | None = None
    revision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_fields(self)
        check_scale(self.activation_scale, "provenance.activation_scale")
        if self.activation_scale_out is not None:
            check_scale(self.activation_scale_out, "provenance.activation_scale_out")

    @property
    def output_scale(self) -> float:
        """The factor the targets were multiplied by (``activation_scale_out`` if set)."""
        out = self.activation_scale_out
        return self.activation_scale if out is None else out


@dataclass(kw_only=True)
class DictionaryConfig:
    """Fields common to every dictionary architecture.

    Every field is checked against its type hint (see :func:`validate_fields`), then the
    values are range-checked; subclasses add their own range checks after calling
    ``super().__post_init__()``.

    Attributes:
        d_in: Width of the input activations. ``None`` (a recipe may leave it out) until a
            training module fills it from its data module's site widths; a dictionary is
            only built with it set.
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

    d_in: int | None = None
    d_latent: int
    d_out: int | None = None
    dtype: str = "float32"
    normalize_decoder: bool = True
    apply_b_dec_to_input: bool = True
    skip_connection: bool = False
    b_dec_init: BDecInit = "geometric_median"
    provenance: Provenance = field(default_factory=Provenance)

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, str):
            # A torch.dtype is accepted for convenience and stored by name; anything else
            # gets dtype_from_name's error, which lists the dtypes a dictionary can hold.
            self.dtype = dtype_name(dtype_from_name(self.dtype))
        validate_fields(self)
        for name in ("d_in", "d_latent"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.d_out is not None and self.d_out <= 0:
            raise ConfigError(f"d_out must be a positive integer or None, got {self.d_out!r}")
        unsized = self.d_in is None  # widths still to come from the data
        if not unsized and self.d_out not in (None, self.d_in) and self.apply_b_dec_to_input:
            raise ConfigError(
                f"apply_b_dec_to_input=True needs d_out == d_in, got d_in={self.d_in}, "
                f"d_out={self.d_out}; set apply_b_dec_to_input=False for a transcoder"
            )
        provenance = self.provenance
        if self.apply_b_dec_to_input and provenance.output_scale != provenance.activation_scale:
            # b_dec is both the input's centre and the output's bias, so both sides must
            # share one scale for it to be folded (and to mean the same thing on both sides).
            raise ConfigError(
                f"apply_b_dec_to_input=True uses b_dec on the input and the output, so they "
                f"need one scale, got provenance.activation_scale={provenance.activation_scale} "
                f"and activation_scale_out={provenance.activation_scale_out}; set "
                f"apply_b_dec_to_input=False for a transcoder with two scales"
            )
        self.dtype = dtype_name(dtype_from_name(self.dtype))
        parameters = 0 if unsized else self.weight_count()
        if parameters > MAX_PARAMETERS:
            raise ConfigError(
                f"d_in={self.d_in}, d_latent={self.d_latent}, d_out={self.d_out} give "
                f"{parameters:.3g} weights, above the limit of {MAX_PARAMETERS:.3g}; check the "
                f"sizes (a checkpoint's hyper-parameters may be corrupt)"
            )

    @property
    def output_width(self) -> int:
        """Width of the reconstruction (``d_out`` for transcoders, else ``d_in``)."""
        return self.d_in if self.d_out is None else self.d_out

    def weight_count(self) -> int:
        """Number of weights every architecture allocates from this config.

        ``W_enc``, ``W_dec``, ``b_dec``, one latent-sized bias and ``W_skip`` if configured:
        the tensors whose size grows with the widths. Architectures add at most a few
        ``[d_latent]`` vectors to it. Computed from integers, so it is safe on any sizes.
        """
        d_in, d_latent, d_out = self.d_in, self.d_latent, self.output_width
        skip = d_in * d_out if self.skip_connection else 0
        return d_latent * (d_in + d_out) + d_latent + d_out + skip

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict, with ``architecture`` first."""
        return {"architecture": self.architecture, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DictionaryConfig:
        """Build a config from a dict as written by :meth:`to_dict`.

        Raises:
            ConfigTypeError: ``values`` is not a mapping, or a field has the wrong type.
            ConfigError: on unknown or missing keys, naming them, or an invalid value.
        """
        if not isinstance(values, Mapping):
            raise ConfigTypeError(
                f"a {cls.__name__} is read from a mapping of its fields, got {describe(values)}"
            )
        values = {k: v for k, v in values.items() if k != "architecture"}
        return dataclass_from_dict(cls, values)

    def replace(self, **changes: Any) -> DictionaryConfig:
        """Return a copy with some fields changed (configs are never mutated in place)."""
        return dataclasses.replace(self, **changes)


def check_k(k: int, d_latent: int, name: str = "k") -> None:
    """Raise ConfigError unless ``0 < k <= d_latent``."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= d_latent:
        raise ConfigError(f"{name} must be an integer in [1, d_latent={d_latent}], got {k!r}")


def check_non_negative(value: float, name: str) -> None:
    """Raise ConfigError if ``value`` is negative."""
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value!r}")


def _memory_bytes(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes, or ``None`` where it cannot be known."""
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # not a POSIX system
            return None
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    return None


def check_fits_in_memory(config: DictionaryConfig, architecture: str = "dictionary") -> None:
    """Refuse, before allocating, a dictionary whose weights exceed its device's memory.

    The device is where factory functions allocate now (``torch.get_default_device()``,
    which honours ``with torch.device(...)``); on the meta device nothing is allocated and
    nothing is checked. The count comes from :meth:`DictionaryConfig.weight_count`, from
    integers, so absurd sizes (e.g. ``d_latent: 10**12`` in a checkpoint) fail here, at
    once, instead of exhausting the machine.

    Raises:
        ConfigError: the weights would need more bytes than the device has.
    """
    if config.d_in is None:
        raise ConfigError(
            f"a {architecture} needs d_in, the width of its input activations; give it, or "
            f"train through DictionaryModule on a data module, which fills it from the site"
        )
    device = torch.get_default_device()
    if device.type == "meta":
        return
    limit = _memory_bytes(device)
    dtype = dtype_from_name(config.dtype)
    needed = config.weight_count() * dtype.itemsize
    if limit is not None and needed > limit:
        raise ConfigError(
            f"a {architecture} with d_in={config.d_in}, d_latent={config.d_latent}, "
            f"d_out={config.output_width} needs {needed / 1e9:.3g} GB of {config.dtype} "
            f"weights, more than the {limit / 1e9:.3g} GB of {device.type} memory here; check "
            f"the sizes (a checkpoint's hyper-parameters may be corrupt) or use a larger machine"
        )
