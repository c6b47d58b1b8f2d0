"""Normalised language-model activations: the target norm, raw-input exports, resume.

A tiny random GPT-2 streams its activations through ``LanguageModelDataModule`` with
``normalize="expected_norm"``; the factor each site is multiplied by must give the target
statistic, be recorded in the trained dictionary's provenance (separately for a
transcoder's two sites) and folded at export, and survive a resume exactly.
"""

from functools import partial

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_interp import create_dictionary, load_dictionary
from lightning_interp.callbacks import DownstreamMetrics, ExportDictionary
from lightning_interp.data import LanguageModelDataModule
from lightning_interp.data.normalize import estimate_scales
from lightning_interp.data.stream import ActivationStream
from lightning_interp.errors import ConfigError
from lightning_interp.metrics.downstream import CrossEntropyLossRecovered, splice_evaluation
from lightning_interp.modules import DictionaryModule, MultiDictionaryModule
from tests.helpers import quiet_trainer

SITE = "layers.1.resid_post"
PAIR = ["layers.0.mlp_in", "layers.0.mlp_out"]
ALL_TOKENS = 10**6  # more than the tiny text holds: the estimate reads every training row


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls: a second thread only adds contention on a loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def language_data(tiny_folders, sites=SITE, **kwargs) -> LanguageModelDataModule:
    settings = dict(
        text=tiny_folders["text"],
        context_size=16,
        batch_size=16,
        buffer_tokens=128,
        val_tokens=32,
        contexts_per_capture=4,
        downstream_contexts=4,
        normalize="expected_norm",
        normalize_tokens=ALL_TOKENS,
    )
    return LanguageModelDataModule(tiny_folders["gpt2"], sites, **{**settings, **kwargs})


def raw_rows(data: LanguageModelDataModule) -> dict[str, torch.Tensor]:
    """Every kept training row, unscaled, by site."""
    pieces = list(data.train_stream.rows_in_text_order(ALL_TOKENS))
    return {site: torch.cat([p[site] for p in pieces]).double() for site in pieces[0]}


def module(dictionary) -> DictionaryModule:
    return DictionaryModule(dictionary, optimizer=partial(torch.optim.Adam, lr=1e-3))


@pytest.mark.parametrize(
    ("target", "statistic", "wanted"),
    [
        ("unit", lambda n: n.pow(2).mean(), 1.0),  # Gemma Scope: mean squared norm 1
        ("sqrt_d", lambda n: n.mean(), 32**0.5),  # SAELens: mean norm sqrt(d)
        (2.5, lambda n: n.mean(), 2.5),
    ],
)
def test_batches_have_the_target_norm(tiny_folders, target, statistic, wanted):
    data = language_data(tiny_folders, normalize_target=target)
    data.setup()
    batches = torch.cat([batch[SITE] for batch in data.train_dataloader()]).double()
    scale = data.scales[SITE]
    # On the estimation sample the statistic is exact; the batches hold the same rows but
    # for a last part-batch, so they agree closely.
    assert float(statistic((scale * raw_rows(data)[SITE]).norm(dim=-1))) == pytest.approx(
        wanted, rel=1e-9
    )
    assert float(statistic(batches.norm(dim=-1))) == pytest.approx(wanted, rel=0.03)
    assert abs(scale - 1) > 0.2  # a real rescaling, not a no-op
    # Every batch (training and validation) is the raw one times the factor.
    raw = language_data(tiny_folders, normalize="none")
    raw.setup()
    assert raw.scales == {}
    for loader, raw_loader in [
        (data.train_dataloader(), raw.train_dataloader()),
        (data.val_dataloader(), raw.val_dataloader()),
    ]:
        pairs = list(zip(loader, raw_loader, strict=True))
        assert pairs
        for scaled, plain in pairs:
            torch.testing.assert_close(scaled[SITE], plain[SITE] * scale, rtol=1e-6, atol=0)


