import logging
import warnings

import pytest
import torch

# Two cores: more threads only add contention in the small matmuls tests run.
torch.set_num_threads(2)
for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
    logging.getLogger(name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


@pytest.fixture
def trainer_kwargs():
    """Quiet Trainer settings for tests: CPU, no logger, no checkpoints, no progress bar."""
    return dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
