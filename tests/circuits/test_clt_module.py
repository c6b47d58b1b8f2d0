"""CrossLayerTranscoderModule: a planted CLT recovered through a real Trainer; the recipe."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_interp.circuits import CLTConfig, CrossLayerTranscoder
from lightning_interp.cli import build_cli
from lightning_interp.data import mean_max_cosine_similarity
from lightning_interp.errors import CheckpointError
from lightning_interp.modules import CrossLayerTranscoderModule
from tests.helpers import quiet_trainer

N_LAYERS, D, F = 3, 8, 8


class PlantedCLT(torch.utils.data.IterableDataset):
    """Batches ``{site: rows}`` from a known CLT: 2 of 8 features active per layer and row.

    Each layer's inputs are its codes times an orthogonal matrix (so features are
    recoverable), and each output layer sums the planted decoders of every layer up to it.
    """

    def __init__(self, steps: int, rows: int = 256, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(0)
        self.encoders = [torch.linalg.qr(torch.randn(D, D, generator=g))[0] for _ in range(3)]
        self.decoders = [torch.randn(F, N_LAYERS - s, D, generator=g) for s in range(N_LAYERS)]
        self.decoders = [d / d.flatten(1).norm(dim=1)[:, None, None] for d in self.decoders]
        self.bias = torch.randn(N_LAYERS, D, generator=g) * 0.1
        self.steps, self.rows, self.seed = steps, rows, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.steps):
            batch, outputs = {}, self.bias[:, None].repeat(1, self.rows, 1)
            for s in range(N_LAYERS):
                active = torch.rand(self.rows, F, generator=g).argsort(-1)[:, :2]
                codes = torch.zeros(self.rows, F).scatter_(
                    1, active, 1 + torch.rand(self.rows, 2, generator=g)
                )
                batch[f"layers.{s}.mlp_in"] = codes @ self.encoders[s].T
                outputs[s:] += torch.einsum("nf,ftd->tnd", codes, self.decoders[s])
            for t in range(N_LAYERS):
                batch[f"layers.{t}.mlp_out"] = outputs[t]
            yield batch


@pytest.fixture
def one_thread():
    """One intra-op thread: a 16-feature problem gains nothing from two, and on a busy
    machine Adam's per-parameter ``sqrt`` (MKL, parallel after ``set_num_threads(2)`` in
    conftest) stalled waiting for the second thread: 13.5 s instead of 1.7 s for this fit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_planted_clt_is_recovered_through_a_trainer(one_thread):
    torch.manual_seed(0)
    steps = 200
    data = PlantedCLT(steps=steps, rows=256)
    # Twice the planted width: with exactly as many features as planted ones, a feature
    # stuck between two planted ones is common and recovery depends on the seed.
    config = CLTConfig(n_layers=N_LAYERS, d_in=D, d_latent=2 * F, activation="topk", k=2)
    module = CrossLayerTranscoderModule(
        config,
        optimizer=lambda p: torch.optim.Adam(p, lr=2e-2),
        decay_fraction=0.5,  # settle at the end rather than hover at lr 2e-2
        dead_tokens_threshold=2000,  # AuxK revives features silent for ~8 steps
        export_dir=None,
    )
    assert not module.clt.uses_sparse_path(0)  # 16 features: dense autograd is faster
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    val = torch.utils.data.DataLoader(PlantedCLT(steps=1, rows=1024, seed=99), batch_size=None)
    trainer = quiet_trainer(max_steps=steps)

    def cosines() -> list[float]:
        # Decoders concatenated over the layers each feature writes (random: 0.25-0.66).
        learned = [w.detach().flatten(1) for w in module.clt.W_dec]
        return [
            mean_max_cosine_similarity(w, planted.flatten(1))
            for w, planted in zip(learned, data.decoders, strict=True)
        ]

    before, cosines_before = trainer.validate(module, val, verbose=False)[0], cosines()
    trainer.fit(module, loader)
    after, cosines_after = trainer.validate(module, val, verbose=False)[0], cosines()
    # Over 9 initial seeds: FVU 0.001-0.06 and cosine 0.86-0.99 after 200 steps (before:
    # FVU 1.4-1.8), so these bounds leave margin for another CPU's rounding.
    for t in range(N_LAYERS):
        assert after[f"val/fvu/{t}"] < 0.1 and before[f"val/fvu/{t}"] > 0.5, after
    for s in range(N_LAYERS):
        assert cosines_after[s] > 0.8 and cosines_after[s] > cosines_before[s] + 0.1
    assert int(module.tokens_seen) == steps * 256


def test_a_nonfinite_batch_is_skipped_without_moving_weights():
    config = CLTConfig(n_layers=N_LAYERS, d_in=D, d_latent=F, activation="jumprelu")
    module = CrossLayerTranscoderModule(config, on_nonfinite="skip", export_dir=None)
    before = {k: v.clone() for k, v in module.clt.state_dict().items()}
    bad = next(iter(PlantedCLT(steps=1)))
    bad["layers.1.mlp_in"][3, 2] = float("nan")
    quiet_trainer(max_steps=1).fit(module, torch.utils.data.DataLoader([bad], batch_size=None))
    assert module.guard.skipped["train"] == 1
    assert all(torch.equal(v, before[k]) for k, v in module.clt.state_dict().items())


