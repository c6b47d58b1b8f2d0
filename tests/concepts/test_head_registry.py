"""The head registry's contract, checked on every registered head (``list_heads()``).

A head registered with ``@register_head`` and a typed config is picked up here with no test
edit: each is built by tests/concepts/head_cases.py (``create_head`` by default).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lightning_interp.concepts import (
    ConceptHead,
    HeadConfig,
    HeadOutput,
    create_head,
    head_class,
    list_heads,
    register_head,
)
from lightning_interp.concepts.base import build_head
from lightning_interp.concepts.registry import _HEADS
from lightning_interp.errors import (
    ConfigError,
    ConfigTypeError,
    CorruptFileError,
    UnknownArchitectureError,
)
from tests.concepts.head_cases import example_head, example_inputs
from tests.concepts.planted import CLASSES

BUILT_IN = {
    "concept_slots",
    "concept_transformer",
    "description",
    "label_free_cbm",
    "pcbm",
    "supervised_cbm",
}


def test_the_built_in_heads_are_registered():
    assert BUILT_IN <= set(list_heads())
    assert list_heads() == sorted(list_heads())


@pytest.mark.parametrize("name", list_heads())
def test_each_head_has_a_typed_config_that_round_trips(name):
    cls = head_class(name)
    assert cls.head_type == name
    assert issubclass(cls.config_class, HeadConfig) and cls.config_class is not HeadConfig
    assert dataclasses.is_dataclass(cls.config_class)
    head = example_head(name)
    assert isinstance(head.config, cls.config_class)
    saved = json.loads(json.dumps(head.head_spec()))["config"]  # plain JSON, as in config.json
    assert saved == head.config.to_dict() == dict(head.config)
    assert cls.config_class.from_dict(saved) == head.config
    for field in dataclasses.fields(cls.config_class):  # read like the dict it replaced
        assert head.config[field.name] == getattr(head.config, field.name)


@pytest.mark.parametrize("name", list_heads())
def test_each_config_field_refuses_a_wrong_type_by_name(name):
    config_class = head_class(name).config_class
    for field in dataclasses.fields(config_class):
        with pytest.raises(ConfigTypeError, match=rf"{config_class.__name__}\.{field.name}"):
            config_class(**{field.name: [1]})  # a list is no scalar option's type


@pytest.mark.parametrize("name", list_heads())
def test_create_head_refuses_an_unknown_option_naming_the_known_ones(name):
    first = dataclasses.fields(head_class(name).config_class)[0].name
    with pytest.raises(ConfigError, match=rf"unknown .*\['bogus'\].*{first}"):
        create_head(name, class_names=CLASSES, d_in=8, concept_names=["a"], bogus=1)


@pytest.mark.parametrize("name", list_heads())
def test_a_saved_spec_rebuilds_the_same_head(name):
    head = example_head(name)
    spec = json.loads(json.dumps(head.head_spec()))
    rebuilt = build_head(spec)
    assert type(rebuilt) is type(head) and rebuilt.config == head.config
    assert rebuilt.state_dict().keys() == head.state_dict().keys()
    spec["config"]["bogus"] = 1  # a config.json naming an option no version had
    with pytest.raises(CorruptFileError, match="does not describe a concept head"):
        build_head(spec)


def test_a_config_saved_before_typed_configs_loads(tmp_path):
    """config.json as earlier versions wrote it: a plain dict, an int where a float goes."""
    head = example_head("supervised_cbm")
    folder = head.save_pretrained(tmp_path / "old")
    spec = json.loads((folder / "config.json").read_text())
    spec["config"] = {
        "training": "joint",
        "bottleneck": "soft",
        "concept_hidden": 8,
        "label_hidden": 0,
        "concept_weight": 1,
        "concept_epochs": 1,
    }
    (folder / "config.json").write_text(json.dumps(spec))
    loaded = ConceptHead.from_pretrained(folder)
    assert loaded.config.concept_weight == 1.0 and isinstance(loaded.config.concept_weight, float)
    x = example_inputs(head)[0]
    torch.testing.assert_close(loaded(x).logits, head.eval()(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", list_heads())
def test_each_head_writes_its_card_section_and_usage(name):
    pytest.importorskip("huggingface_hub")
    from lightning_interp.zoo.head_card import build_head_card

    head = example_head(name)
    section = head.card_class_table()
    assert section.endswith("\n") and section.strip()
    card = str(build_head_card(head, repo_id="org/head"))
    assert f"## Classes and their concepts\n\n{section}" in card
    assert f"- {name}\n" in card  # the head type is a tag
    tokens = "torch.randn(4, 10, head.d_in)" in card
    assert tokens == head.reads_tokens


def test_an_unknown_head_name_suggests_the_closest():
    with pytest.raises(UnknownArchitectureError, match="Did you mean 'pcbm'"):
        create_head("pcbn", class_names=CLASSES, d_in=8, concept_names=["a"])
    with pytest.raises(ConfigError, match="pass bank="):
        create_head("pcbm", class_names=CLASSES)


@pytest.fixture
def restore_registry():
    saved = dict(_HEADS)
    yield
    _HEADS.clear()
    _HEADS.update(saved)


def test_a_new_head_is_one_class_and_a_decorator(restore_registry, tmp_path):
    """What a user's head needs: a config dataclass, the class (layers, forward), @register_head."""

    @dataclass
    class ScaledConfig(HeadConfig):
        scale: float = 2.0

    @register_head("scaled_linear")
    class ScaledLinear(ConceptHead):
        config_class = ScaledConfig

        def build_layers(self):
            self.to_concepts = nn.Linear(self.d_in, self.num_concepts)
            self.classifier = nn.Linear(self.num_concepts, self.num_classes)

        @property
        def final(self):
            return self.classifier

        def forward(self, x, mask=None):
            concepts = self.config.scale * self.to_concepts(x)
            return HeadOutput(self.classifier(concepts), concepts)

    assert "scaled_linear" in list_heads()
    head = create_head(
        "scaled_linear", class_names=CLASSES, d_in=8, concept_names=["a", "b"], scale=3
    )
    assert isinstance(head, ScaledLinear) and head.config.scale == 3.0
    loaded = ConceptHead.from_pretrained(head.save_pretrained(tmp_path / "head"))
    x = torch.randn(4, 8)
    torch.testing.assert_close(loaded(x).logits, head.eval()(x).logits, rtol=0, atol=0)
    assert "| class | #1 | #2 |" in loaded.card_class_table()
    with pytest.raises(ValueError, match="already registered"):
        register_head("pcbm")(ScaledLinear)
