"""Variational TopK SAE (Baker et al. 2025, "Analysis of Variational Sparse Autoencoders").

The encoder gives each latent a Gaussian posterior ``N(mu, sigma^2)``: ``mu = relu(pre)`` from
the usual encoder and ``log sigma^2`` from a second one. Training samples
``z = mu + sigma * eps`` (the reparameterisation trick), keeps the ``k`` entries of largest
``|z|`` with their signs, decodes them, and adds ``kl_coefficient`` times the closed-form
``KL(N(mu, sigma^2) || N(0, 1))`` summed over every latent. Inference uses the mean: the codes
are those of a TopK SAE with the mean encoder, which is what :meth:`to_inference` exports.

Reference: the authors' code, ZachData/SPAR-Variational-Sparse-Autoencoders,
``dictionary_learning/trainers/vsae_topk.py`` (``VSAETopK`` with ``var_flag=1``,
``VSAETopKTrainer``). Followed: ReLU on the mean, TopK on ``|z|`` keeping signed values,
log-variance clamped to ``[-6, 2]`` when sampling and in the KL, log-variance bias initialised
to ``log_var_init = -2``, KL over all latents averaged over rows, AuxK for dead latents, the
mean (no sampling) outside training. Deviations, on purpose:

- the log-variance weights start at zero (the reference draws them at random), so every
  latent starts with the same posterior variance ``exp(log_var_init)`` whatever the scale of
  the activations;
- the KL does not clamp the mean to ``[-10, 10]`` as the reference does: it is the exact
  closed form, whose gradient does not vanish for large means;
- the KL is ramped by the training module's sparsity warm-up (the reference has its own
  ``kl_warmup_steps``, 10% of training by default);
- AuxK ranks dead latents by their mean pre-activation (the reference: by ``|z|``).

The paper reports many more dead latents than a TopK SAE at equal ``k`` (Pythia-70M residual
stream: 5-37% of latents alive against 81-98%); ``benchmarks/variational_dead_latents.py``
measures the same comparison on planted synthetic data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_interp.dictionaries.base import Dictionary, DictionaryOutput
from lightning_interp.dictionaries.config import Provenance, check_non_negative
from lightning_interp.dictionaries.registry import register_dictionary
from lightning_interp.dictionaries.topk import TopKConfig, TopKSAE, keep_topk
from lightning_interp.errors import ConfigError

#: The reference's clamp of the log-variance, ``sigma^2`` in ``[0.0025, 7.4]``: it bounds the
#: noise and keeps ``exp`` finite while the variance encoder is still wild.
LOG_VAR_MIN, LOG_VAR_MAX = -6.0, 2.0


@dataclass(kw_only=True)
class VariationalTopKConfig(TopKConfig):
    """Config of a variational TopK SAE.

    Attributes:
        kl_coefficient: Weight of the KL term (``kl_coeff`` in the reference; the paper's
            runs use 1.0). Scaled by the training module's sparsity warm-up.
        log_var_init: Initial log-variance of every latent's posterior (the reference's
            ``log_var_init``).
    """

    kl_coefficient: float = 1.0
    log_var_init: float = -2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative(self.kl_coefficient, "kl_coefficient")
        if not LOG_VAR_MIN <= self.log_var_init <= LOG_VAR_MAX:
            raise ConfigError(
                f"log_var_init must be in [{LOG_VAR_MIN}, {LOG_VAR_MAX}] (the clamp of the "
                f"log-variance), got {self.log_var_init!r}; -2.0 is the reference's value"
            )

    def weight_count(self) -> int:
        """The base count plus the log-variance encoder, ``d_in * d_latent + d_latent``."""
        return super().weight_count() + self.d_latent * (self.d_in + 1)


def reparameterize(mean: Tensor, log_var: Tensor, noise: Tensor | None = None) -> Tensor:
    """``mean + exp(log_var / 2) * noise``, differentiable in ``mean`` and ``log_var``.

    Args:
        mean: Posterior means.
        log_var: Posterior log-variances, clamped to ``[LOG_VAR_MIN, LOG_VAR_MAX]``.
        noise: Standard normal draws of the same shape; drawn here if ``None``.
    """
    std = (0.5 * log_var.clamp(LOG_VAR_MIN, LOG_VAR_MAX)).exp()
    return mean + std * (torch.randn_like(std) if noise is None else noise)


def gaussian_kl(mean: Tensor, log_var: Tensor) -> Tensor:
    """``KL(N(mean, exp(log_var)) || N(0, 1))`` summed over the last dimension.

    The closed form ``0.5 * sum(mean^2 + exp(log_var) - 1 - log_var)``, with the
    log-variance clamped as when sampling.
    """
    log_var = log_var.clamp(LOG_VAR_MIN, LOG_VAR_MAX)
    return 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).sum(-1)


def keep_top_magnitude(z: Tensor, k: int) -> Tensor:
    """Keep the ``k`` entries of largest ``|z|`` per row, with their signs; zero the rest."""
    indices = z.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(z).scatter(-1, indices, z.gather(-1, indices))


# A small initial posterior variance: with the reference's exp(-2) the sampling noise rivals
# the planted magnitudes and recovery varies with the seed (cosine 0.85-0.98, FVU 0.14-0.26).
@register_dictionary(
    "variational_topk",
    example_kwargs={"k": 4, "kl_coefficient": 1e-3, "log_var_init": -4.0},
    recovery_fvu=0.15,
)
class VariationalTopKSAE(TopKSAE):
    """Variational TopK SAE: Gaussian posteriors, sampled in training, the mean at inference.

    Tensors beyond a TopK SAE's: ``W_enc_log_var [d_in, d_latent]`` and ``b_enc_log_var
    [d_latent]``, the log-variance encoder (it reads the same centred input as ``W_enc``).
    There is no sparse training path: the KL reads every latent's mean and variance, so the
    encoder's backward pass is dense whatever the decoder does.

    Example:
        >>> from lightning_interp import create_dictionary
        >>> sae = create_dictionary("variational_topk", d_in=8, d_latent=32, k=3).eval()
        >>> x = torch.randn(4, 8)
        >>> torch.equal(sae.forward_train(x).codes, sae.to_inference().encode(x))
        True
    """

    config_class = VariationalTopKConfig
    config: VariationalTopKConfig

    def __init__(self, config: VariationalTopKConfig) -> None:
        # Dictionary's constructor, not TopK's: TopK's adds the sparse-path switch, and this
        # architecture trains densely only.
        Dictionary.__init__(self, config)
        dtype = self.dtype
        self.W_enc_log_var = nn.Parameter(torch.empty(config.d_in, config.d_latent, dtype=dtype))
        self.b_enc_log_var = nn.Parameter(torch.empty(config.d_latent, dtype=dtype))
        self._reset_log_var()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """TopK's initialisation; every posterior variance starts at ``exp(log_var_init)``."""
        super().reset_parameters()
        if hasattr(self, "W_enc_log_var"):  # absent while the base constructor runs
            self._reset_log_var()

    @torch.no_grad()
    def _reset_log_var(self) -> None:
        self.W_enc_log_var.zero_()
        self.b_enc_log_var.fill_(self.config.log_var_init)

    def encode_log_var(self, x: Tensor) -> Tensor:
        """Posterior log-variances (before clamping), ``[..., d_latent]``."""
        centred = self.encoder_input(self._prepare_input(x))
        return centred @ self.W_enc_log_var + self.b_enc_log_var

    def forward_train(self, x: Tensor) -> DictionaryOutput:
        """Sample, keep the top ``k`` by magnitude and decode; the mean outside training.

        ``pre_activations`` are the mean encoder's; ``extras["log_var"]`` holds the
        log-variances the KL reads.
        """
        pre = self.encode_pre(x).reshape(-1, self.d_latent)
        log_var = self.encode_log_var(x).reshape(-1, self.d_latent)
        if self.training:
            codes = keep_top_magnitude(reparameterize(torch.relu(pre), log_var), self.config.k)
        else:
            codes = keep_topk(pre, self.config.k)[0]
        reconstruction = self.with_skip(x, self.decode(codes))
        return DictionaryOutput(reconstruction, codes, pre, {"log_var": log_var})

    def sparsity_losses(
        self,
        x: Tensor,
        out: DictionaryOutput,
        *,
        target: Tensor,
        sparsity_scale: float,
        dead_mask: Tensor | None,
    ) -> dict[str, Tensor]:
        """AuxK (as TopK) and the KL of the posteriors to a standard normal."""
        terms = super().sparsity_losses(
            x, out, target=target, sparsity_scale=sparsity_scale, dead_mask=dead_mask
        )
        # At least float32 (under autocast): a bf16 sum over every latent loses small terms.
        wide = torch.promote_types(out.pre_activations.dtype, torch.float32)
        mean = torch.relu(out.pre_activations.to(wide))
        kl = gaussian_kl(mean, out.extras["log_var"].to(wide)).mean()
        terms["kl"] = kl.detach()
        terms["kl_loss"] = self.config.kl_coefficient * sparsity_scale * kl
        return terms

    @torch.no_grad()
    def fold_scales_(self, scale_in: float, scale_out: float) -> None:
        """TopK's folding; the log-variance encoder reads the input, so it takes ``scale_in``."""
        super().fold_scales_(scale_in, scale_out)
        self.W_enc_log_var.mul_(scale_in)

    def to_inference(self) -> Dictionary:
        """A :class:`TopKSAE` with the mean encoder: the codes the mean gives, exactly."""
        cfg = self.config
        names = {f.name for f in dataclasses.fields(TopKConfig)} - {"provenance"}
        provenance = Provenance(**{**vars(cfg.provenance), "trained_as": self.architecture})
        topk = TopKSAE(
            TopKConfig(**{name: getattr(cfg, name) for name in names}, provenance=provenance)
        ).to(device=self.device, dtype=self.dtype)
        weights = self.export_tensors()
        topk.import_tensors({k: v for k, v in weights.items() if "log_var" not in k})
        return topk
