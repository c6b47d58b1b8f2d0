"""DictionaryModule under a real 2-process gloo DDP run matches the 1-process run."""

from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_interp import create_dictionary
from lightning_interp.data.sharding import world
from lightning_interp.modules import DictionaryModule
from tests.helpers import planted_data, quiet_trainer


class RankSlices(IterableDataset):
    """Step ``s`` of rank ``r`` gets rows ``[s*B + r*B/R, s*B + (r+1)*B/R)`` of a global batch
    of ``B`` rows, so the ranks' batches of one step together are the 1-process batch."""

    def __init__(self, rows: torch.Tensor, global_batch: int) -> None:
        self.rows, self.global_batch = rows, global_batch

    def __len__(self) -> int:
        return self.rows.shape[0] // self.global_batch

    def __iter__(self):
        rank, ranks = world()
        per_rank = self.global_batch // ranks
        for step in range(len(self)):
            start = step * self.global_batch + rank * per_rank
            yield self.rows[start : start + per_rank]


def run(devices: int, architecture: str):
    torch.manual_seed(0)
    x = planted_data().sample(256 * 20, generator=torch.Generator().manual_seed(0))[0]
    kwargs = {"k": 4} if architecture == "topk" else {"l1_coefficient": 0.5}
    dictionary = create_dictionary(architecture, d_in=32, d_latent=128, b_dec_init="mean", **kwargs)
    module = DictionaryModule(
        dictionary,
        optimizer=partial(torch.optim.Adam, lr=3e-3),
        dead_tokens_threshold=1024,  # some latents go dead, so AuxK and its reductions run
    )
    # The same global batch of 256 rows: whole in one process, halved across two ranks.
    loader = DataLoader(RankSlices(x, 256), batch_size=None)
    strategy = "ddp_spawn" if devices > 1 else "auto"
    trainer = quiet_trainer(
        max_epochs=1, devices=devices, strategy=strategy, use_distributed_sampler=False
    )
    trainer.fit(module, loader)
    return module


@pytest.mark.parametrize("architecture", ["topk", "standard"])
def test_two_process_ddp_matches_one_process(architecture):
    single = run(1, architecture)
    double = run(2, architecture)
    for (name, a), (_, b) in zip(
        single.dictionary.named_parameters(), double.dictionary.named_parameters(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-4, msg=f"{name} differs")
    # Token and dead-latent counters are global (reduced over ranks), not per rank.
    assert int(double.tokens_seen) == int(single.tokens_seen) == 256 * 20
    torch.testing.assert_close(double.tokens_since_fired, single.tokens_since_fired)


def run_with_a_nan(devices: int) -> DictionaryModule:
    """Step 5's global batch holds one NaN, in the half that rank 1 gets under DDP."""
    torch.manual_seed(0)
    x = planted_data().sample(256 * 8, generator=torch.Generator().manual_seed(0))[0]
    x[5 * 256 + 200, 3] = float("nan")
    dictionary = create_dictionary("topk", d_in=32, d_latent=128, k=4, b_dec_init="mean")
    module = DictionaryModule(
        dictionary, optimizer=partial(torch.optim.Adam, lr=3e-3), on_nonfinite="skip"
    )
    strategy = "ddp_spawn" if devices > 1 else "auto"
    trainer = quiet_trainer(
        max_epochs=1, devices=devices, strategy=strategy, use_distributed_sampler=False
    )
    trainer.fit(module, DataLoader(RankSlices(x, 256), batch_size=None))
    return module


def test_a_nonfinite_batch_on_one_rank_skips_the_step_on_every_rank():
    # Rank 0's half of step 5 is clean: had it stepped alone, the ranks' weights would
    # diverge (or DDP would hang waiting for rank 1's gradients).
    single, double = run_with_a_nan(1), run_with_a_nan(2)
    for (name, a), (_, b) in zip(
        single.dictionary.named_parameters(), double.dictionary.named_parameters(), strict=True
    ):
        assert torch.isfinite(b).all(), name
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-4, msg=f"{name} differs")
    assert int(double.tokens_seen) == int(single.tokens_seen) == 256 * 7
