"""Downstream metrics: CE loss recovered and spliced KL, by splicing into tiny models."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_interp import create_dictionary
from lightning_interp.backbones import Backbone
from lightning_interp.errors import ConfigError
from lightning_interp.metrics.downstream import (
    CONVENTIONS,
    CrossEntropyLossRecovered,
    SplicedKLDivergence,
    has_lm_head,
    splice_evaluation,
)
from tests.backbones import tiny_models
from tests.metrics.lm_helpers import word_tokenizer

SITE = "layers.1.resid_post"
D = 32
V = tiny_models.VOCAB


def successor_batch(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Sequences counting up through 1..63 (0 is the tiny GPT-2's BOS/EOS, never used)."""
    starts = torch.randint(1, V, (batch, 1), generator=torch.Generator().manual_seed(seed))
    ids = (starts - 1 + torch.arange(seq)) % (V - 1) + 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run these tiny models on one thread.

    Their matmuls are too small to split, and when other processes share the two cores,
    a second spinning OpenMP thread made training 100x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_gpt2(one_thread):
    """A tiny GPT-2 trained for a second to predict ``t + 1``: clean CE far below ablation."""
    torch.manual_seed(0)
    model = tiny_models.gpt2()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):
        ids = successor_batch(16, 12, seed=step)["input_ids"]
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return Backbone(model)


@pytest.fixture(scope="module")
def llama():
    return Backbone(tiny_models.build("llama"))


@pytest.fixture(params=["gpt2", "llama"])
def backbone(request, trained_gpt2, llama):
    return trained_gpt2 if request.param == "gpt2" else llama


