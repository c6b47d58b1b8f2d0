"""Resuming refuses another model's checkpoint and names what is wrong with a damaged file."""

import re

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_interp.errors import CheckpointError
from lightning_interp.modules import MultiDictionaryModule
from lightning_interp.modules.checkpoints import check_checkpoint_file
from tests.helpers import make_module, quiet_trainer, small_dictionary


def batches(n: int = 6) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader([torch.randn(64, 32, generator=generator) for _ in range(n)], batch_size=None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``last.ckpt`` of a TopK (d_latent 128, k 4) after 4 of 6 steps."""
    folder = tmp_path_factory.mktemp("run")
    module = make_module(small_dictionary("topk", k=4), decay_fraction=0.0)
    trainer = quiet_trainer(
        max_steps=4,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=folder, save_last=True)],
    )
    trainer.fit(module, batches())
    return folder / "last.ckpt"


def resume(dictionary, path) -> int:
    module = make_module(dictionary, decay_fraction=0.0)
    quiet_trainer(max_steps=6).fit(module, batches(), ckpt_path=path)
    return module.global_step


def test_the_same_dictionary_resumes(checkpoint):
    assert resume(small_dictionary("topk", k=4), checkpoint) == 6


@pytest.mark.parametrize(
    ("dictionary", "difference"),
    [
        # Same tensor shapes: Lightning alone would load it without a word.
        (small_dictionary("topk", k=2), "k: checkpoint 4, this run 2"),
        (small_dictionary("batchtopk", k=4), "architecture: checkpoint TopKSAE"),
        (small_dictionary("topk", k=4, d_latent=256), "d_latent: checkpoint 128, this run 256"),
        (small_dictionary("topk", k=4, d_in=16), "d_in: checkpoint 32, this run 16"),
    ],
)
def test_another_dictionary_is_refused_before_loading(checkpoint, dictionary, difference):
    with pytest.raises(CheckpointError, match=f"{re.escape(str(checkpoint))}.*{difference}"):
        resume(dictionary, checkpoint)


def test_a_multi_dictionary_run_checks_names_and_configs(tmp_path):
    def module(**dictionaries):
        return MultiDictionaryModule(dictionaries)

    trainer = quiet_trainer(
        max_steps=2,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )
    trainer.fit(module(a=small_dictionary("topk", k=4)), batches())
    path = tmp_path / "last.ckpt"
    with pytest.raises(CheckpointError, match=r"holds dictionaries \['a'\] but this run trains"):
        quiet_trainer(max_steps=3).fit(
            module(b=small_dictionary("topk")), batches(), ckpt_path=path
        )
    with pytest.raises(CheckpointError, match="dictionary 'a' than this run's .k: checkpoint 4"):
        quiet_trainer(max_steps=3).fit(
            module(a=small_dictionary("topk", k=3)), batches(), ckpt_path=path
        )


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[: len(data) // 2], "is truncated"),
        (lambda data: b"", r"is empty \(0 bytes\)"),
        # The zip directory survives but the data is zeroed: torch.load itself fails.
        (lambda data: data[:200] + bytes(len(data) - 400) + data[-200:], "cannot read checkpoint"),
    ],
)
def test_a_damaged_checkpoint_names_the_file_and_the_problem(checkpoint, tmp_path, damage, message):
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(damage(checkpoint.read_bytes()))
    with pytest.raises(
        CheckpointError, match=f"checkpoint {damaged} {message}|{message} {damaged}"
    ):
        resume(small_dictionary("topk", k=4), damaged)
    if "cannot read" not in message:  # the cheap check alone already knows
        with pytest.raises(CheckpointError):
            check_checkpoint_file(damaged)


def test_a_sound_checkpoint_passes_the_file_check(checkpoint):
    check_checkpoint_file(checkpoint)  # no error
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 4
