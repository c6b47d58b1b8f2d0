"""The architecture registry: names, lookups, and the example each architecture supplies."""

import importlib
import pkgutil

import pytest

import lightning_interp.dictionaries as dictionaries
from lightning_interp import (
    ConfigError,
    UnknownArchitectureError,
    create_dictionary,
    list_architectures,
)
from lightning_interp.dictionaries import TopKSAE, get_dictionary_class, register_dictionary
from lightning_interp.dictionaries.registry import get_architecture_example


def test_registry_lists_the_five_architectures():
    assert set(list_architectures()) >= {"standard", "topk", "batchtopk", "jumprelu", "gated"}


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(UnknownArchitectureError, match="registered: .*topk.*Did you mean 'topk'"):
        create_dictionary("topkk", d_in=4, d_latent=8, k=2)
    with pytest.raises(UnknownArchitectureError, match="Did you mean 'topk'"):
        get_architecture_example("topkk")


def test_every_architecture_file_is_wired_into_the_package():
    # The generic tests see what `import lightning_interp` registers: a file that registers
    # an architecture but is not imported by the package would be tested by no one (and
    # be unknown to create_dictionary and load_dictionary).
    registered = set(list_architectures())
    for module in pkgutil.iter_modules(dictionaries.__path__):
        importlib.import_module(f"{dictionaries.__name__}.{module.name}")
    unwired = {
        get_dictionary_class(name).__module__ for name in set(list_architectures()) - registered
    }
    assert not unwired, f"import {sorted(unwired)} in lightning_interp/dictionaries/__init__.py"


@pytest.mark.parametrize("architecture", list_architectures())
def test_the_example_builds_with_small_widths(architecture):
    example = get_architecture_example(architecture)
    assert not {"d_in", "d_latent"} & set(example.kwargs)  # widths are the test's choice
    dictionary = create_dictionary(architecture, d_in=4, d_latent=8, **example.kwargs)
    assert dictionary.architecture == architecture
    with pytest.raises(TypeError):
        example.kwargs["k"] = 1  # the registered example cannot be edited by a test


@pytest.mark.parametrize("fvu", [0.0, 1.5, -0.1, float("nan"), "0.2", True])
def test_a_recovery_target_must_be_a_fraction(fvu):
    with pytest.raises(ConfigError, match="recovery_fvu of architecture 'bad' must be") as info:
        register_dictionary("bad", recovery_fvu=fvu)
    assert "\n" not in str(info.value)
    assert "bad" not in list_architectures()


def test_an_architecture_cannot_share_its_parents_config_class():
    class Renamed(TopKSAE):  # reuses TopKConfig, which names "topk" in every config.json
        pass

    with pytest.raises(ConfigError, match="'topk_renamed' reuses TopKConfig.*its own"):
        register_dictionary("topk_renamed")(Renamed)
    assert "topk_renamed" not in list_architectures()
    parent = create_dictionary("topk", d_in=4, d_latent=8, k=2)
    assert parent.config.to_dict()["architecture"] == "topk"  # the parent kept its name
