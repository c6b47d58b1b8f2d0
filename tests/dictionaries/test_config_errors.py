"""Bad config values and hostile checkpoint hyper-parameters get typed one-line errors."""

import dataclasses
import json
import math
import sys
import time
import typing

import pytest
import torch

from lightning_interp import (
    ConfigError,
    CorruptFileError,
    UnknownArchitectureError,
    create_dictionary,
    list_architectures,
    load_dictionary,
)
from lightning_interp.dictionaries import Provenance, get_dictionary_class
from lightning_interp.errors import ConfigTypeError
from lightning_interp.modules.dictionary_module import as_dictionary, dictionary_hparams
from tests.helpers import example_kwargs

ARCHITECTURES = list_architectures()
BASE = {"d_in": 4, "d_latent": 8}


def valid_kwargs(architecture):
    return {**BASE, **example_kwargs(architecture)}


def fields_of_type(config_class, wanted):
    """Names of the fields whose type hint is ``wanted`` or ``wanted | None``."""
    hints = typing.get_type_hints(config_class)
    return [
        f.name
        for f in dataclasses.fields(config_class)
        if hints[f.name] is wanted or set(typing.get_args(hints[f.name])) == {wanted, type(None)}
    ]


def raises_one_line(error, call, match):
    with pytest.raises(error, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return info.value


# ---------------------------------------------------------------- types, for every field
WRONG_VALUES = [
    (bool, "false", "must be true or false.*without quotes"),
    (bool, 1, "must be true or false"),
    (int, True, "must be a whole number, got the boolean True"),
    (int, 2.5, "must be a whole number"),
    (int, "16", "must be a whole number"),
    (float, "0.5", "must be a number, got the string"),
    (float, False, "must be a number, got the boolean"),
    (str, ["float32"], "must be a"),
]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("kind, value, message", WRONG_VALUES)
def test_every_typed_field_refuses_a_wrong_type(architecture, kind, value, message):
    config_class = get_dictionary_class(architecture).config_class
    names = fields_of_type(config_class, kind)
    assert names or kind is not bool  # every config has bool fields (normalize_decoder, ...)
    for name in names:
        kwargs = {**valid_kwargs(architecture), name: value}
        error = raises_one_line(
            ConfigTypeError, lambda kw=kwargs: create_dictionary(architecture, **kw), message
        )
        assert name in str(error)
        # Callers that catch the built-ins catch it: a wrong type is a TypeError and a
        # ValueError (a bad config value).
        assert isinstance(error, TypeError) and isinstance(error, ValueError)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_float_field_refuses_nan_and_inf(architecture):
    config_class = get_dictionary_class(architecture).config_class
    for name in fields_of_type(config_class, float):
        for value in (math.nan, math.inf):
            kwargs = {**valid_kwargs(architecture), name: value}
            raises_one_line(
                ConfigError,
                lambda kw=kwargs: create_dictionary(architecture, **kw),
                f"{name} must be a finite number",
            )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"d_in": True}, "TopKConfig.d_in must be a whole number, got the boolean True"),
        ({"k": True}, "TopKConfig.k must be a whole number, got the boolean True"),
        ({"normalize_decoder": "false"}, "normalize_decoder must be true or false"),
        ({"apply_b_dec_to_input": "no"}, "apply_b_dec_to_input must be true or false"),
        ({"provenance": "gpt2"}, "provenance must be a mapping of Provenance fields"),
        ({"provenance": ["gpt2"]}, "provenance must be a mapping of Provenance fields"),
        ({"provenance": {"context_size": "128"}}, "Provenance.context_size must be a whole"),
        ({"provenance": {"extra": "x"}}, "Provenance.extra must be a mapping"),
        ({"b_dec_init": ["mean"]}, "b_dec_init must be one of"),
        ({"dtype": ["float32"]}, "dtype must be a string such as 'float32'"),
    ],
)
def test_the_reported_wrong_types(overrides, message):
    raises_one_line(
        ConfigTypeError, lambda: create_dictionary("topk", **{**BASE, "k": 2, **overrides}), message
    )


@pytest.mark.parametrize("dtype", ["int32", "int8", "bool", torch.int32, torch.bool, "complex64"])
def test_non_float_dtypes_are_refused(dtype):
    raises_one_line(
        ConfigError,
        lambda: create_dictionary("topk", **BASE, k=2, dtype=dtype),
        "floating point; use one of",
    )


def test_a_torch_dtype_is_stored_by_name():
    assert create_dictionary("topk", **BASE, k=2, dtype=torch.float64).config.dtype == "float64"


def test_int_weights_are_refused_by_name():
    dictionary = create_dictionary("topk", **BASE, k=2)
    tensors = dictionary.export_tensors()
    tensors["W_enc"] = tensors["W_enc"].to(torch.int32)
    raises_one_line(
        CorruptFileError,
        lambda: dictionary.import_tensors(tensors),
        "floating point, got {'W_enc': 'int32'}",
    )


def test_architecture_given_as_a_list():
    raises_one_line(
        ConfigTypeError,
        lambda: create_dictionary(["topk"], **BASE, k=2),
        "architecture must be a string.*got \\['topk'\\] \\(a list\\).*topk",
    )


