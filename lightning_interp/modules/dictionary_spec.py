"""Dictionaries as training modules receive them: built, or waiting for the data's widths.

A recipe need not type ``d_in``: the config may leave it ``None`` and the training module
fills it at setup (``configure_model``, which Lightning runs after the data module's
``setup`` and before it restores a checkpoint) from its data module's
:class:`~lightning_interp.data.source.ActivationSource`. Until then the dictionary is a
:class:`DictionarySpec`. At the same moment every dictionary, built or not, takes its
provenance from the source (:func:`configure_from_source`): the site(s) it reads, the
backbone, the dataset. The export then saves what the module holds; nothing reaches back
into the data module.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_interp.data.batches import sites_read
from lightning_interp.data.source import ActivationSource
from lightning_interp.dictionaries import Dictionary, DictionaryConfig, get_dictionary_class
from lightning_interp.dictionaries.registry import dictionary_class_from_path
from lightning_interp.errors import ConfigError, ConfigTypeError, ShapeMismatchError

# Provenance fields a source stamps on a dictionary that has none of its own.
_STAMPED = ("backbone", "dataset", "context_size")


@dataclass(frozen=True)
class DictionarySpec:
    """A dictionary not built yet: its config, whose ``d_in`` the data module will give.

    Built by :func:`build_specs` as it would have been built where the spec was made: from
    the CPU random state and default dtype of that moment, on the CPU, so a recipe without
    ``d_in`` starts from the same weights as one that types it.

    Attributes:
        config: The dictionary's config, ``d_in`` (and ``d_out``) possibly ``None``.
        rng_state: The CPU random state when the spec was made.
        default_dtype: The default dtype when the spec was made.
    """

    config: DictionaryConfig
    rng_state: Tensor = field(default_factory=torch.get_rng_state, repr=False, compare=False)
    default_dtype: torch.dtype = field(
        default_factory=torch.get_default_dtype, repr=False, compare=False
    )

    @property
    def dictionary_class(self) -> type[Dictionary]:
        """The registered class the config builds."""
        return get_dictionary_class(self.config.architecture)


def _built_or_spec(cls: type[Dictionary], config: DictionaryConfig) -> Dictionary | DictionarySpec:
    return DictionarySpec(config) if config.d_in is None else cls(config)


def dictionary_or_spec(value: Any) -> Dictionary | DictionarySpec:
    """A Dictionary, or a :class:`DictionarySpec` when the config leaves ``d_in`` open.

    Accepts a Dictionary, a spec, a config dataclass, checkpoint hyper-parameters
    (``{"class_path", "init_args": {"config"}}``, resolved through the dictionary registry
    only, never imported) or a flat config dict with ``architecture``. Configs are validated
    (types, ranges, a bound on the size) before any weight is allocated.

    Raises:
        UnknownArchitectureError: the ``class_path`` or ``architecture`` names no registered
            dictionary (the message lists those that are).
        ConfigError: the config is malformed or too large (a ``ConfigTypeError`` for a value
            of the wrong type), or ``value`` is nothing a dictionary is built from.
    """
    if isinstance(value, Dictionary | DictionarySpec):
        return value
    if isinstance(value, DictionaryConfig):
        return _built_or_spec(get_dictionary_class(value.architecture), value)
    if isinstance(value, Mapping) and "class_path" in value:
        cls = dictionary_class_from_path(value["class_path"])
        init_args = value.get("init_args")
        init_args = {} if init_args is None else init_args
        if not isinstance(init_args, Mapping):
            raise ConfigTypeError(
                f"init_args of {value['class_path']} must be a mapping with a 'config' key, "
                f"got a {type(init_args).__name__}"
            )
        config = init_args.get("config", {})
        if not isinstance(config, cls.config_class):
            config = cls.config_class.from_dict(config)
        return _built_or_spec(cls, config)
    if isinstance(value, Mapping):
        fields = dict(value)
        if "architecture" not in fields:
            raise ConfigError(
                f"a dictionary config needs an 'architecture' or a 'class_path', got keys "
                f"{sorted(map(str, fields))}"
            )
        cls = get_dictionary_class(fields.pop("architecture"))
        return _built_or_spec(cls, cls.config_class.from_dict(fields))
    raise ConfigError(
        f"expected a Dictionary, got {type(value).__name__}; build one with "
        f"lightning_interp.create_dictionary or a class_path in the config"
    )


def dictionary_hparams(dictionary: Dictionary | DictionarySpec) -> dict[str, Any]:
    """A dictionary as a checkpoint's hyperparameters store it: ``class_path`` + config.

    The same shape a LightningCLI config gives, so ``lightning-interp validate
    --ckpt_path ...`` (which re-parses checkpoint hyperparameters as init arguments) and
    ``load_from_checkpoint`` both rebuild it.
    """
    spec = isinstance(dictionary, DictionarySpec)
    cls = dictionary.dictionary_class if spec else type(dictionary)
    config = {k: v for k, v in dictionary.config.to_dict().items() if k != "architecture"}
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {"config": config}}


def defer_unsized(class_type: type, *args: Any, **kwargs: Any) -> Dictionary | DictionarySpec:
    """A jsonargparse instantiator: build a dictionary, or defer one whose ``d_in`` is open.

    Registered by the ``lightning-interp`` command for every Dictionary class, so a recipe
    may leave ``d_in`` out and the training module fills it at setup.
    """
    config = kwargs.get("config", args[0] if args else None)
    if isinstance(config, DictionaryConfig) and config.d_in is None:
        return DictionarySpec(config)
    return class_type(*args, **kwargs)


def _width(widths: Mapping[str, int], site: str | None, what: str, who: str) -> int:
    if site is None or site not in widths:
        raise ConfigError(
            f"{who} leaves {what} open but the data gives no width for site {site!r} (it "
            f"gives {dict(widths)}); set {what} in its config"
        )
    return widths[site]


def _check_width(value: int, width: int | None, what: str, site: str | None, who: str) -> None:
    if width is not None and value != width:
        raise ShapeMismatchError(
            f"{who} has {what}={value} but site {site!r} of the data is {width} wide; drop "
            f"{what} from its config (the data module gives it) or read a site that wide"
        )


def configure_from_source(
    config: DictionaryConfig, source: ActivationSource, who: str = "the dictionary"
) -> DictionaryConfig:
    """``config`` with its widths and provenance filled from ``source``.

    Provenance fields the config leaves empty are taken from the source: ``site`` (and a
    transcoder's ``site_out``) by :func:`~lightning_interp.data.batches.sites_read`,
    ``backbone``, ``dataset``, ``context_size``; ``extra`` merges the source's under the
    config's own. An open ``d_in`` becomes the width of ``site``, an open ``d_out`` of a
    dictionary reading another ``site_out`` the width of that site; given widths are checked
    against the data's.

    Raises:
        ConfigError: a width is open and the data does not give it, or the data serves
            several sites and the dictionary names none.
        ShapeMismatchError: a given width differs from the data's.
    """
    provenance = config.provenance
    updates: dict[str, Any] = {}
    sites = source.sites
    if sites:
        updates["site"], updates["site_out"] = sites_read(
            provenance.site, provenance.site_out, sites, who
        )
    recorded = source.provenance
    for key in _STAMPED:
        if getattr(provenance, key) is None and recorded.get(key) is not None:
            updates[key] = recorded[key]
    updates["extra"] = {**(recorded.get("extra") or {}), **provenance.extra}
    provenance = dataclasses.replace(provenance, **updates)
    widths = source.site_widths
    site, site_out = provenance.site, provenance.site_out
    changes: dict[str, Any] = {"provenance": provenance}
    if config.d_in is None:
        changes["d_in"] = _width(widths, site, "d_in", who)
        if config.d_out is None and site_out not in (None, site):
            changes["d_out"] = _width(widths, site_out, "d_out", who)
    else:
        _check_width(config.d_in, widths.get(site), "d_in", site, who)
        width_out = widths.get(site_out) if site_out is not None else None
        if width_out is not None and config.output_width != width_out:
            raise ShapeMismatchError(
                f"{who} writes {config.output_width} wide rows but its output site "
                f"{site_out!r} is {width_out} wide; set d_out: {width_out} (or drop d_in and "
                f"d_out, which the data module gives), or name the one site it reads in "
                f"config.provenance.site"
            )
    return config.replace(**changes)


@contextlib.contextmanager
def _as_when_specified(spec: DictionarySpec) -> Iterator[None]:
    # Inside configure_model Lightning may set a default device and dtype; a dictionary
    # built eagerly would have been made on the CPU, in the default dtype and random state
    # of the moment its config was given.
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.set_rng_state(spec.rng_state)
        torch.set_default_dtype(spec.default_dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def build_specs(specs: Mapping[str, DictionarySpec]) -> dict[str, Dictionary]:
    """Build the specs, in order, from the random state of the first (see DictionarySpec).

    Consecutive specs were made with nothing drawn in between, so building them one after
    another from the first one's state draws what eager construction would have.
    """
    if not specs:
        return {}
    with _as_when_specified(next(iter(specs.values()))):
        return {name: spec.dictionary_class(spec.config) for name, spec in specs.items()}


def defer_unsized_dictionaries(parser: Any) -> None:
    """Make a jsonargparse ``parser`` build Dictionary classes through :func:`defer_unsized`.

    What lets a recipe leave ``d_in`` out: jsonargparse would otherwise build the dictionary
    while it parses, before any data module can say how wide its site is.
    """
    parser.add_instantiator(defer_unsized, Dictionary, subclasses=True)
