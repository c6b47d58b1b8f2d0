"""Each architecture, trained by a real Lightning Trainer, recovers a planted dictionary."""

import pytest
import torch

from lightning_interp.data import mean_max_cosine_similarity
from lightning_interp.dictionaries import list_architectures
from lightning_interp.dictionaries.registry import get_architecture_example
from tests.helpers import loader, make_module, planted_data, quiet_trainer, small_dictionary


@pytest.mark.parametrize("architecture", list_architectures())
def test_recovers_planted_dictionary(architecture):
    # The FVU bound is each architecture's own claim, registered beside its code.
    target = get_architecture_example(architecture).recovery_fvu
    if target is None:
        pytest.fail(
            f"{architecture!r} states no recovery_fvu; register it with "
            f"@register_dictionary({architecture!r}, example_kwargs=..., recovery_fvu=...)"
        )
    torch.manual_seed(0)
    data = planted_data()
    module = make_module(small_dictionary(architecture))
    trainer = quiet_trainer(max_epochs=1)
    val = loader(data, 2048, 2, seed=999)
    before = trainer.validate(module, val, verbose=False)[0]
    trainer.fit(module, loader(data, 512, 600, seed=1))
    after = trainer.validate(module, val, verbose=False)[0]

    recovery = mean_max_cosine_similarity(module.dictionary.W_dec, data.atoms)
    assert recovery >= 0.9, f"{architecture}: mean max cosine {recovery:.3f}"
    assert after["val/fvu"] <= target, after
    assert after["val/fvu"] < before["val/fvu"]
    # Sparse: about 3 planted features are active per row; a dense solution would use ~100.
    assert after["val/l0"] <= 10, after
    # The unit-norm constraint held through training.
    norms = module.dictionary.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
