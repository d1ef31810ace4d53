"""The paper's AlexNet (section 3 and 5), checked fact by fact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.grouped_model import GroupedAlexNet
from trainer.lrn import PaperLRN
from trainer.model import AlexNet, AlexNetConfig, count_parameters

torch.manual_seed(0)


@pytest.fixture(scope="module")
def model() -> AlexNet:
    torch.manual_seed(0)
    return AlexNet().eval()


def capture(store: dict | list, key: str, transform=lambda o: o):
    """A forward hook that records a layer's output (and returns None: keeps the output)."""

    def hook(module, inputs, output):
        if isinstance(store, list):
            store.append(transform(output))
        else:
            store.setdefault(key, transform(output))

    return hook


def x227(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 227, 227, generator=torch.Generator().manual_seed(1))


def test_parameter_count_is_the_papers(model):
    assert count_parameters(model) == 60_965_224


def test_per_layer_output_shapes(model):
    shapes = {}
    column = model.columns[0]
    shape = lambda o: tuple(o.shape)  # noqa: E731
    hooks = [
        getattr(column, name).register_forward_hook(capture(shapes, name, shape))
        for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
    ]
    pools: list = []
    hooks.append(column.pool.register_forward_hook(capture(pools, "pool", shape)))
    model(x227())
    for h in hooks:
        h.remove()
    assert shapes["conv1"] == (2, 48, 55, 55)
    assert shapes["conv2"] == (2, 128, 27, 27)
    assert shapes["conv3"] == (2, 192, 13, 13)
    assert shapes["conv4"] == (2, 192, 13, 13)
    assert shapes["conv5"] == (2, 128, 13, 13)
    assert pools == [(2, 48, 27, 27), (2, 128, 13, 13), (2, 128, 6, 6)]
    assert shapes["fc6"] == (2, 2048) and shapes["fc7"] == (2, 2048) and shapes["fc8"] == (2, 500)
    # conv3 and fc6/fc7/fc8 take BOTH columns' outputs as input.
    assert column.conv3.in_channels == 256 and column.fc6.in_features == 9216
    assert column.fc7.in_features == 4096 and column.fc8.in_features == 4096
    # conv2, conv4, conv5 only their own column's.
    assert (column.conv2.in_channels, column.conv4.in_channels, column.conv5.in_channels) == (48, 192, 192)
    assert AlexNetConfig().spatial_sizes() == {
        "conv1": 55,
        "pool1": 27,
        "conv2": 27,
        "pool2": 13,
        "conv3": 13,
        "conv4": 13,
        "conv5": 13,
        "pool5": 6,
    }


def paper_lrn_direct(a: torch.Tensor, k=2.0, n=5, alpha=1e-4, beta=0.75) -> torch.Tensor:
    """Section 3.3's formula, written out literally."""
    N = a.shape[1]
    b = torch.empty_like(a)
    for i in range(N):
        lo, hi = max(0, i - n // 2), min(N - 1, i + n // 2)
        s = (a[:, lo : hi + 1] ** 2).sum(dim=1)
        b[:, i] = a[:, i] / (k + alpha * s) ** beta
    return b


def test_lrn_matches_the_papers_formula_not_torchs_default():
    # Large activations, so that alpha*sum matters next to k=2 (as after ReLU in conv1).
    a = torch.rand(2, 48, 7, 7, dtype=torch.float64) * 300
    ours = PaperLRN(5, 1e-4, 0.75, 2.0)(a)
    assert torch.allclose(ours, paper_lrn_direct(a), rtol=1e-10, atol=1e-12)
    torch_default = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)(a)
    assert not torch.allclose(torch_default, paper_lrn_direct(a), rtol=1e-3)


