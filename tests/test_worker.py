import pytest
import torch

from lowlabel.runner.worker import NonFiniteLossError, Progress, check_finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_loss_stops_with_epoch_and_step(bad):
    with pytest.raises(NonFiniteLossError, match=r"at epoch 3 step 17.*last good checkpoint is kept"):
        check_finite(torch.tensor(bad), epoch=3, step=17)
    check_finite(torch.tensor(1.5), epoch=3, step=17)


def test_progress_line_has_throughput_and_eta():
    progress = Progress("pretrain@simclr", total=4)
    line = progress.line(1, images=1000, seconds=2.0, metrics={"loss": 4.25})
    assert line.startswith("[pretrain@simclr] epoch 1/4 loss 4.25")
    assert "500 img/s" in line and "eta" in line
