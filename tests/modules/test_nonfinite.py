"""A NaN, an Inf or an empty batch stops the run with a named error, or is skipped and counted."""

import json

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_interp import ShapeMismatchError
from lightning_interp.callbacks import ExportDictionary
from lightning_interp.errors import ConfigError, NonFiniteError
from lightning_interp.modules import DictionaryModule, MultiDictionaryModule, guards
from lightning_interp.modules.guards import BatchGuard, batch_problem, nonfinite_summary
from tests.helpers import make_module, quiet_trainer, small_dictionary


def batches(n: int = 6, rows: int = 64, d: int = 32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(rows, d, generator=generator) for _ in range(n)]


def fit(module, data, **trainer_kwargs):
    trainer = quiet_trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(module, DataLoader(data, batch_size=None))
    return trainer


def all_finite(module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


@pytest.mark.parametrize(
    ("bad", "count"), [(float("nan"), "1 NaN and 0 infinite"), (-torch.inf, "0 NaN and 1 infinite")]
)
def test_a_nonfinite_batch_raises_naming_step_batch_and_input(bad, count):
    data = batches()
    data[3][5, 7] = bad
    module = make_module(small_dictionary("topk"), decay_fraction=0.0)
    message = rf"train batch 3 at global step 3: inputs hold {count} values in 1 of 64 rows"
    with pytest.raises(NonFiniteError, match=message):
        fit(module, data)
    assert all_finite(module)  # the bad batch reached no weight
    assert int(module.tokens_seen) == 3 * 64


def test_skip_counts_the_batch_and_keeps_the_weights_finite(tmp_path):
    data = batches()
    data[2][0, 0] = float("nan")
    data[4][1:3] = torch.inf
    module = make_module(small_dictionary("topk"), decay_fraction=0.0, on_nonfinite="skip")
    trainer = fit(module, data, default_root_dir=tmp_path, callbacks=[ExportDictionary()])
    assert module.skipped_batches == 2
    assert trainer.callback_metrics["train/skipped_batches"] == 2
    assert int(module.tokens_seen) == 4 * 64  # skipped rows count neither as seen nor firing
    assert all_finite(module)
    assert json.loads((tmp_path / "metrics.json").read_text())["skipped_batches"] == 2


def test_a_skipped_batch_changes_nothing():
    # Constant learning rate: then skipping a batch equals never having seen it (no Adam
    # step, no moment update, no dead-latent count).
    def trained(data):
        torch.manual_seed(0)
        dictionary = small_dictionary("topk")
        module = make_module(dictionary, warmup_steps=0, decay_fraction=0.0, on_nonfinite="skip")
        fit(module, data)
        return module

    data = batches()
    clean = trained([data[i] for i in (0, 1, 3, 4, 5)])
    data[2][7, 1] = float("nan")
    skipped = trained(data)
    for (name, a), (_, b) in zip(
        clean.state_dict().items(), skipped.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def test_an_empty_first_batch_is_refused_or_skipped():
    data = batches()
    data[0] = torch.empty(0, 32)
    with pytest.raises(
        ShapeMismatchError, match="train batch 0 at global step 0: inputs have 0 rows"
    ):
        fit(make_module(small_dictionary("topk"), decay_fraction=0.0), data)
    module = make_module(small_dictionary("topk"), decay_fraction=0.0, on_nonfinite="skip")
    fit(module, data)
    # b_dec comes from the first usable batch, not from an empty one (NaN median).
    assert bool(module.b_dec_initialized) and all_finite(module)
    assert module.skipped_batches == 1


def test_a_nonfinite_loss_on_finite_inputs_is_caught():
    data = batches()
    data[3] = data[3] * 1e25  # finite, but its squared error overflows float32
    with pytest.raises(NonFiniteError, match=r"global step 3: the loss of \['dictionary'\]"):
        fit(make_module(small_dictionary("topk"), decay_fraction=0.0), data)
    module = make_module(small_dictionary("topk"), decay_fraction=0.0, on_nonfinite="skip")
    fit(module, data)
    assert module.skipped_batches == 1 and all_finite(module)


def test_nonfinite_weights_raise_even_when_skipping():
    module = make_module(small_dictionary("topk"), decay_fraction=0.0, on_nonfinite="skip")
    with torch.no_grad():
        module.dictionary.W_enc[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"weights \['main.W_enc'\] already hold NaN"):
        fit(module, batches())


def test_validation_batches_follow_the_policy():
    data = batches()
    val = [data[0].clone(), data[1].clone()]
    val[1][0, 0] = float("nan")
    module = make_module(small_dictionary("topk"), decay_fraction=0.0)
    trainer = quiet_trainer(max_epochs=1)
    with pytest.raises(NonFiniteError, match="val batch 1"):
        trainer.validate(module, DataLoader(val, batch_size=None), verbose=False)
    module = make_module(small_dictionary("topk"), decay_fraction=0.0, on_nonfinite="skip")
    result = trainer.validate(module, DataLoader(val, batch_size=None), verbose=False)[0]
    assert result["val/skipped_batches"] == 1 and 0 < result["val/fvu"] < 10


def test_multi_dictionary_module_skips_the_step_for_every_dictionary():
    data = batches()
    data[1][3, 3] = float("nan")
    module = MultiDictionaryModule(
        {"a": small_dictionary("topk"), "b": small_dictionary("standard")},
        on_nonfinite="skip",
    )
    fit(module, data)
    assert module.skipped_batches == 1 and all_finite(module)
    assert [int(learner.tokens_seen) for learner in module.learners.values()] == [5 * 64] * 2


def test_multi_dictionary_error_names_the_dictionary_and_site():
    generator = torch.Generator().manual_seed(0)
    x = [torch.randn(64, 32, generator=generator) for _ in range(3)]
    y = [torch.randn(64, 16, generator=generator) for _ in range(3)]
    y[2][0, 0] = float("nan")
    data = [{"x": a, "y": b} for a, b in zip(x, y, strict=True)]
    a = small_dictionary("topk")
    b = small_dictionary("topk", d_in=16)
    a.config.provenance.site, b.config.provenance.site = "x", "y"
    module = MultiDictionaryModule({"a": a, "b": b})
    with pytest.raises(NonFiniteError, match=r"batch 2 .*inputs of 'b' \(site 'y'\) hold 1 NaN"):
        fit(module, data)


def test_unknown_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="on_nonfinite must be one of"):
        DictionaryModule(small_dictionary("topk"), on_nonfinite="ignore")


# A finite batch whose sum overflows its dtype: the cheap test fails, the exact one passes.
@pytest.mark.parametrize(
    ("dtype", "value"), [(torch.float16, 60000.0), (torch.bfloat16, 3e38), (torch.float32, 3e38)]
)
def test_a_finite_batch_whose_sum_overflows_is_usable(dtype, value):
    batch = torch.full((64, 32), value, dtype=dtype)
    assert bool(torch.isfinite(batch).all()) and not bool(torch.isfinite(batch.sum()))
    assert nonfinite_summary(batch) is None
    assert batch_problem({"inputs": batch, "targets": batch[:, :16]}) is None
    guard = BatchGuard("raise", any_rank=lambda bad, device: bad, announce=print)
    assert guard.usable({"inputs": batch}, where="test", step=0, batch_idx=0)
    losses = {"a": torch.tensor(value, dtype=dtype), "b": torch.tensor(1.0)}
    assert guard.usable_loss(losses, where="test", step=0, batch_idx=0, weights=[])


@pytest.mark.parametrize(
    ("values", "count"),
    [
        ([float("nan")], "1 NaN and 0 infinite"),
        ([torch.inf, -torch.inf], "0 NaN and 2 infinite"),  # their sum is NaN, not Inf
        ([1e30, float("nan")], "1 NaN and 0 infinite"),
    ],
)
def test_the_fused_test_finds_what_the_exact_one_finds(values, count):
    clean = torch.randn(8, 4)
    bad = clean.clone()
    bad[3, : len(values)] = torch.tensor(values)
    parts = {"inputs": clean, "targets": bad}
    assert guards.all_finite([clean]) and not guards.all_finite(parts.values())
    assert batch_problem(parts) == ("nonfinite", f"targets hold {count} values in 1 of 8 rows")
    # The first bad part in order is named, as before the fused test.
    assert batch_problem({"a": bad, "b": torch.empty(0, 4)})[0] == "nonfinite"
    guard = BatchGuard("skip", any_rank=lambda bad, device: bad, announce=lambda message: None)
    losses = {"a": torch.tensor(1.0), "b": bad.sum(), "c": torch.tensor(2.0)}
    assert not guard.usable_loss(losses, where="test", step=0, batch_idx=0, weights=[])
    assert guard.skipped["train"] == 1
