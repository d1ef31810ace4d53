"""The paper's update rule (section 5), weight decay on weights only, the plateau schedule
through a real optimizer, and the warm-up."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from trainer.config import TrainConfig
from trainer.optim import PaperSGD, build_optimizer, build_scheduler, param_groups, plateau_judges, warmup_scale

PAPER = TrainConfig().recipe  # the default recipe is the paper's (test_recipe.py holds that)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2).double()


def grads(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]


def test_update_rule_is_the_papers_formula_across_an_lr_drop():
    """v <- 0.9 v - 0.0005 lr w - lr g; w <- w + v, written out per tensor, for 3 steps at lr
    0.01 and 3 at 0.001; torch's SGD agrees before the drop and not after it."""
    torch.manual_seed(0)
    net = Tiny()
    opt = build_optimizer(net, PAPER)
    ref_w = [p.detach().clone() for p in net.parameters()]
    ref_v = [torch.zeros_like(w) for w in ref_w]
    decays = [5e-4, 0.0]  # weight, bias
    torch_net = Tiny()
    torch_net.load_state_dict(net.state_dict())
    torch_sgd = torch.optim.SGD(
        [{"params": [torch_net.fc.weight], "weight_decay": 5e-4}, {"params": [torch_net.fc.bias], "weight_decay": 0.0}],
        lr=0.01,
        momentum=0.9,
    )
    for step in range(6):
        lr = 0.01 if step < 3 else 0.001
        for group in opt.param_groups + torch_sgd.param_groups:
            group["lr"] = lr
        g = grads(step, ref_w)
        for p, q, gi in zip(net.parameters(), torch_net.parameters(), g):
            p.grad, q.grad = gi.clone(), gi.clone()
        opt.step()
        torch_sgd.step()
        for i, (w, v, gi, d) in enumerate(zip(ref_w, ref_v, g, decays)):
            ref_v[i] = 0.9 * v - d * lr * w - lr * gi
            ref_w[i] = w + ref_v[i]
        for p, w in zip(net.parameters(), ref_w):
            torch.testing.assert_close(p.detach(), w, rtol=1e-13, atol=1e-15)
        same_as_torch = all(
            torch.allclose(p, q, rtol=1e-12, atol=1e-15) for p, q in zip(net.parameters(), torch_net.parameters())
        )
        assert same_as_torch == (step < 3), step  # the rules part at the first step after the drop


def test_weight_decay_on_weights_not_biases_with_a_switch():
    torch.manual_seed(0)
    net = Tiny()
    groups = param_groups(net, 5e-4, decay_biases=False)
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    assert groups[0]["params"] == [net.fc.weight] and groups[1]["params"] == [net.fc.bias]
    # With a zero gradient and no momentum yet, only decay moves a parameter.
    opt = build_optimizer(net, PAPER)
    w0, b0 = net.fc.weight.detach().clone(), net.fc.bias.detach().clone()
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(net.fc.bias, b0)
    torch.testing.assert_close(net.fc.weight.detach(), w0 * (1 - 0.01 * 5e-4), rtol=1e-14, atol=0)
    everything = build_optimizer(net, replace(PAPER, decay_biases=True))
    assert [g["weight_decay"] for g in everything.param_groups] == [5e-4, 5e-4]


def test_update_is_foreach_across_devices_and_dtypes():
    """Parameters on two devices (the two columns) and two dtypes update in one step."""
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = PaperSGD([a, b], lr=0.1, momentum=0.9, weight_decay=0.0)
    a.grad, b.grad = torch.ones(3), torch.ones(2, dtype=torch.float64)
    opt.step()
    opt.step()
    assert torch.allclose(a, torch.full((3,), 1 - 0.1 - (0.9 * 0.1 + 0.1)))
    assert torch.allclose(b, torch.full((2,), 1 - 0.1 - 0.19, dtype=torch.float64))
    assert set(opt.state_dict()["state"][0]) == {"velocity"}


def test_plateau_schedule_through_a_real_optimizer():
    """lr /= 10 after lr_patience epochs without improvement of the val error, three times at most."""
    net = Tiny()
    opt = build_optimizer(net, PAPER)
    sched = build_scheduler(opt, PAPER)
    assert PAPER.lr_patience == 2
    errors = [0.9, 0.8, 0.7] + [0.7] * 3 + [0.6] + [0.6] * 3 + [0.6] * 3 + [0.6] * 6
    lrs = []
    for err in errors:
        sched.step(err)
        lrs.append(opt.param_groups[0]["lr"])
    assert all(g["lr"] == lrs[-1] for g in opt.param_groups)  # weights and biases alike
    drops = [i for i in range(1, len(lrs)) if lrs[i] < lrs[i - 1]]
    assert drops == [5, 9, 12]  # 3 epochs at 0.7 (patience 2 exceeded), then after 0.6 stalls twice
    for i in drops:
        assert lrs[i] == pytest.approx(lrs[i - 1] * 0.1, rel=1e-12)
    assert lrs[-1] == pytest.approx(0.01 * 0.1**3, rel=1e-12)  # and no fourth drop


def test_warmup_is_linear_and_off_in_the_paper_preset():
    assert TrainConfig.preset("paper").recipe.warmup_epochs == 0
    assert warmup_scale(PAPER, 0, 0, 10) is None
    cfg = replace(PAPER, warmup_epochs=2)
    scales = [warmup_scale(cfg, e, s, 10) for e in range(3) for s in range(10)]
    assert scales[:20] == [pytest.approx((i + 1) / 20) for i in range(20)]
    assert scales[20:] == [None] * 10


@pytest.mark.parametrize("warmup, first_judged", [(0, 0), (0.5, 1), (1, 1), (1.5, 2), (2, 2)])
def test_the_plateau_schedule_judges_only_epochs_begun_after_the_warmup(warmup, first_judged):
    cfg = replace(PAPER, warmup_epochs=warmup)
    assert [plateau_judges(cfg, e) for e in range(4)] == [e >= first_judged for e in range(4)]
    steps = 10  # and every step of a judged epoch runs at the full lr
    assert all(warmup_scale(cfg, first_judged, s, steps) is None for s in range(steps))
    if first_judged:  # while the epoch before it had at least one warm-up step
        assert any(warmup_scale(cfg, first_judged - 1, s, steps) is not None for s in range(steps))
