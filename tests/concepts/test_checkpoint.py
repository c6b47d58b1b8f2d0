"""A module whose head was built by name (in configure_model) reloads from its checkpoint."""

from functools import partial

import lightning as L
import pytest
import torch

from lightning_interp.concepts import PosthocCBM
from lightning_interp.errors import ConfigError
from lightning_interp.modules import ConceptBottleneckModule
from lightning_interp.modules.concept_module import HEAD_SPEC_KEY
from tests.concepts.planted import CLASSES, QUIET, accuracy, loader, planted


class PlantedPhrases(L.LightningDataModule):
    """Planted concepts whose text encoder maps the phrase ``concept_i`` to direction i.

    It offers what ConceptBottleneckModule needs to build a head by name: a text
    encoder, class names and the training embeddings; and it names its backbone through
    the ActivationSource contract (lightning_interp.data.source).
    """

    backbone, sites, site_widths, scales = None, ["embeddings"], {}, {}
    provenance = {"backbone": "planted/encoder"}

    def downstream_inputs(self):
        return []

    def __init__(self):
        super().__init__()
        self.data = planted(noise=0.5)
        self.class_names = CLASSES
        self.train, self.test = self.data.split(1000)

    def text_encoder(self):
        index = {name: i for i, name in enumerate(self.data.names)}
        return lambda phrases: self.data.directions[[index[p] for p in phrases]]

    def train_embeddings(self):
        return self.train[0], self.train[1]

    def train_dataloader(self):
        return loader(self.train[:2], 50)


@pytest.fixture
def trained(tmp_path):
    data = PlantedPhrases()
    module = ConceptBottleneckModule(
        head_name="pcbm",
        head_kwargs={"lam": 0.03},
        concepts=data.data.names[:4],  # the bank holds 4 of the 6 planted directions
        optimizer=partial(torch.optim.SGD, lr=0.5),
    )
    trainer = L.Trainer(max_epochs=6, **QUIET)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "head.ckpt"
    trainer.save_checkpoint(path)
    return module, data, path


def test_head_built_by_name_reloads_with_weights_only(trained):
    module, data, path = trained
    x, y, _ = data.test
    assert accuracy(module.head, x, y) > 0.9  # trained for real: 4 classes, chance 0.25

    # A plain torch.load with weights_only=True reads the checkpoint: nothing is pickled.
    raw = torch.load(path, weights_only=True)
    assert raw[HEAD_SPEC_KEY]["concept_names"] == data.data.names[:4]

    loaded = ConceptBottleneckModule.load_from_checkpoint(path, weights_only=True)
    assert isinstance(loaded.head, PosthocCBM)
    assert loaded.head.concept_names == module.head.concept_names
    assert loaded.head.class_names == CLASSES
    assert loaded.head.config == module.head.config
    assert loaded.head.provenance == {"backbone": "planted/encoder"}
    for name, value in module.head.state_dict().items():
        torch.testing.assert_close(loaded.head.state_dict()[name], value, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, module(x).logits, rtol=0, atol=0)

    # The reloaded module evaluates through a Trainer without the data module's encoder.
    tested = L.Trainer(**QUIET).test(loaded, loader(data.test[:2], 200, False), verbose=False)
    assert tested[0]["test/accuracy"] == pytest.approx(accuracy(module.head, x, y))


def test_a_checkpoint_without_the_spec_says_how_to_load_it(trained, tmp_path):
    module, data, path = trained
    raw = torch.load(path, weights_only=True)
    del raw[HEAD_SPEC_KEY]  # as checkpoints written before specs were stored
    old = tmp_path / "old.ckpt"
    torch.save(raw, old)
    with pytest.raises(ConfigError, match="pass a built head"):
        ConceptBottleneckModule.load_from_checkpoint(old, weights_only=True)
    shell = PosthocCBM(32, module.head.concept_names, CLASSES, **module.head.config)
    loaded = ConceptBottleneckModule.load_from_checkpoint(
        old, weights_only=True, head=shell, head_name=None
    )
    x = data.test[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, module(x).logits, rtol=0, atol=0)