def test_unknown_keys_are_refused_in_config_and_provenance():
    raises_one_line(
        ConfigError, lambda: create_dictionary("topk", **BASE, k=2, bogus=1), "unknown.*bogus"
    )
    raises_one_line(
        ConfigError,
        lambda: create_dictionary("topk", **BASE, k=2, provenance={"model": "gpt2"}),
        "unknown Provenance field.*'model'.*known fields",
    )


def test_a_new_architecture_config_is_checked_without_code_of_its_own():
    from lightning_interp.dictionaries import DictionaryConfig

    @dataclasses.dataclass(kw_only=True)
    class TempConfig(DictionaryConfig):
        tied: bool = False
        steps: int = 3

    raises_one_line(ConfigTypeError, lambda: TempConfig(**BASE, tied="yes"), "TempConfig.tied")
    raises_one_line(ConfigTypeError, lambda: TempConfig(**BASE, steps=True), "TempConfig.steps")
    assert TempConfig(**BASE, tied=True, steps=5).steps == 5


# ---------------------------------------------------------------- activation scales
@pytest.mark.parametrize("field", ["activation_scale", "activation_scale_out"])
@pytest.mark.parametrize("value", [0, 0.0, -1.5, math.inf, -math.inf, math.nan])
def test_bad_scales_are_refused_at_validation(field, value):
    raises_one_line(ConfigError, lambda: Provenance(**{field: value}), f"{field} must be")


def test_a_bad_scale_is_refused_at_load_not_folded_into_inf_weights(tmp_path):
    create_dictionary("topk", **BASE, k=2).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    for value in (0.0, -2.0):
        config["provenance"]["activation_scale"] = value
        path.write_text(json.dumps(config))
        raises_one_line(
            CorruptFileError, lambda: load_dictionary(tmp_path), "activation_scale must be.*> 0"
        )


def test_a_scale_edited_in_place_is_refused_by_folding():
    dictionary = create_dictionary("topk", **BASE, k=2)
    dictionary.config.provenance.activation_scale = 0.0  # bypasses validation
    raises_one_line(ConfigError, dictionary.with_scale_folded, "activation_scale must be")


def test_b_dec_on_the_input_needs_one_scale():
    provenance = Provenance(activation_scale=2.0, activation_scale_out=3.0)
    raises_one_line(
        ConfigError,
        lambda: create_dictionary("topk", **BASE, k=2, provenance=provenance),
        "apply_b_dec_to_input=True .* need one scale",
    )
    same = Provenance(activation_scale=2.0, activation_scale_out=2.0)
    create_dictionary("topk", **BASE, k=2, provenance=same)
    create_dictionary(
        "topk", **BASE, k=2, d_out=6, apply_b_dec_to_input=False, provenance=provenance
    )


# ---------------------------------------------------------------- checkpoint hyper-parameters
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_checkpoint_hparams_round_trip_through_the_registry(architecture):
    dictionary = create_dictionary(architecture, **valid_kwargs(architecture))
    rebuilt = as_dictionary(dictionary_hparams(dictionary))
    assert type(rebuilt) is type(dictionary)
    assert rebuilt.config == dictionary.config


def test_public_class_paths_as_recipes_write_them():
    spec = {"class_path": "lightning_interp.dictionaries.TopKSAE", "init_args": {"config": BASE}}
    spec["init_args"]["config"] = {**BASE, "k": 2}
    assert type(as_dictionary(spec)).__name__ == "TopKSAE"


def test_a_class_path_outside_the_registry_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "li_hostile_module.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\nclass Evil: pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for class_path in ("li_hostile_module.Evil", "os.system", "torch.nn.Linear"):
        raises_one_line(
            UnknownArchitectureError,
            lambda cp=class_path: as_dictionary({"class_path": cp, "init_args": {"config": {}}}),
            "not a registered dictionary class; registered: .*TopKSAE",
        )
    assert not marker.exists() and "li_hostile_module" not in sys.modules
    raises_one_line(ConfigTypeError, lambda: as_dictionary({"class_path": ["x"]}), "class_path")


def test_hostile_sizes_fail_fast_before_allocating():
    spec = {"class_path": "lightning_interp.dictionaries.TopKSAE"}
    started = time.perf_counter()
    raises_one_line(
        ConfigError,
        lambda: as_dictionary(
            {**spec, "init_args": {"config": {"d_in": 16, "d_latent": 10**12, "k": 2}}}
        ),
        "d_latent=1000000000000, .* above the limit",
    )
    # Within the hard bound but 2 TB of float64 weights: refused against the machine's memory.
    config = {"d_in": 4096, "d_latent": 3 * 10**7, "k": 2, "dtype": "float64"}
    raises_one_line(
        ConfigError,
        lambda: as_dictionary({**spec, "init_args": {"config": config}}),
        "needs 1.97e\\+03 GB of float64 weights, more than the .* GB of cpu memory",
    )
    assert time.perf_counter() - started < 5.0
    # The meta device allocates nothing, so loaders that build there are not refused.
    with torch.device("meta"):
        assert create_dictionary("topk", **config).W_enc.is_meta


def test_a_flat_config_needs_an_architecture():
    raises_one_line(ConfigError, lambda: as_dictionary({"d_in": 4}), "needs an 'architecture'")
    assert type(as_dictionary({"architecture": "topk", **BASE, "k": 2})).__name__ == "TopKSAE"
