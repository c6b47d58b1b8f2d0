import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.callbacks import LogProgress


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_log_progress_prints_about_twenty_plain_lines_an_epoch(capsys):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(200, 4, generator=g), torch.randn(200, 1, generator=g))
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[LogProgress(lines_per_epoch=20)],
        accelerator="cpu",
    )
    trainer.fit(Regression(), DataLoader(data, batch_size=2), DataLoader(data, batch_size=50))
    out = capsys.readouterr().out
    lines = out.splitlines()
    training = [line for line in lines if line.startswith("epoch ")]
    assert "\r" not in out
    assert len(training) == 40  # 100 batches an epoch, a line every 5, two epochs
    assert training[0].startswith("epoch 0 batch 5/100") and "train_loss=" in training[0]
    assert sum(line.startswith("validation at step 200") for line in lines) == 1