class Scaled(nn.Module):
    """A stand-in dictionary reconstructing ``scale * x`` from ``[N, d]`` rows."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x):
        assert x.ndim == 2  # the splice hands dictionaries [N, d] rows
        return self.scale * x


def exact_topk(d: int, k: int | None = None):
    """A real TopK SAE over codes [relu(x), relu(-x)]: exact with k = d (the default).

    With a smaller ``k`` it keeps the ``k`` largest coordinates of each row (by magnitude).
    """
    sae = create_dictionary("topk", d_in=d, d_latent=2 * d, k=k or d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def evaluate(backbone, dictionary, *batches, **kwargs):
    ce, kl = CrossEntropyLossRecovered(), SplicedKLDivergence()
    for batch in batches:
        splice_evaluation(backbone, dictionary, SITE, batch, ce_metric=ce, kl_metric=kl, **kwargs)
    return ce, kl


def test_the_trained_model_depends_on_the_site(trained_gpt2):
    ce, _ = evaluate(trained_gpt2, Scaled(1.0), successor_batch(8, 12, seed=100))
    values = ce.compute_all()
    assert values["ce_clean"] < 1.0 < values["ce_zero_ablation"] - 1.0


@pytest.mark.parametrize("dictionary", [Scaled(1.0), exact_topk(D)], ids=["identity", "topk"])
def test_perfect_reconstruction_recovers_everything(backbone, dictionary):
    batch = successor_batch(4, 10, seed=1)
    x = torch.randn(5, D)
    assert torch.equal(dictionary(x), x)
    ce, kl = evaluate(backbone, dictionary, batch)
    values = ce.compute_all()
    assert float(values["ce_loss_recovered"]) == pytest.approx(1.0, abs=1e-6)
    assert float(values["delta_lm_loss"]) == pytest.approx(0.0, abs=1e-6)
    assert float(kl.compute()) == pytest.approx(0.0, abs=1e-7)
    assert float(kl.compute_all()["kl_div_score"]) == pytest.approx(1.0, abs=1e-6)


def test_zeroing_dictionary_recovers_nothing(backbone):
    ce, kl = evaluate(backbone, Scaled(0.0), successor_batch(4, 10, seed=2))
    assert float(ce.compute()) == pytest.approx(0.0, abs=1e-6)
    assert float(kl.compute()) > 0
    assert float(kl.compute_all()["kl_div_score"]) == pytest.approx(0.0, abs=1e-6)


def test_partial_reconstruction_lands_strictly_between(trained_gpt2):
    torch.manual_seed(0)

    def noisy(x):
        return x + 0.5 * x.std() * torch.randn_like(x)

    ce, kl = evaluate(trained_gpt2, noisy, successor_batch(8, 12, seed=3))
    assert 0.0 < float(ce.compute()) < 1.0
    assert float(kl.compute()) > 0


def hand_computation(backbone, batch, scale, special, convention):
    """CE and KL of a ``scale * a`` splice, computed from the definitions of the conventions.

    ``"saelens"`` (SAELens 6.54's ``get_recons_loss``): splice at ordinary positions, zero
    every position, drop predictions *from* a special token, KL over every position left.
    ``"special_tokens_clean"``: splice and zero at ordinary positions only, keep a
    prediction when its input and its target are both ordinary, KL over those predictions.
    """
    ids = batch["input_ids"]
    ordinary = ~torch.isin(ids, torch.tensor(special, dtype=ids.dtype))
    clean = backbone(batch).logits
    with backbone.splice(SITE, lambda a: torch.where(ordinary[..., None], scale * a, a)):
        spliced = backbone(batch).logits
    if convention == "saelens":
        with backbone.splice(SITE, torch.zeros_like):
            zero = backbone(batch).logits
        ce_keep, kl_keep, kl_upto = ordinary[:, :-1], ordinary, ids.shape[1]
    else:
        with backbone.splice(SITE, lambda a: torch.where(ordinary[..., None], 0 * a, a)):
            zero = backbone(batch).logits
        ce_keep = ordinary[:, :-1] & ordinary[:, 1:]
        kl_keep, kl_upto = ce_keep, ids.shape[1] - 1

    def ce(logits):
        return F.cross_entropy(logits[:, :-1][ce_keep], ids[:, 1:][ce_keep]).double()

    def kl(logits):
        p = clean[:, :kl_upto][kl_keep].double().log_softmax(-1)
        q = logits[:, :kl_upto][kl_keep].double().log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1).mean()

    return {
        "count": int(ce_keep.sum()),
        "ce_clean": ce(clean),
        "ce_spliced": ce(spliced),
        "ce_zero_ablation": ce(zero),
        "ce_loss_recovered": (ce(zero) - ce(spliced)) / (ce(zero) - ce(clean)),
        "kl_divergence": kl(spliced),
        "kl_zero_ablation": kl(zero),
        "kl_div_score": (kl(zero) - kl(spliced)) / kl(zero),
    }


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("exclude", [True, False])
def test_matches_a_hand_computation(backbone, exclude, convention):
    batch = tiny_models.token_inputs(3, 9)  # random ids: Llama's BOS 1 / EOS 2 occur
    ids = batch["input_ids"]
    special = torch.stack([ids[0, 0], ids[1, 3], ids[2, 8]]).tolist() if exclude else []
    expected = hand_computation(backbone, batch, 0.6, special, convention)
    if exclude:
        assert 0 < expected["count"] < ids[:, 1:].numel() - 2

    ce_metric, kl_metric = evaluate(
        backbone,
        Scaled(0.6),
        batch,
        exclude_special_tokens=exclude,
        special_token_ids=special if exclude else None,
        convention=convention,
    )
    assert int(ce_metric.count) == expected.pop("count")
    values = {**ce_metric.compute_all(), **kl_metric.compute_all()}
    for name, value in expected.items():
        assert float(values[name]) == pytest.approx(float(value), rel=1e-4, abs=1e-7), name


def test_the_conventions_differ_as_documented(trained_gpt2):
    """A BOS (the tiny GPT-2's id 0) at the start and an EOS inside each context."""
    batch = successor_batch(4, 12, seed=8)
    batch["input_ids"][:, 0] = 0
    batch["input_ids"][:, 6] = 0
    saelens, saelens_kl = evaluate(trained_gpt2, Scaled(0.5), batch)
    clean, clean_kl = evaluate(trained_gpt2, Scaled(0.5), batch, convention="special_tokens_clean")
    # SAELens drops the 2 predictions made *from* a special token; the other also drops
    # the prediction *of* the EOS. KL adds each context's last position under SAELens.
    assert int(saelens.count) == 4 * (11 - 2) and int(clean.count) == 4 * (11 - 3)
    assert int(saelens_kl.count) == 4 * (12 - 2) and int(clean_kl.count) == 4 * (11 - 3)


def test_an_unknown_convention_is_a_typed_error(trained_gpt2):
    with pytest.raises(ConfigError, match="unknown downstream-metrics convention 'sae'.*saelens"):
        evaluate(trained_gpt2, Scaled(1.0), successor_batch(2, 6, seed=0), convention="sae")


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_padding_is_excluded(trained_gpt2, convention):
    batch = successor_batch(3, 10, seed=4)
    pad = 5
    padded = {
        "input_ids": torch.cat([batch["input_ids"], torch.full((3, pad), 7)], dim=1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(3, pad)], dim=1),
    }
    plain_ce, plain_kl = evaluate(trained_gpt2, Scaled(0.5), batch, convention=convention)
    padded_ce, padded_kl = evaluate(trained_gpt2, Scaled(0.5), padded, convention=convention)
    assert int(plain_ce.count) == int(padded_ce.count) == 3 * 9
    assert int(plain_kl.count) == int(padded_kl.count)
    for name, value in plain_ce.compute_all().items():
        assert float(padded_ce.compute_all()[name]) == pytest.approx(float(value), rel=1e-5)
    for name, value in plain_kl.compute_all().items():
        assert float(padded_kl.compute_all()[name]) == pytest.approx(float(value), rel=1e-5)
    # A row with a single real token predicts nothing (its next token is padding); under
    # SAELens's convention its one position still enters the KL mean.
    lone = {"input_ids": torch.full((1, 10 + pad), 9), "attention_mask": torch.zeros(1, 10 + pad)}
    lone["attention_mask"][0, 0] = 1
    ce, kl = evaluate(trained_gpt2, Scaled(0.5), lone, convention=convention)
    assert int(ce.count) == 0
    assert int(kl.count) == (1 if convention == "saelens" else 0)


def test_batches_pool_rather_than_average(trained_gpt2):
    first, second = successor_batch(2, 12, seed=5), successor_batch(6, 12, seed=6)
    both = {k: torch.cat([first[k], second[k]]) for k in first}
    split_ce, split_kl = evaluate(trained_gpt2, Scaled(0.5), first, second)
    joint_ce, joint_kl = evaluate(trained_gpt2, Scaled(0.5), both)
    assert float(split_ce.compute()) == pytest.approx(float(joint_ce.compute()), rel=1e-6)
    assert float(split_kl.compute()) == pytest.approx(float(joint_kl.compute()), rel=1e-6)
    ratios = [float(evaluate(trained_gpt2, Scaled(0.5), b)[0].compute()) for b in (first, second)]
    assert not math.isclose(sum(ratios) / 2, float(joint_ce.compute()), rel_tol=1e-4)


def test_metric_states_are_summed_float64_without_autograd(trained_gpt2):
    ce, kl = evaluate(trained_gpt2, Scaled(0.5), successor_batch(2, 8, seed=7))
    for metric in (ce, kl):
        for name, reduce in metric._reductions.items():
            state = getattr(metric, name)
            assert state.dtype == torch.float64 and not state.requires_grad, name
            assert reduce is not None and reduce.__name__ == "dim_zero_sum", name


def test_encoders_raise_a_typed_error():
    bert = Backbone(tiny_models.build("bert"))
    assert not has_lm_head(bert)
    assert not has_lm_head(Backbone(tiny_models.build("clip")))
    with pytest.raises(ConfigError, match="causal language model.*FractionOfVarianceUnexplained"):
        splice_evaluation(bert, Scaled(1.0), SITE, tiny_models.token_inputs())


def test_has_lm_head_on_decoders(trained_gpt2, llama):
    assert has_lm_head(trained_gpt2) and has_lm_head(llama.model)
    assert not has_lm_head(tiny_models.build("gpt_neox").gpt_neox)  # the bare decoder


@pytest.mark.parametrize(("convention", "dropped"), [("saelens", 2), ("special_tokens_clean", 3)])
def test_default_special_tokens_come_from_the_config(llama, convention, dropped):
    batch = tiny_models.token_inputs(3, 9)
    batch["input_ids"][0, 0], batch["input_ids"][2, 4] = 1, 2  # Llama's BOS and EOS
    kwargs = dict(convention=convention)
    default, _ = evaluate(llama, Scaled(0.5), batch, **kwargs)
    explicit, _ = evaluate(llama, Scaled(0.5), batch, special_token_ids=[1, 2], **kwargs)
    everything, _ = evaluate(llama, Scaled(0.5), batch, exclude_special_tokens=False, **kwargs)
    # SAELens drops the predictions from the BOS and from the EOS; the other convention
    # also drops the prediction of the EOS.
    assert int(default.count) == int(explicit.count) == 3 * 8 - dropped < int(everything.count)
    assert float(default.compute()) == float(explicit.compute())


def test_saelens_treats_chat_markers_as_text(llama):
    """SAELens's special set is structural (BOS, EOS, pad, SEP): a chat marker counts."""
    backbone = Backbone(llama.model, word_tokenizer())
    text = "<s> w5 <|im_start|> w7 w8 w9 </s> w10 <unk> w11"
    batch = dict(backbone.tokenizer([text], return_tensors="pt"))
    assert batch["input_ids"][0, :3].tolist() == [1, 5, 3]
    saelens, _ = evaluate(backbone, Scaled(0.5), batch)
    clean, _ = evaluate(backbone, Scaled(0.5), batch, convention="special_tokens_clean")
    # 9 predictions: SAELens drops the ones from <s> and </s>; the other convention drops
    # every prediction from or of <s>, <|im_start|>, </s> and <unk> (ids 0-3).
    assert int(saelens.count) == 9 - 2
    assert int(clean.count) == 2  # w7 -> w8 and w8 -> w9


@pytest.fixture(scope="module")
def smollm2():
    from lightning_interp.data.offline import SMOLLM2_GGUF, smollm2_folder

    return Backbone.from_pretrained(str(smollm2_folder()), gguf_file=SMOLLM2_GGUF)


@pytest.mark.integration
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_smollm2_on_wikipedia(smollm2, convention):
    from lightning_interp.data import pack_texts
    from lightning_interp.data.offline import wikipedia_articles

    tokenizer = smollm2.tokenizer
    contexts = pack_texts(wikipedia_articles(), tokenizer, 64)
    ids = torch.stack([next(contexts) for _ in range(4)])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    site = "layers.5.resid_post"
    generator = torch.Generator().manual_seed(0)

    def noisy(x):
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        return x + 0.3 * x.std(-1, keepdim=True) * noise

    ce, kl = CrossEntropyLossRecovered(), SplicedKLDivergence()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a real model: here the second core pays (see one_thread)
    try:
        counted = splice_evaluation(
            smollm2, noisy, site, batch, ce_metric=ce, kl_metric=kl, convention=convention
        )
    finally:
        torch.set_num_threads(threads)
    values = {name: round(float(v), 4) for name, v in ce.compute_all().items()}
    values.update({name: round(float(v), 4) for name, v in kl.compute_all().items()})
    print(f"\nSmolLM2 {site}, {convention}, {counted} predictions: {values}")
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    if convention == "saelens":
        # Predictions from BOS (and from any EOS between documents) are left out.
        structural = torch.tensor([tokenizer.bos_token_id, tokenizer.eos_token_id])
        assert counted == int((~torch.isin(ids[:, :-1], structural)).sum()) <= 4 * 63 - 4
    else:
        assert counted <= 4 * 63 - 4
    assert values["ce_clean"] < 4.0
    assert values["ce_zero_ablation"] > values["ce_clean"] + 2.0
    assert 0.0 < values["ce_loss_recovered"] < 1.0
    assert 0.0 < values["kl_divergence"] < values["kl_zero_ablation"]


def test_a_transcoder_that_is_the_mlp_recovers_everything(trained_gpt2):
    # A "transcoder" computing the block's own MLP from mlp_in stands in exactly for
    # mlp_out; zeros stand in for the zero ablation of mlp_out.
    # A copy: calling the hooked module itself inside its own hook would recurse.
    mlp = copy.deepcopy(trained_gpt2.model.transformer.h[0].mlp)
    batch = successor_batch(4, 10, seed=3)
    ce, kl = CrossEntropyLossRecovered(), SplicedKLDivergence()
    splice_evaluation(
        trained_gpt2,
        mlp,
        "layers.0.mlp_in",
        batch,
        ce_metric=ce,
        kl_metric=kl,
        site_out="layers.0.mlp_out",
    )
    values = ce.compute_all()
    assert values["ce_zero_ablation"] > values["ce_clean"] + 0.5  # the MLP matters
    assert float(values["ce_loss_recovered"]) == pytest.approx(1.0, abs=1e-5)
    assert float(kl.compute()) == pytest.approx(0.0, abs=1e-6)
    zero = CrossEntropyLossRecovered()
    splice_evaluation(
        trained_gpt2,
        Scaled(0.0),
        "layers.0.mlp_in",
        batch,
        ce_metric=zero,
        site_out="layers.0.mlp_out",
    )
    assert float(zero.compute()) == pytest.approx(0.0, abs=1e-6)


def test_a_transcoder_must_read_an_earlier_site(trained_gpt2):
    with pytest.raises(ConfigError, match="must read a site that comes earlier"):
        splice_evaluation(
            trained_gpt2,
            Scaled(1.0),
            "layers.1.mlp_out",
            successor_batch(2, 6, seed=4),
            site_out="layers.0.mlp_out",
        )


# ------------------------------------------------------------------ devices and dtypes
def all_values(ce, kl) -> dict[str, float]:
    return {name: float(v) for name, v in {**ce.compute_all(), **kl.compute_all()}.items()}


def test_a_float64_dictionary_on_a_float32_backbone(trained_gpt2):
    batch = successor_batch(4, 10, seed=9)
    seen = []

    def record(_module, args):
        seen.append(args[0].dtype)

    exact = exact_topk(D).double()
    exact.register_forward_pre_hook(record)
    ce, kl = evaluate(trained_gpt2, exact, batch)
    assert seen == [torch.float64]  # the rows came in the dictionary's dtype
    assert float(ce.compute()) == pytest.approx(1.0, abs=1e-6)
    assert float(kl.compute()) == pytest.approx(0.0, abs=1e-7)
    # A lossy one gives what its float32 twin gives; so does a plain float64 module.
    lossy = exact_topk(D, k=D // 2)
    reference = all_values(*evaluate(trained_gpt2, lossy, batch))
    assert 0.0 < reference["ce_loss_recovered"] < 1.0
    doubled = all_values(*evaluate(trained_gpt2, copy.deepcopy(lossy).double(), batch))
    assert doubled == pytest.approx(reference, rel=1e-4, abs=1e-6)
    linear = nn.Linear(D, D, bias=False, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(0.5 * torch.eye(D))
    halved = all_values(*evaluate(trained_gpt2, linear, batch))
    assert halved == pytest.approx(
        all_values(*evaluate(trained_gpt2, Scaled(0.5), batch)), rel=1e-4
    )


def test_a_float64_transcoder_on_a_float32_backbone(trained_gpt2):
    mlp = copy.deepcopy(trained_gpt2.model.transformer.h[0].mlp).double()
    ce, kl = CrossEntropyLossRecovered(), SplicedKLDivergence()
    splice_evaluation(
        trained_gpt2,
        mlp,
        "layers.0.mlp_in",
        successor_batch(4, 10, seed=3),
        ce_metric=ce,
        kl_metric=kl,
        site_out="layers.0.mlp_out",
    )
    assert float(ce.compute()) == pytest.approx(1.0, abs=1e-5)
    assert float(kl.compute()) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dictionary_backbone_and_metrics_on_different_devices(trained_gpt2):
    """The issue's case: a CUDA dictionary spliced into a CPU backbone, and the reverse."""
    batch = successor_batch(4, 10, seed=9)
    sae = exact_topk(D, k=D // 2)
    reference = all_values(*evaluate(trained_gpt2, sae, batch))
    on_gpu = all_values(*evaluate(trained_gpt2, copy.deepcopy(sae).cuda(), batch))
    assert on_gpu == pytest.approx(reference, rel=1e-3, abs=1e-5)
    gpu_backbone = Backbone(copy.deepcopy(trained_gpt2.model).cuda())
    ce, kl = evaluate(gpu_backbone, sae, batch)  # metrics left on the CPU
    assert ce.ce_clean_sum.device.type == kl.kl_sum.device.type == "cpu"
    assert all_values(ce, kl) == pytest.approx(reference, rel=1e-3, abs=1e-5)
    gpu_sae = copy.deepcopy(sae).cuda().to(torch.bfloat16)
    both = all_values(*evaluate(gpu_backbone, gpu_sae, batch))
    assert both["ce_loss_recovered"] == pytest.approx(reference["ce_loss_recovered"], abs=0.05)
