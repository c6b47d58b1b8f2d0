"""Dictionaries live where the user's model is; splices cross devices and dtypes.

The CPU tests run everywhere; the ``cuda`` ones are for the one-shot GPU check (issue
"Speed II") and are skipped without a CUDA device.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_interp import create_dictionary, load_dictionary
from lightning_interp.callbacks import DictionaryProbe, SpliceDictionary
from lightning_interp.callbacks.splice import splice_function
from tests.callbacks.users import DigitsData, DigitsMLP
from tests.helpers import quiet_trainer


def cuda(test):
    """Mark a test for the GPU check; skip it without a CUDA device."""
    test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test)
    return pytest.mark.cuda(test)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def identity_dictionary(d: int, dtype: str = "float32", device: str = "cpu"):
    """A StandardSAE whose reconstruction is its input: relu(x) - relu(-x) = x."""
    sae = create_dictionary("standard", d_in=d, d_latent=2 * d, l1_coefficient=0.0, dtype=dtype)
    eye = torch.eye(d, dtype=sae.dtype)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.to(device)


def small_probe(**kwargs) -> DictionaryProbe:
    return DictionaryProbe("net.1", d_latent=128, k=8, min_steps=50, **kwargs)


def fit(callbacks, epochs=2, **trainer_kwargs):
    L.seed_everything(0, verbose=False)
    module = DigitsMLP()
    trainer = quiet_trainer(max_epochs=epochs, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, DigitsData())
    return module, trainer


class Spy(L.Callback):
    """Records the dtype and device of what the spliced site hands to the next layer."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.dtype, torch.device]] = []

    def on_validation_start(self, trainer, pl_module) -> None:
        def hook(_module, args):
            self.seen.append((args[0].dtype, args[0].device))

        pl_module.net[2].register_forward_pre_hook(hook)


def test_splice_function_answers_in_the_activations_dtype():
    sae = create_dictionary("topk", d_in=8, d_latent=32, k=4, dtype="float64")
    x = torch.randn(5, 8)
    for mode in ("reconstruct", "ablate", "steer"):
        out = splice_function(mode, sae, [1, 2], 2.0)(x)
        assert (out.dtype, out.device) == (x.dtype, x.device), mode
    # The float64 arithmetic, rounded once to float32 at the end.
    expected = sae(x.double())
    torch.testing.assert_close(splice_function("reconstruct", sae, [], 1.0)(x), expected.float())


def test_float64_dictionary_splices_into_a_float32_model():
    module, _ = fit([], epochs=2)
    spy = Spy()
    sae = identity_dictionary(64, "float64")
    trainer = quiet_trainer(callbacks=[SpliceDictionary(sae, site="net.1"), spy])
    (metrics,) = trainer.validate(module, DigitsData(), verbose=False)
    assert sae.dtype == torch.float64  # placed, not cast
    assert {dtype for dtype, _ in spy.seen} == {torch.float32}
    assert metrics["spliced/val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-6)
    assert metrics["spliced/val_acc"] == metrics["val_acc"]


def test_probe_dictionary_on_the_models_device_in_its_own_dtype():
    probe = small_probe(dictionary_kwargs={"dtype": "float64"})
    splice = SpliceDictionary("net.1")
    _, trainer = fit([probe, splice])
    dictionary = probe.dictionaries["net.1"]
    assert dictionary.device == trainer.strategy.root_device
    assert dictionary.dtype == torch.float64
    assert probe.trainers["net.1"].steps > 0
    assert float(trainer.callback_metrics["spliced/val_acc"]) > 0.5


def test_float64_model_meets_a_float32_probe():
    probe = small_probe()
    fit([probe], precision="64-true")
    assert probe.dictionaries["net.1"].dtype == torch.float32
    assert probe.trainers["net.1"].steps > 0


@cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_probe_and_splice_on_the_gpu(tmp_path, precision):
    probe = small_probe(dirpath=str(tmp_path))
    splice = SpliceDictionary("net.1")
    _, trainer = fit([probe, splice], accelerator="gpu", precision=precision)
    dictionary = probe.dictionaries["net.1"]
    assert dictionary.device == trainer.strategy.root_device
    assert dictionary.device.type == "cuda"
    assert dictionary.dtype == torch.float32
    assert probe.trainers["net.1"].steps > 0
    assert float(trainer.callback_metrics["spliced/val_acc"]) > 0.5
    assert load_dictionary(tmp_path / "net.1").config.provenance.site == "net.1"


@cuda
def test_cpu_dictionary_splices_into_a_gpu_model():
    module, _ = fit([], epochs=2)
    spy = Spy()
    sae = identity_dictionary(64, "float64")
    trainer = quiet_trainer(accelerator="gpu", callbacks=[SpliceDictionary(sae, site="net.1"), spy])
    (metrics,) = trainer.validate(module, DigitsData(), verbose=False)
    assert sae.device.type == "cuda" and sae.dtype == torch.float64
    assert {(dtype, device.type) for dtype, device in spy.seen} == {(torch.float32, "cuda")}
    assert metrics["spliced/val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-5)


@cuda
def test_splice_function_crosses_devices_both_ways():
    sae = create_dictionary("topk", d_in=8, d_latent=32, k=4)
    x = torch.randn(5, 8)
    expected = sae(x)
    on_gpu = splice_function("reconstruct", sae.to("cuda"), [], 1.0)(x)  # CPU rows, GPU sae
    assert on_gpu.device.type == "cpu"
    torch.testing.assert_close(on_gpu, expected, rtol=1e-4, atol=1e-5)
    on_cpu = splice_function("reconstruct", sae.to("cpu"), [], 1.0)(x.cuda())
    assert on_cpu.device.type == "cuda"
    torch.testing.assert_close(on_cpu.cpu(), expected)