@pytest.mark.parametrize("n", [1, 3, 5, 7])
@pytest.mark.parametrize("channels", [1, 3, 48])
def test_lrn_values_and_gradient_are_the_formulas(channels, n):
    """PaperLRN and its hand-written backward against the literal formula (autograd through
    it) and torch's numerical gradcheck; signed maps (the formula does not need a ReLU before
    it); the window clipped at both ends, even when it is wider than the maps."""
    a = (torch.randn(2, channels, 5, 4, dtype=torch.float64) * 300).requires_grad_()
    lrn = PaperLRN(n, 1e-4, 0.75, 2.0)
    g = torch.randn(2, channels, 5, 4, dtype=torch.float64)
    ours = lrn(a)
    literal = paper_lrn_direct(a, n=n)
    assert ours.dtype == torch.float64 and torch.allclose(ours, literal, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(ours, a, g)
    (literal_grad,) = torch.autograd.grad(literal, a, g)
    assert torch.allclose(grad, literal_grad, rtol=1e-10, atol=1e-14)
    assert torch.autograd.gradcheck(lrn, (a[:1, :, :2, :2].detach().clone().requires_grad_(),))


@pytest.mark.parametrize("n", [0, 2, 4])
def test_lrn_refuses_an_even_window(n):
    with pytest.raises(ValueError, match="odd"):
        PaperLRN(n, 1e-4, 0.75, 2.0)


def test_lrn_of_bf16_maps_is_computed_in_float32():
    """Under bf16 autocast the maps arrive in bf16; the sums, the power and the gradient are
    float32 (as torch's LRN was under CUDA autocast), the gradient comes back in bf16."""
    a = (torch.randn(2, 48, 6, 6) * 300).to(torch.bfloat16).requires_grad_()
    g = torch.randn(2, 48, 6, 6)
    out = PaperLRN(5, 1e-4, 0.75, 2.0)(a)
    exact = paper_lrn_direct(a.detach().double())
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), exact, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(out, a, g)
    a64 = a.detach().double().requires_grad_()
    (exact_grad,) = torch.autograd.grad(paper_lrn_direct(a64), a64, g.double())
    assert grad.dtype == torch.bfloat16
    assert torch.allclose(grad.double(), exact_grad, rtol=1e-2, atol=1e-3)


def test_lrn_gradient_survives_torch_compile():
    lrn = PaperLRN(5, 1e-4, 0.75, 2.0)
    a = (torch.randn(2, 8, 6, 6) * 100).requires_grad_()
    g = torch.randn(2, 8, 6, 6)
    (compiled,) = torch.autograd.grad(torch.compile(lambda x: lrn(torch.relu(x)))(a), a, g)
    (eager,) = torch.autograd.grad(lrn(torch.relu(a)), a, g)
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-7)


def test_lrn_takes_channels_last_maps_as_the_gpu_path_sends_them():
    a = torch.randn(2, 48, 7, 7) * 300
    g = torch.randn(2, 48, 7, 7)
    lrn = PaperLRN(5, 1e-4, 0.75, 2.0)
    results = []
    for x in (a, a.to(memory_format=torch.channels_last)):
        x = x.detach().requires_grad_()
        out = lrn(x)
        results.append((out, *torch.autograd.grad(out, x, g)))
    (out, grad), (out_cl, grad_cl) = results
    assert torch.allclose(out_cl, out, rtol=1e-6, atol=0) and torch.allclose(grad_cl, grad, rtol=1e-5, atol=1e-9)


LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")


@pytest.mark.parametrize("name", LAYERS)
def test_each_layers_init_is_section_5s(model, name):
    """Weights ~ N(0, 0.01) (mean, std and the normal's kurtosis of 3, within 5 standard errors
    of each estimate for that layer's size); biases exactly 1 in conv2, conv4, conv5, fc6, fc7, else 0."""
    w = torch.cat([getattr(c, name).weight.detach().double().flatten() for c in model.columns])
    n = w.numel()
    assert abs(w.mean().item()) < 5 * 0.01 / n**0.5
    assert abs(w.std().item() - 0.01) < 5 * 0.01 / (2 * n) ** 0.5
    kurtosis = ((w - w.mean()) ** 4).mean().item() / w.var().item() ** 2
    assert abs(kurtosis - 3) < 5 * (24 / n) ** 0.5  # uniform would be 1.8
    expected_bias = 1.0 if name in BIAS_ONE else 0.0
    for column in model.columns:
        assert torch.all(getattr(column, name).bias == expected_bias), name


def test_overlapping_pooling_is_3_by_2_after_conv1_conv2_and_conv5(model):
    """Section 3.4: z=3, s=2 (not 2/2), checked on the module and on what it computes."""
    for column in model.columns:
        assert (column.pool.kernel_size, column.pool.stride) == (3, 2)
    x = torch.randn(1, 4, 13, 13)
    assert torch.equal(model.columns[0].pool(x), F.max_pool2d(x, 3, 2))
    pools: list = []
    hook = model.columns[0].pool.register_forward_hook(capture(pools, "pool", lambda o: o))
    inputs: list = []
    pre = model.columns[0].pool.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        model(x227(1))
    hook.remove()
    pre.remove()
    assert len(pools) == 3  # after conv1, conv2 and conv5
    for i, o in zip(inputs, pools):
        assert torch.equal(o, F.max_pool2d(i, kernel_size=3, stride=2))


