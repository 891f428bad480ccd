"""The one training loop on a real tiny model (detectron2 trains an nn.Linear for a few steps too)."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cxr_noisy_student.loops.trainer import Hook, NonFiniteLossError, Trainer, lr_factor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class LinearTrainer(Trainer):
    """The smallest task: the model's squared error is the loss dict; the score is minus the train loss."""

    def forward(self, batch):
        x, y = batch
        error = (self.model(x) - y) ** 2
        return {"loss": error.mean(), "max_error": error.max()}, len(x)

    def end_epoch(self):
        row = super().end_epoch()
        row["best"] = self.keep_if_best(-row["train_loss"])
        return row


def make(x, y, *, epochs=3, name=None, hooks=()):
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    total = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps=0, total_steps=total))
    return LinearTrainer(model, loader, optimizer, scheduler, epochs=epochs, device="cpu", grad_clip=1.0, name=name,
                         hooks=hooks)


def line_data(n=16):
    x = torch.linspace(-1, 1, n)[:, None]
    return x, 2 * x + 0.5


def test_trainer_trains_on_the_loss_dict_and_keeps_the_best_epoch():
    steps = []

    class Steps(Hook):
        def after_step(self, t):
            assert set(t.losses) == {"loss", "max_error"} and not t.losses["loss"].requires_grad
            steps.append(t.step)

    trainer = make(*line_data(), epochs=4, hooks=[Steps()])
    trainer.train()
    losses = [row["train_loss"] for row in trainer.history]
    assert steps == list(range(1, 17)) and len(losses) == 4 and losses[-1] < losses[0]
    assert trainer.best_epoch == min(range(4), key=losses.__getitem__)
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in trainer.best_state.items())
    assert trainer.history[-1]["lr"] == pytest.approx(0.0) and not math.isnan(trainer.best_score)


def test_non_finite_loss_stops_with_one_line_naming_run_step_and_epoch():
    x, y = line_data()
    y[9] = float("inf")  # with shuffling, one batch of the first epoch holds it
    trainer = make(x, y, name="detector gen 1 fold 2")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"detector gen 1 fold 2: training loss is inf at step {trainer.step + 1} (epoch 1/3);")
    assert trainer.step < 4  # stopped within the first epoch, before that step's update
    if trainer.step == 0:
        assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
