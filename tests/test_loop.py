"""The training loop's early stopping: the best epoch is the one whose weights are kept."""

import pytest
import torch
from torch import nn

from components.training.loop import EarlyStopping


def _run(losses, patience=10, min_delta=0.0):
    stopping, model, stopped = EarlyStopping(patience, min_delta), nn.Linear(1, 1), None
    for epoch, loss in enumerate(losses, 1):
        with torch.no_grad():
            model.weight.fill_(epoch)  # the weights say which epoch they are from
        stopping.update(epoch, loss, model)
        if stopping.should_stop:
            stopped = epoch
            break
    return stopping, stopped


@pytest.mark.parametrize("losses, min_delta, best", [
    ([1.0, 0.5, 0.4995, 0.6], 0.001, 2),     # 0.0005 better is not better by min_delta
    ([1.0, 0.5, 0.4995, 0.6], 0.0, 3),       # without min_delta it is
    ([1.0, 0.5, 0.4995, 0.498], 0.001, 4),   # 0.002 better than the best kept, though only 0.0015 than epoch 3
    ([1.0, 1.0, 1.0], 0.0, 1),               # equal is not better
])
def test_the_best_epoch_is_the_epoch_whose_weights_are_kept(losses, min_delta, best):
    stopping, _ = _run(losses, min_delta=min_delta)
    assert stopping.best_epoch == best
    assert stopping.best_state["weight"].item() == best
    assert stopping.best_loss == losses[best - 1]


def test_it_stops_after_patience_epochs_without_improvement_and_a_restored_state_goes_on_the_same():
    stopping, stopped = _run([1.0, 0.9, 0.95, 0.91, 0.92], patience=3)
    assert stopped == 5 and stopping.best_epoch == 2
    again = EarlyStopping(3, 0.0)
    again.restore(_run([1.0, 0.9, 0.95], patience=3)[0].state())
    for epoch, loss in ((4, 0.91), (5, 0.92)):
        again.update(epoch, loss, nn.Linear(1, 1))
    assert again.should_stop and again.best_epoch == 2