def test_clt_recipe_trains_through_the_cli(tmp_path, monkeypatch):
    from tests.test_recipes import FAMILY_OF_MODEL, TINY_LAYERS, TINY_WIDTH, make_tiny_world

    monkeypatch.setattr(sys, "argv", ["lightning-interp"])
    folders, text = make_tiny_world(tmp_path / "world", documents=60)
    recipe = yaml.safe_load(Path("recipes/smollm2_clt.yaml").read_text())
    recipe["trainer"].update(
        default_root_dir=str(tmp_path / "run"),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=4,
        limit_val_batches=1,
    )
    clt = recipe["model"]["init_args"]["clt"]
    assert "d_in" not in clt and "d_out" not in clt  # widths come from the model
    clt.update(n_layers=TINY_LAYERS, d_latent=16, k=4)
    data = recipe["data"]["init_args"]
    data.update(
        model=str(folders[FAMILY_OF_MODEL[data["model"]]]),
        text=str(text),
        context_size=16,
        batch_size=64,
        buffer_tokens=256,
        train_tokens=64 * 4,
        val_tokens=64,
        contexts_per_capture=8,
        val_fraction=0.1,
    )
    recipe["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 2
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    first = build_cli(["fit", "--config", str(path), "--trainer.max_steps=2"])
    assert first.trainer.global_step == 2
    # `fit --ckpt_path last` resumes weights, optimizer and feature-firing counters.
    cli = build_cli(["fit", "--config", str(path), "--ckpt_path", "last"])
    assert cli.trainer.global_step == 4 and int(cli.model.tokens_seen) == 4 * 64
    saved = CrossLayerTranscoder.load(tmp_path / "run" / "clt")
    assert (saved.n_layers, saved.config.d_in, saved.config.output_width) == (
        TINY_LAYERS,
        TINY_WIDTH,
        TINY_WIDTH,
    )
    assert saved.input_sites[3] == "layers.3.mlp_in" and saved.config.backbone is not None
    assert cli.trainer.callback_metrics["val/fvu/0"].isfinite()


# ---------------------------------------------------------------- resuming
def small_module(**changes) -> CrossLayerTranscoderModule:
    fields = dict(n_layers=N_LAYERS, d_in=D, d_latent=F, activation="topk", k=2) | changes
    return CrossLayerTranscoderModule(CLTConfig(**fields), export_dir=None)


def resume(module, path, steps: int = 4) -> int:
    loader = torch.utils.data.DataLoader(PlantedCLT(steps=6, rows=32), batch_size=None)
    quiet_trainer(max_steps=steps).fit(module, loader, ckpt_path=path)
    return module.global_step


@pytest.fixture(scope="module")
def clt_checkpoint(tmp_path_factory):
    """``last.ckpt`` of a TopK CLT (k 2, width 8) after 2 steps."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    folder = tmp_path_factory.mktemp("clt_run")
    loader = torch.utils.data.DataLoader(PlantedCLT(steps=2, rows=32), batch_size=None)
    callback = ModelCheckpoint(dirpath=folder, save_last=True)
    trainer = quiet_trainer(max_steps=2, enable_checkpointing=True, callbacks=[callback])
    trainer.fit(small_module(), loader)
    return folder / "last.ckpt"


def test_the_same_clt_resumes(clt_checkpoint):
    # d_latent as a list and the default sites written out are the same CLT.
    sites = [f"layers.{i}.mlp_in" for i in range(N_LAYERS)]
    assert resume(small_module(d_latent=[F] * N_LAYERS, input_sites=sites), clt_checkpoint) == 4


@pytest.mark.parametrize(
    ("changes", "difference"),
    [
        # Same tensor shapes: Lightning alone would load it without a word.
        ({"k": 3}, "k: checkpoint 2, this run 3"),
        ({"activation": "batchtopk"}, "activation: checkpoint 'topk', this run 'batchtopk'"),
        ({"d_latent": 16}, r"d_latent: checkpoint \[8, 8, 8\], this run \[16, 16, 16\]"),
        ({"n_layers": 2}, "n_layers: checkpoint 3, this run 2"),
        (
            {"output_sites": [f"layers.{i}.mlp_out" for i in (1, 2, 0)]},
            r"output_sites: checkpoint \['layers.0.mlp_out'",
        ),
    ],
)
def test_another_clt_is_refused_before_loading(clt_checkpoint, changes, difference):
    where = re.escape(f"checkpoint {clt_checkpoint} was written by a different CLT")
    with pytest.raises(CheckpointError, match=f"{where}.*{difference}"):
        resume(small_module(**changes), clt_checkpoint)


def test_a_damaged_or_foreign_checkpoint_is_named(clt_checkpoint, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(clt_checkpoint.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{re.escape(str(truncated))} is truncated"):
        resume(small_module(), truncated)
    not_torch = tmp_path / "notes.ckpt"
    not_torch.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        resume(small_module(), not_torch)
    # A sound Lightning checkpoint of another module (a dictionary's hyper-parameters).
    state = torch.load(clt_checkpoint, weights_only=True)
    state["hyper_parameters"] = {"dictionary": {"class_path": "TopKSAE"}}
    foreign = tmp_path / "dictionary.ckpt"
    torch.save(state, foreign)
    with pytest.raises(CheckpointError, match="not written by a CrossLayerTranscoderModule"):
        resume(small_module(), foreign)