def test_export_takes_raw_activations_and_spliced_ce_reads_them(tiny_folders, tmp_path):
    data = language_data(tiny_folders, normalize_target="unit", train_tokens=16 * 6)
    dictionary = create_dictionary("standard", d_in=32, d_latent=64, l1_coefficient=0.1)
    trained = module(dictionary)
    callbacks = [DownstreamMetrics(), ExportDictionary()]
    trainer = quiet_trainer(max_steps=6, default_root_dir=tmp_path, callbacks=callbacks)
    trainer.fit(trained, datamodule=data)

    scale = data.scales[SITE]
    provenance = trained.dictionary.config.provenance
    assert provenance.activation_scale == scale and provenance.normalization == "expected_norm"
    assert provenance.activation_scale_out is None
    exported = load_dictionary(str(tmp_path / "dictionary"))
    assert exported.config.provenance.activation_scale == 1.0  # folded
    extra = exported.config.provenance.extra
    assert extra["folded_activation_scale"] == pytest.approx(scale)
    assert extra["activation_normalization"]["target"].startswith("mean squared L2 norm 1")
    raw = raw_rows(data)[SITE][:64].float()
    with torch.no_grad():
        torch.testing.assert_close(
            exported(raw), trained.dictionary(scale * raw) / scale, rtol=1e-4, atol=1e-5
        )
    # The callback spliced raw activations through the factor: its CE recovered is the
    # exported (raw-input) dictionary's.
    ce = CrossEntropyLossRecovered()
    for batch in data.downstream_inputs():
        splice_evaluation(data.backbone, exported, SITE, batch, ce_metric=ce)
    expected = ce.compute_all()
    logged = trainer.callback_metrics
    assert float(logged["val/delta_lm_loss"]) == pytest.approx(
        float(expected["delta_lm_loss"]), rel=1e-4, abs=1e-5
    )
    # The same spliced-CE tolerance, carried through (zero - spliced) / (zero - clean): on a
    # tiny random model zero-ablation barely moves the CE, so the ratio magnifies rounding.
    gap = abs(float(expected["ce_zero_ablation"] - expected["ce_clean"]))
    carried = 1e-4 * abs(float(expected["ce_spliced"])) / max(gap, 1e-12)
    assert float(logged["val/ce_loss_recovered"]) == pytest.approx(
        float(expected["ce_loss_recovered"]), abs=carried + 1e-5
    )


def test_a_transcoder_gets_separate_input_and_output_scales(tiny_folders, tmp_path):
    data = language_data(tiny_folders, PAIR, normalize_target="unit", train_tokens=16 * 4)
    transcoder = create_dictionary(
        "standard", d_in=32, d_latent=64, d_out=32, l1_coefficient=0.1, apply_b_dec_to_input=False
    )
    trained = module(transcoder)
    trainer = quiet_trainer(max_steps=4, default_root_dir=tmp_path, callbacks=[ExportDictionary()])
    trainer.fit(trained, datamodule=data)

    s_in, s_out = data.scales[PAIR[0]], data.scales[PAIR[1]]
    rows = raw_rows(data)
    for site, scale in data.scales.items():  # each site has its own unit mean squared norm
        assert float((scale * rows[site]).norm(dim=-1).pow(2).mean()) == pytest.approx(1.0)
    assert abs(s_in / s_out - 1) > 0.1  # the two sites differ: one factor would be wrong
    provenance = trained.dictionary.config.provenance
    assert (provenance.site, provenance.site_out) == tuple(PAIR)
    assert (provenance.activation_scale, provenance.activation_scale_out) == (s_in, s_out)
    exported = load_dictionary(str(tmp_path / "dictionary"))
    raw = rows[PAIR[0]][:64].float()
    with torch.no_grad():
        expected = trained.dictionary(s_in * raw) / s_out
        torch.testing.assert_close(exported(raw), expected, rtol=1e-4, atol=1e-5)


