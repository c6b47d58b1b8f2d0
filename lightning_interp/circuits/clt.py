"""Cross-layer transcoders (CLTs): per-layer encoders, decoders to every later MLP output.

Definition (Ameisen et al. 2025, "Circuit Tracing", transformer-circuits.pub): features of
layer ``l`` read that layer's MLP input ``x^l``, ``a^l = act(x^l W_enc^l + b_enc^l)``, and
the MLP output of layer ``t`` is reconstructed from the features of every layer up to it,
``y_hat^t = sum_{s <= t} a^s W_dec^{s->t} + b_dec^t``. Training minimises the
reconstruction error summed over output layers plus, for JumpReLU, the paper's sparsity
penalty ``lambda sum_l sum_i tanh(c * ||W_dec,i^l|| * a_i^l)`` where ``W_dec,i^l`` is the
concatenation of feature ``i``'s decoder vectors over every layer it writes to.

Layout and loading follow circuit-tracer's ``CrossLayerTranscoder``
(``circuit_tracer/transcoder/cross_layer_transcoder.py``): one decoder tensor per source
layer, ``W_dec[s]`` of ``[d_latent, n_layers - s, d_out]`` (see
:mod:`~lightning_interp.circuits.clt_config` for the memory this costs); the training
side (Lightning, JumpReLU / TopK / BatchTopK, per-layer standardised MSE) follows the
crosslayer-transcoder trainer (github Goreg12345/crosslayer-transcoder, ``model/clt.py``,
``model/clt_lightning.py``). Deliberate differences: weights are stored in SAELens's
orientation (``W_enc [d_in, d_latent]``, circuit-tracer's is transposed); TopK-style
activations train through the sparse kernels of
:mod:`~lightning_interp.dictionaries.sparse_ops` (only the selected features' decoder rows
are touched) from the width where they beat dense autograd; the activation functions and
losses are the dictionaries' own (imported).

A CLT is a :class:`~lightning_interp.circuits.transcoder_set.TranscoderSet`; with
``cross_layer=False`` it is a set of per-layer transcoders (:meth:`layer_transcoder`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_interp._dtypes import dtype_from_name
from lightning_interp.circuits.clt_config import CLTConfig
from lightning_interp.circuits.clt_output import CLTOutput, auxk_loss, reconstruction_terms
from lightning_interp.dictionaries.cpu_topk import topk_indices
from lightning_interp.dictionaries.jumprelu import _JumpReLU
from lightning_interp.dictionaries.jumprelu_losses import pre_act_penalty, step_l0, tanh_penalty
from lightning_interp.dictionaries.sparse_ops import SparsePattern, gather_encoder, sparse_decode
from lightning_interp.dictionaries.topk import batch_topk, keep_topk
from lightning_interp.errors import (
    ConfigError,
    CorruptFileError,
    DictionaryNotFoundError,
    ShapeMismatchError,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "clt.safetensors"

# Below these sizes the sparse kernels lose to dense autograd (see uses_sparse_path): measured
# on one CPU thread, 3 layers, 256-2048 rows, d_in 16-64, the sparse step took 1.2-1.7x the
# dense one at 8-128 features per layer and 1.0-2.6x at width/k = 8, and won (0.5-0.9x)
# from 256-512 features with width/k >= 64.
SPARSE_MIN_WIDTH = 256
SPARSE_MIN_WIDTH_PER_K = 32


class CrossLayerTranscoder(nn.Module):
    """Encoders per layer, decoders from each layer to itself and every later layer.

    Training works in the units the data module serves (inputs multiplied by
    ``config.input_scales``, targets by ``output_scales``); the
    :class:`~lightning_interp.circuits.transcoder_set.TranscoderSet` methods
    (:meth:`encode`, :meth:`encoder`, :meth:`decoder`, :meth:`output_bias`) take and give
    raw activations, the scales folded in.

    Args:
        config: The :class:`~lightning_interp.circuits.clt_config.CLTConfig`.

    Example:
        >>> clt = CrossLayerTranscoder(CLTConfig(n_layers=3, d_in=8, d_latent=16, k=2,
        ...                                      activation="topk"))
        >>> [tuple(w.shape) for w in clt.W_dec]
        [(16, 3, 8), (16, 2, 8), (16, 1, 8)]
        >>> clt.decoder(2, 1) is None, tuple(clt.decoder(0, 2).shape)
        (True, (16, 8))
    """

    def __init__(self, config: CLTConfig) -> None:
        super().__init__()
        if config.d_in is None:
            raise ConfigError(
                "a CrossLayerTranscoder needs d_in, the width of its input sites; give it, or "
                "train through CrossLayerTranscoderModule on a data module, which fills it"
            )
        self.config = config
        dtype = dtype_from_name(config.dtype)
        d_in, d_out, widths = config.d_in, config.output_width, config.widths
        self.W_enc = nn.ParameterList([torch.empty(d_in, w, dtype=dtype) for w in widths])
        self.b_enc = nn.ParameterList([torch.zeros(w, dtype=dtype) for w in widths])
        self.W_dec = nn.ParameterList(
            [torch.empty(w, config.n_targets(s), d_out, dtype=dtype) for s, w in enumerate(widths)]
        )
        self.b_dec = nn.Parameter(torch.zeros(config.n_layers, d_out, dtype=dtype))
        if config.activation == "jumprelu":
            start = math.log(config.initial_threshold)
            self.log_threshold = nn.ParameterList(
                [torch.full((w,), start, dtype=dtype) for w in widths]
            )
        elif config.activation == "batchtopk":
            # -1 marks "not yet estimated": encoding falls back to batch selection until then.
            self.register_buffer("thresholds", torch.full((config.n_layers,), -1.0))
        #: TopK-style training through the sparse kernels: ``None`` (default) where they pay
        #: off (:meth:`uses_sparse_path`), ``True`` always, ``False`` never (dense autograd).
        self.sparse_training: bool | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Anthropic's initialisation, as the crosslayer-transcoder trainer uses it.

        Uniform encoders in ``+-1/sqrt(d_latent)``, decoders in
        ``+-1/sqrt(n_layers * d_out)``, zero biases.
        """
        cfg = self.config
        for w_enc, b_enc in zip(self.W_enc, self.b_enc, strict=True):
            bound = 1.0 / math.sqrt(w_enc.shape[1])
            w_enc.uniform_(-bound, bound)
            b_enc.zero_()
        bound = 1.0 / math.sqrt(cfg.n_layers * cfg.output_width)
        for w_dec in self.W_dec:
            w_dec.uniform_(-bound, bound)
        self.b_dec.zero_()

    # ------------------------------------------------------------------ TranscoderSet
    @property
    def n_layers(self) -> int:
        """Layers covered."""
        return self.config.n_layers

    @property
    def input_sites(self) -> list[str]:
        """Site each layer's encoder reads."""
        return self.config.sites()[0]

    @property
    def output_sites(self) -> list[str]:
        """Site each layer's reconstruction stands in for."""
        return self.config.sites()[1]

    def _scale(self, which: str, layer: int) -> float:
        scales = getattr(self.config, which)
        return 1.0 if scales is None else float(scales[layer])

    def d_latent(self, layer: int) -> int:
        """Features of ``layer``."""
        return self.config.widths[self._check_layer(layer)]

    def encode(self, layer: int, x: Tensor) -> Tensor:
        """Inference codes of ``layer`` from raw input-site activations ``[..., d_in]``."""
        scaled = x * self._scale("input_scales", self._check_layer(layer))
        return self.activation(layer, self.encode_pre(layer, scaled))

    def encoder(self, layer: int) -> tuple[Tensor, Tensor]:
        """``(W_enc [d_in, d_latent], b_enc)`` for raw inputs (input scale folded in)."""
        layer = self._check_layer(layer)
        return self.W_enc[layer] * self._scale("input_scales", layer), self.b_enc[layer]

    def decoder(self, source: int, target: int) -> Tensor | None:
        """``[d_latent(source), d_out]`` raw-unit writes of ``source`` into ``target``."""
        source, target = self._check_layer(source), self._check_layer(target)
        if target < source or target - source >= self.config.n_targets(source):
            return None
        return self.W_dec[source][:, target - source] / self._scale("output_scales", target)

    def output_bias(self, target: int) -> Tensor:
        """``[d_out]`` raw-unit bias of ``target``'s reconstruction."""
        target = self._check_layer(target)
        return self.b_dec[target] / self._scale("output_scales", target)

    def _check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise ShapeMismatchError(
                f"layer {layer} is outside this CLT's layers 0..{self.n_layers - 1}"
            )
        return layer

    # ------------------------------------------------------------------ encoding
    def threshold(self, layer: int) -> Tensor:
        """JumpReLU thresholds ``[d_latent]`` of ``layer`` (BatchTopK: its one threshold)."""
        if self.config.activation == "jumprelu":
            return self.log_threshold[layer].exp()
        if self.config.activation == "batchtopk":
            return self.thresholds[layer]
        raise ConfigError("a TopK CLT has no thresholds; it keeps the k largest per row")

    def encode_pre(self, layer: int, x: Tensor) -> Tensor:
        """Pre-activations of ``layer`` from activations in training units, ``[..., d_latent]``."""
        w_enc = self.W_enc[layer]
        if x.ndim == 0 or x.shape[-1] != w_enc.shape[0]:
            raise ShapeMismatchError(
                f"layer {layer} of this CLT reads {self.input_sites[layer]!r} with width "
                f"{w_enc.shape[0]}, got shape {tuple(x.shape)}; check the site and model"
            )
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != w_enc.dtype:
            x = x.to(w_enc.dtype)
        pre = torch.addmm(self.b_enc[layer], x.reshape(-1, w_enc.shape[0]), w_enc)
        return pre.view(*x.shape[:-1], w_enc.shape[1])

    def activation(self, layer: int, pre: Tensor) -> Tensor:
        """The inference nonlinearity of ``layer`` (BatchTopK: JumpReLU at its threshold)."""
        kind = self.config.activation
        if kind == "jumprelu":
            return _JumpReLU.apply(pre, self.threshold(layer).to(pre.dtype), self.config.bandwidth)
        if kind == "topk":
            return keep_topk(pre, self.config.k)[0]
        threshold = self.thresholds[layer]
        if threshold < 0:
            return batch_topk(pre.reshape(-1, pre.shape[-1]), self.config.k).view_as(pre)
        return pre * (pre > threshold.to(pre.dtype))

    # ------------------------------------------------------------------ training
    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        """Reconstructions ``[N, n_layers, d_out]`` (training units) from every layer's input."""
        return self.forward_train(inputs).reconstruction

    def forward_train(self, inputs: Sequence[Tensor]) -> CLTOutput:
        """One training forward pass over ``n_layers`` input batches ``[N, d_in]``.

        TopK-style activations use the sparse kernels where :meth:`uses_sparse_path` says
        so; BatchTopK updates its thresholds in training mode.
        """
        if len(inputs) != self.n_layers:
            raise ShapeMismatchError(
                f"a CLT over {self.n_layers} layers needs one input batch per layer, got "
                f"{len(inputs)}"
            )
        rows = inputs[0].reshape(-1, inputs[0].shape[-1]).shape[0]
        reconstruction = self.b_dec.unsqueeze(0).expand(rows, -1, -1).clone()
        out = CLTOutput(reconstruction)
        for source, x in enumerate(inputs):
            x = x.reshape(-1, x.shape[-1])
            contribution = self._encode_decode(source, x, out)
            width = self.config.n_targets(source)
            reconstruction[:, source : source + width] += contribution.view(rows, width, -1)
        return out

    def uses_sparse_path(self, layer: int) -> bool:
        """Whether a training step encodes and decodes ``layer`` through the sparse kernels.

        Only TopK-style activations with gradients enabled can. With ``sparse_training``
        left at ``None`` they do from :data:`SPARSE_MIN_WIDTH` features per layer and
        :data:`SPARSE_MIN_WIDTH_PER_K` features per active one: below that the dense matmuls
        are cheaper than the sparse kernels' per-call cost (a dozen gathers, sorts and CSR
        products per layer, some of which open a thread pool region even for 8 features,
        which on a busy 2-core machine made the sparse step 3-12x slower). Both paths give the
        same losses and gradients within float tolerance.
        """
        cfg = self.config
        if cfg.activation == "jumprelu" or not torch.is_grad_enabled():
            return False
        if self.sparse_training is not None:
            return bool(self.sparse_training)
        width = cfg.widths[self._check_layer(layer)]
        return width >= SPARSE_MIN_WIDTH and width >= SPARSE_MIN_WIDTH_PER_K * cfg.k

    def _encode_decode(self, source: int, x: Tensor, out: CLTOutput) -> Tensor:
        w_dec = self.W_dec[source].view(self.W_dec[source].shape[0], -1)
        kind = self.config.activation
        if not self.uses_sparse_path(source):
            pre = self.encode_pre(source, x)
            if kind == "batchtopk" and self.training:
                codes = batch_topk(pre, self.config.k)
                self._update_threshold(source, codes.detach()[codes.detach() > 0])
            else:
                codes = self.activation(source, pre)
            out.add_dense(pre, codes)
            return codes.to(w_dec.dtype) @ w_dec
        with torch.no_grad():
            pre = self.encode_pre(source, x)
            if kind == "topk":
                indices = topk_indices(pre, self.config.k)  # ascending (cpu_topk.py)
                pattern = SparsePattern.from_topk(indices, pre.shape[1], presorted=True)
            else:
                flat = torch.relu(pre).flatten()
                chosen = flat.topk(min(self.config.k * pre.shape[0], flat.numel()), sorted=False)
                pattern = SparsePattern.from_flat(chosen.indices, pre.shape[0], pre.shape[1])
        values = torch.relu(self._gather(source, x, pre, pattern))
        if kind == "batchtopk" and self.training:
            self._update_threshold(source, values.detach()[values.detach() > 0])
        out.add_sparse(pre, pattern, values)
        return sparse_decode(values, w_dec, pattern)

    def _gather(self, layer: int, x: Tensor, pre: Tensor, pattern: SparsePattern) -> Tensor:
        w_enc = self.W_enc[layer]
        return gather_encoder(x.to(w_enc.dtype), None, w_enc, self.b_enc[layer], pre, pattern)

    @torch.no_grad()
    def _update_threshold(self, layer: int, active: Tensor) -> None:
        # BatchTopK's inference threshold: EMA of the smallest selected activation.
        if active.numel() == 0:
            return
        smallest, threshold = active.min().float(), self.thresholds[layer]
        m = self.config.threshold_momentum
        threshold.copy_(smallest if threshold < 0 else m * threshold + (1 - m) * smallest)

    def decoder_norms(self, layer: int) -> Tensor:
        """Norm of each feature's decoder concatenated over the layers it writes, ``[d_latent]``."""
        return self.W_dec[layer].flatten(1).norm(dim=1)

    def loss(
        self,
        inputs: Sequence[Tensor],
        targets: Sequence[Tensor],
        out: CLTOutput,
        *,
        sparsity_scale: float = 1.0,
        dead_masks: Sequence[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Loss terms of one batch; ``"loss"`` is the total to minimise.

        Returns:
            ``"reconstruction_loss"`` (see ``config.reconstruction_loss``), ``"fvu/<t>"``
            per output layer (logged), and for JumpReLU ``"sparsity_loss"`` (the tanh
            penalty), ``"l0"`` and optionally ``"pre_act_loss"``; for TopK-style
            ``"auxk_loss"`` when ``dead_masks`` name dead features.
        """
        cfg = self.config
        targets = [t.reshape(-1, t.shape[-1]).float() for t in targets]
        terms = reconstruction_terms(out.reconstruction.float(), targets, cfg.reconstruction_loss)
        if cfg.activation == "jumprelu":
            penalty, l0, pre_act = 0.0, 0.0, 0.0
            for layer in range(cfg.n_layers):
                norms, pre = self.decoder_norms(layer), out.pre_activations[layer]
                threshold = self.threshold(layer).to(pre.dtype)
                penalty = penalty + tanh_penalty(out.codes(layer), norms, cfg.tanh_scale).mean()
                l0 = l0 + step_l0(pre, threshold, cfg.bandwidth).mean().detach()
                if cfg.pre_act_loss_coefficient is not None and dead_masks is not None:
                    pre_act = pre_act + pre_act_penalty(pre, threshold, dead_masks[layer], norms)
            terms["sparsity_loss"] = cfg.sparsity_coefficient * sparsity_scale * penalty
            terms["l0"] = torch.as_tensor(l0)
            if cfg.pre_act_loss_coefficient is not None:
                terms["pre_act_loss"] = cfg.pre_act_loss_coefficient * torch.as_tensor(pre_act)
        elif dead_masks is not None and cfg.aux_coefficient > 0:
            residual = torch.stack(targets, 1) - out.reconstruction.float().detach()
            terms["auxk_loss"] = cfg.aux_coefficient * auxk_loss(
                self, inputs, out, residual, dead_masks
            )
        terms["loss"] = sum(v for k, v in terms.items() if k.endswith("loss"))
        return terms

    # ------------------------------------------------------------------ per-layer view
    def layer_transcoder(self, layer: int) -> nn.Module:
        """Layer ``layer`` as a per-layer transcoder (a registered dictionary).

        Exact for a PLT (``cross_layer=False``): ``t(x) == clt(...)[:, layer]``. For a CLT
        the features' writes to later layers are dropped, so refused.

        Raises:
            ConfigError: this is a cross-layer transcoder.
        """
        from lightning_interp.circuits.clt_plt import layer_transcoder

        return layer_transcoder(self, self._check_layer(layer))

    # ------------------------------------------------------------------ files
    def save(self, folder: str | PathLike[str]) -> Path:
        """Write ``config.json`` and ``clt.safetensors`` (the state dict, bit for bit)."""
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "lightning_interp.clt"})
        return path

    @classmethod
    def load(
        cls, folder: str | PathLike[str], *, device: str | torch.device = "cpu"
    ) -> CrossLayerTranscoder:
        """Read a folder written by :meth:`save` (in eval mode).

        Raises:
            DictionaryNotFoundError: a file is missing.
            CorruptFileError: the weights do not match the config.
        """
        path = Path(folder)
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (path / n).is_file()]
        if missing:
            raise DictionaryNotFoundError(
                f"{path} lacks {missing}; a CLT folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                f"(CrossLayerTranscoder.save), or read another layout with read_clt_folder"
            )
        config = CLTConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
        with torch.device("meta"):
            clt = cls(config)
        tensors = load_file(str(path / WEIGHTS_NAME), device=str(device))
        expected = {k: tuple(v.shape) for k, v in clt.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != found:
            wrong = sorted(set(expected.items()) ^ set(found.items()))[:4]
            raise CorruptFileError(
                f"{path / WEIGHTS_NAME} does not match {CONFIG_NAME} (e.g. {wrong}); the "
                f"files come from different CLTs, re-save them together"
            )
        clt.load_state_dict(tensors, strict=True, assign=True)
        return clt.eval()
