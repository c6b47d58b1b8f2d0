"""The training GEMM's reused buffer never overwrites a tensor somebody still holds."""

import torch

from lightning_interp import create_dictionary
from lightning_interp.dictionaries.workspace import ReusedBuffer, encoder_gemm


def test_buffer_is_reused_only_while_nobody_holds_it():
    buffer = ReusedBuffer()
    first = buffer.take(8, 4, torch.float32, torch.device("cpu"))
    pointer = first.data_ptr()
    del first
    second = buffer.take(6, 4, torch.float32, torch.device("cpu"))
    assert second.data_ptr() == pointer  # reused (a smaller batch is a view)
    third = buffer.take(6, 4, torch.float32, torch.device("cpu"))
    assert third.data_ptr() != second.data_ptr()  # `second` is still held
    del second, third
    assert buffer.take(16, 4, torch.float32, torch.device("cpu")).shape == (16, 4)  # grows
    assert buffer.take(2, 4, torch.float64, torch.device("cpu")).dtype == torch.float64


def test_encoder_gemm_equals_mm_and_allocates_under_autocast():
    x, w = torch.randn(10, 6), torch.randn(6, 12)
    buffer = ReusedBuffer()
    torch.testing.assert_close(encoder_gemm(x, w, buffer), x @ w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder_gemm(x, w, buffer)
    assert out.dtype == torch.bfloat16


def test_kept_pre_activations_survive_the_next_training_step():
    torch.manual_seed(0)
    sae = create_dictionary("topk", d_in=16, d_latent=256, k=4)
    x1, x2 = torch.randn(32, 16), torch.randn(32, 16)
    kept = sae.forward_train(x1).pre_activations
    snapshot = kept.clone()
    sae.forward_train(x2)
    assert torch.equal(kept, snapshot)
    with torch.no_grad():
        torch.testing.assert_close(kept, sae.encode_pre(x1))


def test_a_lightning_fit_reuses_one_buffer(monkeypatch):
    # Whatever the module and Trainer keep of a step must not pin the buffer: a fit of
    # several steps allocates it once.
    import lightning as L

    from lightning_interp.dictionaries import workspace
    from tests.helpers import loader, make_module, planted_data, quiet_trainer

    fresh = []
    take = workspace.ReusedBuffer.take

    def counting_take(self, rows, cols, dtype, device):
        before = self._buffer
        out = take(self, rows, cols, dtype, device)
        fresh.append(self._buffer is not before)
        return out

    L.seed_everything(0)
    data = planted_data()
    sae = create_dictionary("topk", d_in=32, d_latent=128, k=4)  # planted_data is 32-wide
    monkeypatch.setattr(workspace.ReusedBuffer, "take", counting_take)
    quiet_trainer(max_steps=6).fit(make_module(sae), loader(data, 64, 6, seed=0))
    assert len(fresh) == 6 and fresh[0] and not any(fresh[1:])
