"""End-to-end training: a dictionary spliced into a frozen tiny GPT-2, through its LM loss."""

from __future__ import annotations

import copy
import itertools
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_interp import ConfigError
from lightning_interp.modules.end_to_end import (
    EndToEndDictionaryModule,
    TokenBatches,
    TokenDataModule,
    next_token_loss,
)
from tests.backbones.tiny_models import build
from tests.data.test_tokens import make_tokenizer, random_texts
from tests.helpers import quiet_trainer

CONTEXT = 16


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny random GPT-2 with a word tokenizer, and a text whose next word is predictable.

    Its tests run on one thread: on a shared machine more only contend over tiny matmuls.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny-lm")
    model = build("gpt2")
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    model.save_pretrained(root / "gpt2")
    make_tokenizer().save_pretrained(root / "gpt2")
    # Each word is followed by the next one (mod 20): learnable from the current token.
    starts = torch.randint(0, 20, (200,), generator=torch.Generator().manual_seed(0))
    lines = [" ".join(f"w{(s + i) % 20}" for i in range(30)) for s in starts.tolist()]
    (root / "texts.txt").write_text("\n".join(lines) + "\n")
    yield str(root / "gpt2"), str(root / "texts.txt")
    torch.set_num_threads(threads)


def data_module(tiny_lm, sites="layers.3.resid_post", **kwargs):
    model, text = tiny_lm
    defaults = dict(
        text=text,
        context_size=CONTEXT,
        batch_size=4 * CONTEXT,
        buffer_tokens=512,
        train_tokens=4 * CONTEXT * 40,
        val_tokens=4 * CONTEXT * 2,
        val_fraction=0.1,
    )
    return TokenDataModule(model, sites, **{**defaults, **kwargs})


def test_next_token_loss_counts_only_real_pairs():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    pairs = [(0, t) for t in range(4)] + [(1, 0), (1, 1)]  # (row, position predicting t+1)
    expected = torch.stack([F.cross_entropy(logits[r, t], ids[r, t + 1]) for r, t in pairs])
    torch.testing.assert_close(next_token_loss(logits, ids, mask), expected.mean())
    full = F.cross_entropy(logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(next_token_loss(logits, ids, None), full)


def test_token_batches_resume_where_they_stood():
    texts, tokenizer = random_texts(40, seed=1), make_tokenizer()
    make = partial(TokenBatches, texts, tokenizer, 2, 6, context_size=CONTEXT)
    everything = [b["input_ids"] for b in make()]
    assert len(everything) == 6 and everything[0].shape == (2, CONTEXT)
    first = make()
    assert len(list(itertools.islice(iter(first), 2))) == 2  # a pass cut short...
    assert len(list(first)) == 6  # ...does not shorten the next one
    list(itertools.islice(iter(first), 4))
    assert first.state_dict() == {"position": 4}
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    rest = [b["input_ids"] for b in resumed]
    assert [torch.equal(a, b) for a, b in zip(rest, everything[4:], strict=True)] == [True] * 2
    # At a pass's end the position is 0: a checkpoint there resumes at the next pass's start.
    assert resumed.state_dict() == {"position": 0} and len(list(resumed)) == 6


def test_token_data_module_refuses_scaled_activations(tiny_lm):
    with pytest.raises(ConfigError, match="needs raw activations.*normalize: none"):
        data_module(tiny_lm, normalize="expected_norm")
    with pytest.raises(ConfigError, match="batch_size=8 < context_size=16"):
        data_module(tiny_lm, batch_size=8)


def spliced_ce(trainer, module, data):
    return trainer.validate(module, datamodule=data, verbose=False)[0]["val/ce_spliced"]


# How far 40 steps lower the spliced CE (about 4.18 before). The codebook's codes are also
# its keys, so the LM loss cannot move them as freely as a TopK decoder (measured: TopK
# 4.18 -> 3.70, codebook 4.18 -> 4.05); the margins leave room for other CPUs.
CE_DROP = {"topk": 0.25, "codebook": 0.05}


@pytest.mark.parametrize("architecture", sorted(CE_DROP))
def test_lm_loss_trains_the_dictionary_and_the_backbone_stays_frozen(tiny_lm, architecture):
    torch.manual_seed(0)
    data = data_module(tiny_lm)
    module = EndToEndDictionaryModule(
        {"architecture": architecture, "d_latent": 64, "k": 4},  # d_in comes from the site
        optimizer=partial(torch.optim.Adam, lr=1e-2),
    )
    trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=0)
    before = spliced_ce(trainer, module, data)
    frozen = copy.deepcopy(data.backbone.model.state_dict())
    decoder = module.dictionary.W_dec.detach().clone()
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert trainer.global_step == 40
    # The spliced model predicts the held-out text better: the dictionary learned from CE.
    assert after["val/ce_spliced"] < before - CE_DROP[architecture], (before, after)
    assert 0 < after["val/l0"] <= 4 + 1e-6
    # Gradients reached the dictionary only: the backbone is bit-for-bit unchanged.
    model = data.backbone.model
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, frozen[name]), name
    assert not torch.equal(module.dictionary.W_dec.detach(), decoder)
    assert all(name.startswith("learners.") for name in module.state_dict())
    assert module.dictionary.config.provenance.site == "layers.3.resid_post"


def test_lm_loss_alone_trains_a_transcoder_at_its_output_site(tiny_lm):
    torch.manual_seed(0)
    data = data_module(tiny_lm, sites=["layers.1.mlp_in", "layers.1.mlp_out"], train_tokens=256)
    module = EndToEndDictionaryModule(
        {"architecture": "topk", "d_latent": 64, "k": 4, "apply_b_dec_to_input": False},
        reconstruction_coefficient=0.0,
        optimizer=partial(torch.optim.Adam, lr=1e-3),
    )
    trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    provenance = module.dictionary.config.provenance
    assert (provenance.site, provenance.site_out) == ("layers.1.mlp_in", "layers.1.mlp_out")
    logged = trainer.callback_metrics
    assert torch.isfinite(logged["train/ce_loss"])
    # With the reconstruction weight at 0, the step's loss is the LM loss alone.
    torch.testing.assert_close(logged["train/total_loss"], logged["train/ce_loss"])


def test_negative_reconstruction_weight_is_refused():
    with pytest.raises(ConfigError, match="reconstruction_coefficient must be >= 0"):
        EndToEndDictionaryModule({"architecture": "topk", "d_in": 8, "d_latent": 16, "k": 2}, -1.0)


def test_without_a_backbone_the_module_says_what_it_needs():
    module = EndToEndDictionaryModule({"architecture": "topk", "d_in": 8, "d_latent": 16, "k": 2})
    batches = [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}]
    with pytest.raises(ConfigError, match="TokenDataModule"):
        L.Trainer(
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            max_steps=1,
        ).fit(module, batches)


def test_a_closed_form_learner_is_refused(tiny_lm):
    module = EndToEndDictionaryModule({"architecture": "snmf", "d_latent": 16, "k": 4})
    with pytest.raises(ConfigError, match="'snmf' is fitted by closed-form updates"):
        quiet_trainer(max_steps=1, num_sanity_val_steps=0).fit(
            module, datamodule=data_module(tiny_lm)
        )
