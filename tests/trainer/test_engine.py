"""train_one_epoch / evaluate: the metrics they count, and the 10-crop softmax average."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.engine import Tally, evaluate, train_one_epoch


def test_tally_counts_top1_and_top5():
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5, 6],  # label 0: top-1 hit
            [0.0, 9, 8, 7, 6, 5, 1],  # label 5: in top-5 (9,8,7,6,5)
            [0.0, 9, 8, 7, 6, 5, 4],
        ]
    )  # label 6: outside top-5
    t = Tally()
    t.add(logits, torch.tensor([0, 5, 6]), torch.tensor(3.0))
    m = t.metrics("val")
    assert (t.top1, t.top5, t.count) == (1, 2, 3)
    assert abs(m["val_top1_error"] - 2 / 3) < 1e-9 and abs(m["val_top5_error"] - 1 / 3) < 1e-9
    assert m["val_loss"] == 1.0


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_ten_crop_evaluation_averages_softmax_over_crops():
    torch.manual_seed(0)
    model = Linear()
    images = torch.randn(2, 10, 3, 4, 4)
    labels = torch.tensor([0, 2])
    tally = evaluate(model, [(images, labels)])
    with torch.no_grad():
        probs = model(images.flatten(0, 1)).softmax(1).view(2, 10, 3).mean(1)
    expected_top1 = int((probs.argmax(1) == labels).sum())
    assert tally.top1 == expected_top1 and tally.count == 2
    assert abs(tally.loss_sum - float(F.nll_loss(probs.log(), labels, reduction="sum"))) < 1e-5


def test_train_one_epoch_learns_and_times_the_data_wait():
    torch.manual_seed(0)
    model = Linear()
    x = torch.randn(64, 3, 4, 4)
    y = (x.flatten(1)[:, 0] > 0).long()
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    first = train_one_epoch(model, batches, opt)
    for _ in range(20):
        last = train_one_epoch(model, batches, opt)
    assert first.count == last.count == 64
    assert last.metrics("train")["train_loss"] < first.metrics("train")["train_loss"]
    assert last.top1 > first.top1


@pytest.mark.gpu
def test_a_bf16_channels_last_train_step_on_the_gpu_lowers_the_loss():
    """The trainer's GPU defaults (bf16 autocast, channels_last: trainer.layout) through
    train_one_epoch: autocast is on (bf16 logits) and the loss on the batch falls."""
    from trainer.config import TrainConfig
    from trainer.model import AlexNet, AlexNetConfig
    from trainer.optim import build_optimizer

    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = AlexNet(AlexNetConfig(num_classes=10, init="kaiming"), devices=(device, device))
    model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, TrainConfig.preset("sample").recipe)
    x = torch.randn(32, 3, 227, 227).to(
        device, memory_format=torch.channels_last
    )  # centred and scaled, as the sample recipe feeds it
    y = torch.arange(32, device=device) % 10

    def loss() -> float:
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x)
        assert logits.dtype == torch.bfloat16  # autocast reached the layers
        return float(F.cross_entropy(logits.float(), y))

    before = loss()
    tally = train_one_epoch(model, [(x, y)] * 15, optimizer, amp_dtype=torch.bfloat16, device=device)
    assert tally.count == 15 * 32 and torch.isfinite(torch.tensor(tally.loss_sum))
    assert loss() < 0.95 * before
