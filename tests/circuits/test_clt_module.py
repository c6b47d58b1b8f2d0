"""CrossLayerTranscoderModule: a planted CLT recovered through a real Trainer; the recipe."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml

from lightning_interp.circuits import CLTConfig, CrossLayerTranscoder
from lightning_interp.cli import build_cli
from lightning_interp.data import mean_max_cosine_similarity
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


def test_planted_clt_is_recovered_through_a_trainer():
    torch.manual_seed(0)
    data = PlantedCLT(steps=600, rows=128)
    config = CLTConfig(n_layers=N_LAYERS, d_in=D, d_latent=F, activation="topk", k=2)
    module = CrossLayerTranscoderModule(
        config,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
        dead_tokens_threshold=2000,  # AuxK revives features silent for ~16 steps
        export_dir=None,
    )
    # Same results as the sparse kernels (test_clt.py), far less overhead at this size.
    module.clt.sparse_training = False
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    val = torch.utils.data.DataLoader(PlantedCLT(steps=4, seed=99), batch_size=None)
    trainer = quiet_trainer(max_epochs=1)
    before = trainer.validate(module, val, verbose=False)[0]
    trainer.fit(module, loader)
    after = trainer.validate(module, val, verbose=False)[0]
    for t in range(N_LAYERS):
        assert after[f"val/fvu/{t}"] < 0.06 and before[f"val/fvu/{t}"] > 0.5, after
    # The planted features' decoders (concatenated over the layers each writes) are found;
    # random directions would score about 0.4-0.6 here.
    for s in range(N_LAYERS):
        learned = module.clt.W_dec[s].detach().flatten(1)
        assert mean_max_cosine_similarity(learned, data.decoders[s].flatten(1)) > 0.75
    assert int(module.tokens_seen) == 600 * 128


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
