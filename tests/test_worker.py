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


@pytest.mark.parametrize("grad_clip", [None, 0.5])
def test_fp16_loss_scaling_steps_and_clips_on_unscaled_gradients(grad_clip):
    from lowlabel.runner.worker import WorkerContext

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    before = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**10)
    ctx = WorkerContext(0, 1, torch.device("cpu"), torch.float16, channels_last=False, scaler=scaler)
    loss = model(torch.randn(8, 4)).pow(2).mean()
    ctx.optimizer_step(loss, optimizer, model.parameters(), grad_clip)
    # The step used the unscaled gradient: a plain SGD step from the same gradient.
    grad = model.weight.grad
    assert torch.allclose(model.weight, before - 0.1 * grad, atol=1e-6)
    assert grad.abs().max() < 100  # unscaled (the scale is 1024)
    if grad_clip:
        assert grad.norm() <= grad_clip + 1e-5