def test_the_models_lrn_is_the_papers_with_its_constants(model):
    """Section 3.3 in the built network: k=2, n=5, alpha=1e-4, beta=0.75 (alpha not divided by
    n), after ReLU in conv1 and conv2 of each column."""
    a = torch.rand(2, 48, 7, 7, dtype=torch.float64) * 300
    for column in model.columns:
        for norm in (column.norm1, column.norm2):
            assert torch.allclose(
                norm(a), paper_lrn_direct(a, k=2.0, n=5, alpha=1e-4, beta=0.75), rtol=1e-10, atol=1e-12
            )
    seen: dict = {}
    c = model.columns[0]
    hooks = [c.conv1.register_forward_hook(capture(seen, "conv1")), c.norm1.register_forward_hook(capture(seen, "n1"))]
    with torch.no_grad():
        model(x227(1))
    for h in hooks:
        h.remove()
    assert torch.allclose(seen["n1"], paper_lrn_direct(F.relu(seen["conv1"])), rtol=1e-5, atol=1e-6)


def test_dropout_is_one_half_on_fc6_and_fc7_and_off_in_eval():
    """Section 4.2: each of fc6's and fc7's outputs is zeroed with p=0.5 in training (inverted
    dropout: survivors x2), and nothing is dropped at test time."""
    model = AlexNet(AlexNetConfig(num_classes=10))
    calls: list = []
    hooks = [
        c.drop.register_forward_hook(lambda m, a, o: calls.append((a[0].detach(), o.detach()))) for c in model.columns
    ]
    x = x227(8)
    model.train()
    with torch.no_grad():
        model(x)
    assert len(calls) == 4  # fc6 and fc7 of both columns
    for before, after in calls:
        kept = after != 0
        live = before != 0
        share = (kept & live).sum().item() / live.sum().item()
        assert abs(share - 0.5) < 0.03, share
        torch.testing.assert_close(after[kept], 2 * before[kept])
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(x)
    assert len(calls) == 4 and all(torch.equal(b, a) for b, a in calls)
    for h in hooks:
        h.remove()


def test_kaiming_init_option():
    model = AlexNet(AlexNetConfig(init="kaiming"))
    c = model.columns[0]
    assert torch.all(c.fc6.bias == 0) and torch.all(c.conv2.bias == 0)
    fan_in = c.conv3.weight[0].numel()
    assert abs(c.conv3.weight.std().item() - (2 / fan_in) ** 0.5) < 0.05 * (2 / fan_in) ** 0.5
    assert abs(c.fc8.weight.std().item() - 0.01) < 5e-4
    with pytest.raises(ValueError):
        AlexNetConfig(init="xavier")


def test_columns_talk_only_at_conv3_and_the_fc_layers():
    model = AlexNet().train()
    outs = {}
    a, b = model.columns
    hooks = [
        a.conv1.register_forward_hook(capture(outs, "a_conv1")),
        b.conv2.register_forward_hook(capture(outs, "b_conv2")),
        b.conv3.register_forward_hook(capture(outs, "b_conv3")),
        b.conv5.register_forward_hook(capture(outs, "b_conv5")),
        b.fc6.register_forward_hook(capture(outs, "b_fc6")),
    ]
    model(x227())
    for h in hooks:
        h.remove()

    def grad(of: str) -> torch.Tensor:
        (g,) = torch.autograd.grad(outs[of].sum(), outs["a_conv1"], retain_graph=True, allow_unused=True)
        return torch.zeros_like(outs["a_conv1"]) if g is None else g

    assert torch.count_nonzero(grad("b_conv2")) == 0  # conv2: own column only
    assert torch.count_nonzero(grad("b_conv3")) > 0  # conv3: sees column A
    assert torch.count_nonzero(grad("b_conv5")) > 0  # (through conv3)
    assert torch.count_nonzero(grad("b_fc6")) > 0


def test_equal_to_the_same_network_written_with_grouped_convolutions(model):
    """The strongest check of the wiring: one module with groups=2 in conv2/4/5, full conv3 and
    fc layers, LRN per half, computes exactly the same function with the same weights."""
    grouped = GroupedAlexNet.from_columns(model).eval()
    assert count_parameters(grouped) == count_parameters(model)
    x = x227(3)
    with torch.no_grad():
        assert torch.allclose(model(x), grouped(x), rtol=1e-4, atol=1e-5)


def test_each_columns_parameters_live_on_its_own_device():
    model = AlexNet(devices=("cpu", "meta"))  # meta: a second device that any machine has
    assert {p.device.type for p in model.column_parameters(0)} == {"cpu"}
    assert {p.device.type for p in model.column_parameters(1)} == {"meta"}
    assert model.output_device == torch.device("cpu")
    assert len(model.column_parameters(0)) == len(model.column_parameters(1)) == 16


