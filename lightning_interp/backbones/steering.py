"""Steer, clamp and ablate dictionary latents at a site while a backbone runs or generates.

Three edits, all applied at every position the site's hook sees:

- **add** ``{latent: scale}``: ``x + scale * W_dec[latent]`` (optionally with the row
  normalised to unit length). This is the steering convention of SAELens's steering
  tutorial (``steering_vector = coefficient * sae.W_dec[feature]`` added to the hook's
  activations) and of Neuronpedia's steer endpoint (``neuronpedia_inference/endpoints/steer/
  completion.py``: ``SIMPLE_ADDITIVE`` adds ``strength * W_dec[index]`` to every position,
  dividing by the row's norm when ``normalize_steering`` is set).
- **clamp** ``{latent: value}``: encode the site, set that latent's code to ``value`` and
  add ``decode(clamped) - decode(original)``, so the dictionary's reconstruction error stays
  in the activation. This is what SAELens computes when a latent is edited on
  ``hook_sae_acts_post`` with ``use_error_term=True`` (``SAE.forward`` adds
  ``x - decode(encode(x))`` back to the edited reconstruction), and how Anthropic clamped
  features in "Scaling Monosemanticity" (2024): edit the feature, keep the SAE error term.
- **ablate** ``[latents]``: clamp to 0 (removes ``code * W_dec[latent]`` where the latent
  fires, changes nothing where it does not).

For an affine decoder (``codes @ W_dec + b_dec``: every architecture here and in SAELens)
``decode(clamped) - decode(original) = (value - code) @ W_dec[latent]``, which is what is
computed: cheaper and free of the cancellation a difference of two reconstructions has.

The edit is one :meth:`~lightning_interp.backbones.Backbone.splice` hook, so it applies to
plain forwards (scoring) and to ``model.generate``: with a KV cache the hook sees the prompt
on the first step and only the new token afterwards, and since every edit is per position,
each generated token is edited exactly once, as a cache-free run would edit it.

Transcoders (a dictionary reading one site and writing another) are out of scope for clamp
and ablate, which need the code of the activation being written; ``add`` only uses decoder
rows, so it works with a transcoder at its output site.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_interp.backbones.devices import to_device
from lightning_interp.errors import ConfigError, ShapeMismatchError

__all__ = ["SteeringEdit", "steer"]


class SteerableDictionary(Protocol):
    """What steering needs of a dictionary (any object with these works).

    Attributes:
        W_dec: Decoder rows ``[d_latent, d_out]``, one direction per latent.
    """

    W_dec: Tensor

    def encode(self, x: Tensor) -> Tensor:
        """Codes ``[..., d_latent]`` of activations ``[..., d_in]`` (needed by clamp/ablate)."""
        ...


class SteeringEdit:
    """The function a steering splice applies to a site's activation.

    Built once when the ``with`` block opens (latents checked, the added vector summed);
    called on every forward with the activation ``[..., width]`` and returning the edited
    activation in the activation's dtype and on its device. The dictionary is used on its
    own device and in its own dtype (a float64 dictionary on a float32 model, or a CPU
    dictionary on a GPU model, works), like
    :func:`~lightning_interp.backbones.devices.follow_module`.

    Args:
        dictionary: Any object with ``W_dec [d_latent, d_out]`` (and ``encode`` for clamp or
            ablate), e.g. a :class:`~lightning_interp.dictionaries.Dictionary`.
        add: ``{latent: scale}``: add ``scale * W_dec[latent]``.
        clamp: ``{latent: value}``: set the latent's code to ``value``, error term kept.
        ablate: Latents clamped to 0.
        normalize: Add unit-norm decoder rows (Neuronpedia's ``normalize_steering``).

    Raises:
        ConfigError: a latent is out of range, listed twice between clamp and ablate, a
            scale or value is not finite, the object has no ``W_dec`` (or no ``encode`` when
            clamping), or clamping is asked of a transcoder.
    """

    def __init__(
        self,
        dictionary: SteerableDictionary | Any,
        add: Mapping[int, float] | None = None,
        clamp: Mapping[int, float] | None = None,
        ablate: Iterable[int] = (),
        *,
        normalize: bool = False,
    ) -> None:
        weight = getattr(dictionary, "W_dec", None)
        if not isinstance(weight, Tensor) or weight.ndim != 2:
            raise ConfigError(
                f"steering needs a dictionary with a 2-D W_dec [d_latent, d_out]; got "
                f"{type(dictionary).__name__}; pass a Dictionary or an object with W_dec"
            )
        self.dictionary = dictionary
        self.d_latent, self.width = weight.shape
        add = dict(add or {})
        targets = dict(clamp or {})
        for latent in ablate:
            if latent in targets:
                raise ConfigError(
                    f"latent {latent} is both clamped and ablated; keep it in one of the two"
                )
            targets[latent] = 0.0
        for latent, value in [*add.items(), *targets.items()]:
            self._check_latent(latent, value)
        if targets and not callable(getattr(dictionary, "encode", None)):
            raise ConfigError(
                f"clamp and ablate encode the site, but {type(dictionary).__name__} has no "
                f"encode method; use add, or pass a dictionary with encode"
            )
        if targets and _is_transcoder(dictionary):
            raise ConfigError(
                "clamp and ablate are not supported for transcoders (the code comes from "
                "another site); use add at the output site, or Backbone.transcode"
            )
        with torch.no_grad():
            weight = weight.detach()
            self.vector = self._added_vector(weight, add, normalize)
            self.latents = torch.tensor(sorted(targets), dtype=torch.long, device=weight.device)
            self.values = torch.tensor(
                [targets[i] for i in sorted(targets)], dtype=weight.dtype, device=weight.device
            )
            self.rows = weight[self.latents]
        self.device, self.dtype = weight.device, weight.dtype

    @property
    def is_empty(self) -> bool:
        """No latent is added, clamped or ablated: the edit would change nothing."""
        return self.vector is None and self.latents.numel() == 0

    def _check_latent(self, latent: Any, value: Any) -> None:
        if isinstance(latent, bool) or not isinstance(latent, int):
            raise ConfigError(f"latent indices must be ints, got {latent!r}")
        if not 0 <= latent < self.d_latent:
            raise ConfigError(
                f"latent {latent} is out of range for a dictionary of {self.d_latent} latents "
                f"(valid 0..{self.d_latent - 1})"
            )
        if not math.isfinite(float(value)):
            raise ConfigError(f"latent {latent} has a non-finite scale or value {value!r}")

    @staticmethod
    def _added_vector(weight: Tensor, add: dict[int, float], normalize: bool) -> Tensor | None:
        if not add:
            return None
        latents = torch.tensor(list(add), dtype=torch.long, device=weight.device)
        scales = torch.tensor(list(add.values()), dtype=weight.dtype, device=weight.device)
        rows = weight[latents]
        if normalize:
            norms = rows.norm(dim=1, keepdim=True)
            if bool((norms == 0).any()):
                raise ConfigError("cannot normalise a zero decoder row; steer without normalize")
            rows = rows / norms
        return scales @ rows

    def delta(self, activation: Tensor) -> Tensor:
        """What the edit adds to ``activation`` (broadcastable), on the dictionary's placement."""
        change: Tensor | None = None
        if self.latents.numel():
            x = to_device(activation, self.device)
            codes = self.dictionary.encode(x if x.dtype == self.dtype else x.to(self.dtype))
            change = (self.values - codes[..., self.latents]) @ self.rows
        if self.vector is not None:
            change = self.vector if change is None else change + self.vector
        if change is None:
            return torch.zeros((), dtype=self.dtype, device=self.device)
        return change

    def __call__(self, activation: Tensor) -> Tensor:
        """``activation`` plus the edit, in the activation's dtype and on its device.

        The width was checked against the site when the ``with`` block opened.
        """
        change = to_device(self.delta(activation), activation.device)
        return activation + change.to(activation.dtype)


def _is_transcoder(dictionary: Any) -> bool:
    provenance = getattr(getattr(dictionary, "config", None), "provenance", None)
    site_out = getattr(provenance, "site_out", None)
    if site_out is not None and site_out != getattr(provenance, "site", None):
        return True
    w_enc = getattr(dictionary, "W_enc", None)
    return isinstance(w_enc, Tensor) and w_enc.shape[0] != dictionary.W_dec.shape[1]


@contextlib.contextmanager
def steer(
    backbone: Any,
    site: str,
    dictionary: SteerableDictionary | Any,
    *,
    add: Mapping[int, float] | None = None,
    clamp: Mapping[int, float] | None = None,
    ablate: Iterable[int] = (),
    normalize: bool = False,
) -> Iterator[Any]:
    """Add, clamp or ablate latents of ``dictionary`` at ``site`` inside the ``with`` block.

    Every forward inside the block (``backbone(...)``, ``backbone.model(...)``,
    ``backbone.model.generate(...)``) runs with the edit at every position, prompt and
    generated tokens alike; the hook is removed when the block ends, also on an exception.
    An empty edit installs no hook. See the module docstring for the three operations and
    the references (SAELens, Neuronpedia, Anthropic) they follow.

    Args:
        backbone: A :class:`~lightning_interp.backbones.Backbone`.
        site: One site name (or raw module path) where the dictionary reads and writes.
        dictionary: Any object with ``W_dec [d_latent, width]`` (and ``encode`` for clamp or
            ablate), on any device and in any dtype.
        add: ``{latent: scale}``: add ``scale * W_dec[latent]`` to the activation.
        clamp: ``{latent: value}``: add ``(value - code) * W_dec[latent]``, i.e.
            ``decode(clamped) - decode(original)``.
        ablate: Latents clamped to 0.
        normalize: Use unit-norm decoder rows for ``add``.

    Yields:
        The backbone.

    Raises:
        ConfigError: ``site`` names several sites, or the edit is invalid (see
            :class:`SteeringEdit`).
        ShapeMismatchError: The decoder rows are not as wide as the site.

    Example:
        >>> import torch, transformers
        >>> from lightning_interp.backbones import Backbone
        >>> model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        ...     n_layer=2, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0))
        >>> backbone, ids = Backbone(model), torch.tensor([[1, 2, 3]])
        >>> sae = torch.nn.Module()
        >>> sae.W_dec = torch.nn.Parameter(torch.randn(8, 16))
        >>> clean = backbone.capture(ids, "layers.0.resid_post")["layers.0.resid_post"]
        >>> with steer(backbone, "layers.0.resid_post", sae, add={3: 2.0}):
        ...     steered = backbone.capture(ids, "layers.0.resid_post")["layers.0.resid_post"]
        >>> torch.allclose(steered - clean, 2.0 * sae.W_dec[3].detach(), atol=1e-5)
        True
    """
    sites = backbone.resolve_sites(site)
    if len(sites) != 1:
        raise ConfigError(
            f"steer edits one site; {site!r} names {len(sites)}: {sites}; give one site name"
        )
    edit = SteeringEdit(dictionary, add, clamp, ablate, normalize=normalize)
    width = backbone.site_width(sites[0])
    if edit.width != width:
        raise ShapeMismatchError(
            f"the dictionary's decoder rows are {edit.width} wide but {sites[0]!r} is {width} "
            f"wide; steer at the site the dictionary was trained on"
        )
    if edit.is_empty:
        yield backbone
        return
    with backbone.splice(sites[0], edit):
        yield backbone
