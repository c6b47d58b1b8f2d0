"""Dictionaries spliced across devices and dtypes; copies that never wait for the GPU.

The CUDA tests run in the one-shot GPU check (``pytest -m cuda``); here they are skipped.
"""

import pytest
import torch

from lightning_interp import create_dictionary
from lightning_interp.backbones import Backbone
from lightning_interp.backbones.devices import follow_module, module_placement, to_device
from lightning_interp.data.buffer import ShufflingBuffer
from lightning_interp.errors import TokenIdError
from tests.backbones.tiny_models import VOCAB, build, token_inputs

SITE = "layers.1.resid_post"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def dictionary(dtype=torch.float32):
    torch.manual_seed(0)
    return create_dictionary("topk", d_in=32, d_latent=64, k=4).to(dtype).eval()


def record_inputs(module):
    seen = []
    module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    return seen


def spliced_logits(backbone, fn, inputs):
    with backbone.splice(SITE, fn):
        return backbone(inputs).logits


def test_a_float64_dictionary_in_a_float32_backbone():
    backbone, sae = Backbone(build("gpt2")), dictionary(torch.float64)
    seen = record_inputs(sae)
    inputs = token_inputs()
    logits = spliced_logits(backbone, sae, inputs)
    assert seen[0].dtype == torch.float64  # the dictionary computed in its own dtype
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # The same as doing the conversions by hand.
    by_hand = spliced_logits(backbone, lambda a: sae(a.double()).float(), inputs)
    assert torch.equal(logits, by_hand)
    clean = backbone(inputs).logits
    assert not torch.allclose(logits, clean)  # the splice did replace the activation


def test_follow_module_leaves_plain_functions_and_placed_modules_alone():
    assert follow_module(torch.zeros_like) is torch.zeros_like
    sae = dictionary()
    x = torch.randn(3, 32)
    assert torch.equal(follow_module(sae)(x), sae(x))
    assert module_placement(sae) == (torch.device("cpu"), torch.float32)
    assert module_placement(torch.nn.ReLU()) is None
    assert to_device(x, "cpu") is x


def test_a_function_calling_a_module_follows_that_module():
    sae = dictionary(torch.float64)
    seen = record_inputs(sae)
    masked = follow_module(lambda a: sae(a) * 2, module=sae)
    out = masked(torch.randn(2, 32))
    assert seen[0].dtype == torch.float64 and out.dtype == torch.float32


# ---------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@cuda
@pytest.mark.parametrize(
    ("backbone_device", "sae_device", "sae_dtype"),
    [
        ("cuda", "cuda", torch.float32),  # both on the GPU: no copy at all
        ("cuda", "cpu", torch.float64),  # a CPU float64 dictionary spliced into a GPU model
        ("cpu", "cuda", torch.float32),  # a GPU dictionary spliced into a CPU model
    ],
)
def test_splice_across_devices_matches_the_cpu_result(backbone_device, sae_device, sae_dtype):
    inputs = token_inputs()
    reference = spliced_logits(
        Backbone(build("gpt2")), dictionary(sae_dtype), inputs
    )  # all on the CPU
    backbone = Backbone(build("gpt2")).to(backbone_device)
    sae = dictionary(sae_dtype).to(sae_device)
    seen = record_inputs(sae)
    logits = spliced_logits(backbone, sae, inputs)
    assert seen[0].device.type == sae_device and seen[0].dtype == sae_dtype
    assert logits.device.type == backbone_device and logits.dtype == torch.float32
    # GPU and CPU kernels round differently: compare with a tolerance.
    torch.testing.assert_close(logits.cpu(), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@cuda
def test_out_of_vocabulary_ids_on_a_gpu_raise_the_typed_error():
    backbone = Backbone(build("gpt2")).to("cuda")
    for ids in (torch.tensor([[1, VOCAB]]), torch.tensor([[1, VOCAB]], device="cuda")):
        with pytest.raises(TokenIdError, match=f"vocab size {VOCAB}"):
            backbone.capture({"input_ids": ids}, SITE)
    torch.cuda.synchronize()  # no device-side assert was left pending


@pytest.mark.cuda
@cuda
def test_copies_and_buffer_never_wait_for_the_gpu():
    host = torch.arange(1000.0)
    layer = torch.nn.Linear(32, 32).double().cuda()
    torch.ones(1).pin_memory()  # initialise CUDA and the pinned allocator before checking
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call below raises
    try:
        moved = to_device(host, "cuda")  # pinned on the way, copied asynchronously
        buffer = ShufflingBuffer(64, seed=0)
        for start in range(0, 96, 16):
            rows = torch.randn(16, 8, device="cuda")
            buffer.add({"x": rows, "id": torch.arange(start, start + 16)})
        batch = buffer.take(32)  # the shuffle's permutation goes to the GPU asynchronously
        out = follow_module(layer)(torch.randn(4, 32, device="cuda"))  # a dtype change only
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(moved.cpu(), host)
    assert batch["x"].device.type == "cuda" and batch["id"].device.type == "cpu"
    assert out.device.type == "cuda"