def test_fc7_embedding(model):
    with torch.no_grad():
        e = model.embed(x227(3))
    assert e.shape == (3, 4096) and (e >= 0).all()  # after ReLU
    # It is the input of fc8: the logits follow from it.
    with torch.no_grad():
        logits = torch.cat([c.fc8(e) for c in model.columns], 1)
        assert torch.allclose(logits, model(x227(3)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "cfg,params",
    [
        (AlexNetConfig(columns=1), 59_798_312),  # half the conv kernels; conv5 and fc full (paper's footnote)
        (AlexNetConfig(lrn=False), 60_965_224),
        (AlexNetConfig(pool_kernel=2), 60_965_224),  # 2/2 pooling keeps 55 -> 27 -> 13 -> 6
        (AlexNetConfig(num_classes=10), 60_965_224 - 4096 * 990 - 990),
    ],
)
def test_ablation_configs_build_and_have_the_expected_sizes(cfg, params):
    model = AlexNet(cfg).eval()
    assert count_parameters(model) == params
    with torch.no_grad():
        assert model(x227(1)).shape == (1, cfg.num_classes)
        assert model.embed(x227(1)).shape == (1, 4096)
    has_lrn = any(isinstance(m, PaperLRN) for m in model.modules())
    assert has_lrn == cfg.lrn
    if cfg.columns == 1:
        c = model.columns[0]
        assert [getattr(c, n).out_channels for n in ("conv1", "conv2", "conv3", "conv4", "conv5")] == [
            48,
            128,
            192,
            192,
            256,
        ]


def test_config_round_trips_through_json():
    import json

    cfg = AlexNetConfig(num_classes=10, lrn=False, pool_kernel=2)
    assert AlexNetConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError):
        AlexNetConfig(columns=3)
    with pytest.raises(ValueError):
        AlexNetConfig(input_size=32)


def test_other_input_sizes_follow_the_arithmetic():
    cfg = AlexNetConfig(input_size=224, num_classes=10)
    assert cfg.feature_map_size() == 5
    assert AlexNet(cfg)(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_channels_last_and_bf16_autocast_on_cpu(model):
    x = x227(2)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        assert torch.allclose(cl, ref, rtol=1e-3, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        assert low.dtype == torch.bfloat16
        assert F.cosine_similarity(low.float().flatten(), ref.flatten(), dim=0) > 0.98
    model.to(memory_format=torch.contiguous_format)


def test_a_training_step_reaches_every_parameter_and_descends():
    torch.manual_seed(0)
    model = AlexNet(AlexNetConfig(num_classes=4, dropout=0.0)).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    # Centred raw-pixel scale, as the paper feeds the net (mean subtracted, not divided by std).
    x, y = torch.randn(8, 3, 227, 227) * 60, torch.arange(8) % 4
    loss0 = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss0.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    opt.step()
    assert F.cross_entropy(model(x), y) < loss0


@pytest.mark.slow
def test_torch_compile_gives_the_same_outputs(model):
    compiled = torch.compile(model)
    x = x227(2)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
def test_the_two_device_path_on_one_gpu_gives_the_grouped_twins_outputs():
    """The worker's layout with one GPU (both columns given cuda:0: the gathers between columns
    run) against the one-module grouped-convolution twin, TF32 off: the same function."""
    allow = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch.manual_seed(0)
        model = AlexNet(devices=("cuda:0", "cuda:0")).eval()
        assert {p.device for p in model.parameters()} == {torch.device("cuda", 0)}
        twin = GroupedAlexNet.from_columns(model).eval()
        x = x227(4).cuda(0)
        with torch.no_grad():
            out, expected = model(x), twin(x)
        assert out.device == torch.device("cuda", 0) and out.shape == (4, 1000)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = allow


@pytest.mark.gpu(2)
def test_two_gpus_one_column_each():
    model = AlexNet(devices=("cuda:0", "cuda:1")).eval()
    assert {p.device for p in model.column_parameters(1)} == {torch.device("cuda:1")}
    with torch.no_grad():
        out = model(x227(2).cuda(0))
    assert out.device == torch.device("cuda:0") and out.shape == (2, 1000)


def test_forward_with_embedding_is_forward_and_embed_in_one_pass(model):
    x = x227(2)
    with torch.no_grad():
        logits, emb = model.forward_with_embedding(x)
        assert torch.equal(logits, model(x)) and torch.equal(emb, model.embed(x))
