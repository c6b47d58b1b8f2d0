"""SpliceDictionary: the user's own validation metrics, clean and spliced, side by side."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_interp import create_dictionary
from lightning_interp.callbacks import DictionaryProbe, SpliceDictionary
from lightning_interp.callbacks.splice import splice_function
from lightning_interp.errors import ConfigError, ShapeMismatchError
from tests.callbacks.users import DigitsData, DigitsMLP
from tests.helpers import quiet_trainer


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> DigitsMLP:
    """A user's MLP trained for a few epochs (about 90% validation accuracy)."""
    L.seed_everything(0, verbose=False)
    module = DigitsMLP()
    quiet_trainer(max_epochs=5).fit(module, DigitsData())
    return module


def validate(module, *callbacks) -> dict[str, float]:
    trainer = quiet_trainer(callbacks=list(callbacks))
    (metrics,) = trainer.validate(module, DigitsData(), verbose=False)
    return metrics


def identity_dictionary(d: int):
    """A real StandardSAE whose reconstruction is its input: relu(x) - relu(-x) = x."""
    sae = create_dictionary("standard", d_in=d, d_latent=2 * d, l1_coefficient=0.0)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_identity_splice_leaves_metrics_unchanged_and_zero_changes_them(trained):
    clean = validate(trained)
    identity = validate(trained, SpliceDictionary(site="net.0", mode="identity"))
    assert identity["spliced/val_loss"] == identity["val_loss"] == clean["val_loss"]
    assert identity["spliced/val_acc"] == identity["val_acc"] == clean["val_acc"]
    sae = validate(trained, SpliceDictionary(identity_dictionary(64), site="net.0"))
    assert sae["spliced/val_loss"] == pytest.approx(clean["val_loss"], rel=1e-6)
    assert sae["spliced/val_acc"] == clean["val_acc"]
    zero = validate(trained, SpliceDictionary(site="net.0", mode="zero"))
    # Clean metrics untouched (the Accuracy object has a private twin for the spliced run).
    assert zero["val_acc"] == clean["val_acc"] and zero["val_loss"] == clean["val_loss"]
    assert clean["val_acc"] > 0.8
    assert zero["spliced/val_acc"] < 0.3  # the output is the bias alone: one class
    assert zero["spliced/val_loss"] > clean["val_loss"] + 1.0


def test_test_stage_and_prefix(trained):
    trainer = quiet_trainer(callbacks=[SpliceDictionary(site="net.0", mode="zero", prefix="z")])
    (metrics,) = trainer.test(trained, DigitsData(), verbose=False)
    assert set(metrics) == {"test_loss", "test_acc", "z/test_loss", "z/test_acc"}
    assert metrics["z/test_acc"] < metrics["test_acc"] - 0.5


def test_splice_a_probe_dictionary_by_site_name():
    # A glob: the splice finds the probe by an expanded site name.
    probe = DictionaryProbe("net.[01]", d_latent=256, k=16, batch_size=128, lr=3e-3)
    splice = SpliceDictionary("net.1")
    L.seed_everything(0, verbose=False)
    module = DigitsMLP()
    trainer = quiet_trainer(max_epochs=6, callbacks=[probe, splice])
    trainer.fit(module, DigitsData())
    metrics = trainer.callback_metrics
    assert splice.dictionary is probe.dictionaries["net.1"]
    assert set(probe.dictionaries) == {"net.0", "net.1"}
    # What the dictionary keeps, in the user's own terms (measured: val_acc 0.894 both,
    # val_loss 0.368 spliced vs 0.350 clean).
    assert float(metrics["spliced/val_acc"]) > float(metrics["val_acc"]) - 0.1
    assert float(metrics["spliced/val_loss"]) != float(metrics["val_loss"])


def test_splice_from_a_saved_folder_uses_its_provenance_site(trained, tmp_path):
    sae = identity_dictionary(64)
    sae.config.provenance.site = "net.1"
    sae.save_pretrained(tmp_path / "sae")
    splice = SpliceDictionary(str(tmp_path / "sae"))
    metrics = validate(trained, splice)
    assert splice._site.module_path == "net.1"
    assert metrics["spliced/val_acc"] == metrics["val_acc"]


def test_ablate_and_steer_follow_their_formulas():
    sae = create_dictionary("topk", d_in=8, d_latent=32, k=4)
    x = torch.randn(5, 8)
    ids = [3, 7]
    codes = sae.encode(x)
    ablated = splice_function("ablate", sae, ids, 1.0)(x)
    torch.testing.assert_close(ablated, x - codes[:, ids] @ sae.W_dec[ids])
    steered = splice_function("steer", sae, ids, 2.5)(x)
    torch.testing.assert_close(steered, x + 2.5 * (sae.W_dec[3] + sae.W_dec[7]))
    everything = splice_function("ablate", sae, list(range(32)), 1.0)(x)
    torch.testing.assert_close(everything, x - (sae(x) - sae.b_dec))


def test_steering_changes_user_metrics(trained):
    sae = create_dictionary("topk", d_in=64, d_latent=128, k=4)
    metrics = validate(
        trained, SpliceDictionary(sae, site="net.1", mode="steer", latents=[0], scale=20.0)
    )
    assert metrics["spliced/val_loss"] > metrics["val_loss"]


def test_bad_configuration():
    with pytest.raises(ConfigError, match="latents"):
        SpliceDictionary(create_dictionary("topk", d_in=8, d_latent=32, k=4), mode="ablate")
    with pytest.raises(ConfigError, match="mode"):
        SpliceDictionary(site="net.0", mode="scramble")
    with pytest.raises(ConfigError, match="needs a dictionary"):
        SpliceDictionary(site="net.0")
    wrong_width = create_dictionary("topk", d_in=32, d_latent=64, k=2)
    with pytest.raises(ShapeMismatchError, match="d_in=32"):
        validate(DigitsMLP(), SpliceDictionary(wrong_width, site="net.1"))
    with pytest.raises(ConfigError, match="site"):
        validate(DigitsMLP(), SpliceDictionary(create_dictionary("topk", d_in=64, d_latent=8, k=2)))


def test_splice_under_bf16_mixed(trained):
    trainer = quiet_trainer(
        precision="bf16-mixed", callbacks=[SpliceDictionary(identity_dictionary(64), site="net.1")]
    )
    (metrics,) = trainer.validate(trained, DigitsData(), verbose=False)
    # The fp32 dictionary meets bf16 autocast and hands back the model's dtype.
    assert metrics["spliced/val_acc"] == pytest.approx(metrics["val_acc"], abs=0.02)
    assert metrics["spliced/val_loss"] == pytest.approx(metrics["val_loss"], rel=0.05)