def test_dict_batches_scale_each_dictionary_by_its_own_site(tiny_folders):
    sites = ["layers.1.resid_post", "layers.2.resid_post"]
    data = language_data(tiny_folders, sites, train_tokens=16 * 2)

    def sae(site):
        dictionary = create_dictionary("topk", d_in=32, d_latent=64, k=4)
        dictionary.config.provenance.site = site
        return dictionary

    trained = MultiDictionaryModule({"a": sae(sites[0]), "b": sae(sites[1])})
    quiet_trainer(max_steps=2, limit_val_batches=0).fit(trained, datamodule=data)
    for name, site in zip("ab", sites, strict=True):
        provenance = trained.dictionaries[name].config.provenance
        assert provenance.activation_scale == data.scales[site]
        assert provenance.activation_scale_out is None


def test_resume_keeps_the_saved_scale(tiny_folders, tmp_path):
    def fit(data, steps, ckpt_path=None):
        trained = module(create_dictionary("topk", d_in=32, d_latent=64, k=4))
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
        trainer = quiet_trainer(
            max_steps=steps,
            limit_val_batches=1,
            enable_checkpointing=True,
            callbacks=[checkpoint],
            default_root_dir=tmp_path,
        )
        trainer.fit(trained, datamodule=data, ckpt_path=ckpt_path)
        return trained, checkpoint.best_model_path or checkpoint.last_model_path

    first = language_data(tiny_folders, train_tokens=16 * 8)
    _, path = fit(first, 4)
    saved = first.scales
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["LanguageModelDataModule"]
    assert state["train_stream"]["scales"] == saved
    # Resumed from a checkpoint written before the rename, which keys the data module's
    # state by its former class name: the state (and so the factor) must still be found.
    checkpoint["LanguageModelActivations"] = checkpoint.pop("LanguageModelDataModule")
    path = tmp_path / "before-the-rename.ckpt"
    torch.save(checkpoint, path)

    # Fewer estimation tokens would estimate another factor: the resumed run must not.
    resumed = language_data(tiny_folders, train_tokens=16 * 8, normalize_tokens=24)
    resumed.setup()
    fresh = estimate_scales(resumed.train_stream, 24, "sqrt_d")
    assert fresh[SITE] != saved[SITE]
    trained, _ = fit(resumed, 6, ckpt_path=path)
    assert resumed.scales == saved  # bitwise: restored, not re-estimated
    assert resumed.val_stream.scales == saved
    assert trained.dictionary.config.provenance.activation_scale == saved[SITE]

    # A run that normalised cannot continue on raw activations, nor the reverse.
    with pytest.raises(ConfigError, match="resume with the run's normalize"):
        language_data(tiny_folders, normalize="none").load_state_dict(state)
    with pytest.raises(ConfigError, match="resume with the run's normalize"):
        language_data(tiny_folders, normalize_target="unit").load_state_dict(state)


def test_stream_state_carries_its_scales(tiny_folders):
    data = language_data(tiny_folders, normalize="none")
    data.setup()
    stream = data.train_stream
    stream.scales = {SITE: 0.5}
    state = stream.state_dict()
    assert state["scales"] == {SITE: 0.5}

    def twin_stream(**scales):
        settings = dict(batch_size=16, context_size=16, contexts_per_capture=4, buffer_tokens=128)
        return ActivationStream(data.backbone, stream.texts, SITE, **settings, **scales)

    twin = twin_stream()
    twin.load_state_dict(state)
    assert twin.scales == {SITE: 0.5}
    other = twin_stream(scales={SITE: 2.0})
    with pytest.raises(ConfigError, match="scaling by"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="finite and > 0"):
        stream.scales = {SITE: 0.0}
    with pytest.raises(ConfigError, match="unknown sites"):
        stream.scales = {"layers.9.resid_post": 1.0}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("normalize", "yes", "normalize must be"),
        ("normalize_target", "half", "normalize_target must be"),
        ("normalize_target", -1.0, "normalize_target must be"),
        ("normalize_target", True, "normalize_target must be"),
        ("normalize_tokens", 0, "normalize_tokens must be"),
        ("normalize_tokens", 1.5, "normalize_tokens must be"),
    ],
)
def test_bad_settings_are_refused(tiny_folders, field, value, message):
    with pytest.raises(ConfigError, match=message):
        language_data(tiny_folders, **{field: value})
