"""MPD's converted layers under every kernel choice: exact against the masked model, against ONNX
Runtime and through save/load; fewer gathers; ``kernel="auto"`` with a deterministic timer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
import torch.nn as nn

from pfgdf_plugin import load_pruned, save_pruned
from pfgdf_plugin.graph import find_fold_links
from pfgdf_plugin.methods import mpd
from pfgdf_plugin.methods.mpd import BlockPlan, MPDError
from pfgdf_plugin.modules import BlockDiagonalLinear, MaskedDenseConv2d, MaskedDenseLinear, PermutedGroupConv2d


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(23, 19), nn.ReLU(), nn.Linear(19, 17), nn.BatchNorm1d(17), nn.ReLU(),
                         nn.Linear(17, 16), nn.ReLU(), nn.Linear(16, 5))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU(),
                         nn.Conv2d(10, 12, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4))


CASES = {
    "mlp": (_mlp, (23,), {"0": 3, "2": 3, "5": 4}),
    "cnn": (_cnn, (3, 6, 6), {"0": 3, "3": 3, "6": 2}),
}
KERNELS = [
    ("mlp", "block"), ("mlp", "bmm"), ("mlp", "grouped"), ("mlp", "dense"),
    ("mlp", {"0": "dense", "2": "bmm", "5": "grouped"}), ("mlp", {"0": "grouped", "2": "dense", "5": "bmm"}),
    ("cnn", "block"), ("cnn", "grouped"), ("cnn", "dense"),
    ("cnn", {"0": "dense", "3": "grouped", "6": "dense"}), ("cnn", {"0": "grouped", "3": "dense", "6": "grouped"}),
]


def _masked(which: str):
    """A model with random BatchNorm statistics, its plans, masks applied, and an input batch."""
    build, shape, blocks = CASES[which]
    model = build()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    plans = {n: mpd.make_plan(n, model.get_submodule(n).weight, c, seed=3) for n, c in blocks.items()}
    with torch.no_grad():
        for n, plan in plans.items():
            model.get_submodule(n).weight.mul_(plan.mask())
    return model.eval(), plans, torch.randn(5, *shape)


def _convert(which: str, kernel, **kwargs):
    model, plans, x = _masked(which)
    ref = model(x).detach()
    links = find_fold_links(model, x, names=None)  # links to the plain classifier too
    report = mpd.convert_model(model, plans, links, kernel=kernel, **kwargs)
    return model.eval(), report, x, ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def _gathers(model: nn.Module) -> int:
    """Index gathers the converted layers run per forward."""
    count = 0
    for m in model.modules():
        if isinstance(m, BlockDiagonalLinear):
            count += (m.in_index is not None) + (m.out_index is not None)
        elif isinstance(m, PermutedGroupConv2d):
            count += (not isinstance(m.permute_in, nn.Identity)) + (not isinstance(m.permute_out, nn.Identity))
    return count


@pytest.mark.parametrize("which,kernel", KERNELS, ids=[f"{w}-{k}" for w, k in KERNELS])
def test_every_kernel_matches_the_masked_model_onnxruntime_and_a_reload(which, kernel, tmp_path):
    model, report, x, ref = _convert(which, kernel)
    assert _rel(model(x), ref) <= 1e-5
    assert _rel(torch.fx.symbolic_trace(model)(x), ref) <= 1e-5 and torch.equal(copy.deepcopy(model)(x), model(x))
    for name, entry in report["layers"].items():
        want = kernel.get(name, "block") if isinstance(kernel, dict) else kernel
        if want != "block":
            assert entry["kernel"] == want
        assert report["kernels"][name]["kernel"] == entry["kernel"]
    # save / load: weights only, into a freshly built dense model
    path = str(tmp_path / "m.pt")
    save_pruned(model, path)
    loaded, _ = load_pruned(path, CASES[which][0]())
    assert torch.equal(loaded(x), model(x))
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.modules()]
    # ONNX Runtime
    onnxruntime = pytest.importorskip("onnxruntime")
    from pfgdf_plugin.measure import export_onnx

    export_onnx(model, x[:1], str(tmp_path / "m.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    out = session.run(None, {"input": x.numpy()})[0]
    assert abs(out - ref.numpy()).max() <= 1e-5 * max(1.0, float(ref.abs().max()))


def test_a_chain_gathers_once_per_block_boundary_and_neighbours_absorb_the_rest():
    model, report, x, ref = _convert("mlp", "bmm")
    # input -> 0, 0 -> 2, 2 -> 5 (across a BatchNorm widened to 2's padded layout); the classifier
    # absorbs 5's scatter into its columns
    assert _gathers(model) == 3
    assert report["folded"] == ["0 -> 2", "2 -> 5", "5 -> 7"]
    assert model[3].num_features == model[2].raw_features > 17
    assert model[7].in_features == model[5].raw_features
    legacy, legacy_report, _, _ = _convert("mlp", "block")
    # the earlier layout: the BatchNorm is not widened and the classifier does not absorb 5's scatter
    assert _gathers(legacy) == 5 and legacy_report["folded"] == ["0 -> 2"]
    dense, _, _, _ = _convert("mlp", "dense")
    assert _gathers(dense) == 0
    mixed, _, _, mixed_ref = _convert("mlp", {"0": "dense", "2": "bmm", "5": "dense"})
    assert _gathers(mixed) == 1  # 2 pads its blocks, so it keeps its gather; 5 absorbs 2's layout
    assert _rel(mixed(x), mixed_ref) <= 1e-5


@pytest.mark.parametrize("hidden,absorbed", [(8, True), (9, False)])
def test_a_plain_producer_takes_over_the_gather_of_an_unpadded_block_consumer(hidden, absorbed):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, hidden), nn.BatchNorm1d(hidden), nn.Sigmoid(), nn.Linear(hidden, 6)).eval()
    plan = mpd.make_plan("3", net[3].weight, 2, seed=5)
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[3].weight.mul_(plan.mask())
    x = torch.randn(4, 12)
    ref = net(x).detach()
    report = mpd.convert_model(net, {"3": plan}, find_fold_links(net, x, names=None), kernel="bmm")
    # 9 inputs in 2 blocks pad to 2 x 5: the padded slot must read a true zero (sigmoid(0) is not), so the
    # consumer keeps its gather and the producer stays as it was
    assert (net[3].in_index is None) == absorbed and report["folded"] == (["0 -> 3"] if absorbed else [])
    assert _rel(net(x), ref) <= 1e-5


def test_identity_permutations_are_dropped():
    net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    plan = BlockPlan("0", torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0] * 4 + [1] * 4), 2)
    with torch.no_grad():
        net[0].weight.mul_(plan.mask())
    x = torch.randn(3, 8)
    ref = net(x)
    twin = copy.deepcopy(net)
    report = mpd.convert_model(net, {"0": plan}, kernel="bmm")
    assert report["identity"] == ["0: gather", "0: scatter"]
    assert net[0].in_index is None and net[0].out_index is None and _gathers(net) == 0
    assert _rel(net(x), ref) <= 1e-5
    legacy = mpd.convert_model(twin, {"0": plan}, kernel="block")
    assert legacy["identity"] == [] and _gathers(twin) == 2


def test_dense_kernel_keeps_its_zeros_while_training():
    model, report, x, _ = _convert("mlp", "dense")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    for name in ("0", "2", "5"):
        layer = model.get_submodule(name)
        assert isinstance(layer, MaskedDenseLinear)
        outside = ~((layer.row_labels[:, None] == layer.col_labels[None, :]) & (layer.row_labels[:, None] >= 0))
        assert float(layer.linear.weight.detach()[outside].abs().sum()) == 0.0
        assert float(layer.linear.weight.detach()[~outside].abs().sum()) > 0
        assert report["layers"][name]["stored"] == layer.linear.weight.numel()
    model.eval()
    assert torch.equal(model(x), torch.nn.functional.linear(
        model[6](model[5](model[4](model[3](model[2](model[1](model[0](x))))))), model[7].weight, model[7].bias))


def _fake_timer(table):
    """Seconds by kernel and batch size: no clock involved."""
    calls = []

    def timer(module, inputs):
        calls.append((module.kernel, inputs.shape[0]))
        return table[module.kernel][inputs.shape[0]]

    timer.calls = calls
    return timer


def test_auto_picks_the_fastest_kernel_by_the_injected_timer_and_records_the_times():
    timer = _fake_timer({"dense": {1: 4.0, 8: 8.0}, "bmm": {1: 1.0, 8: 3.0}, "grouped": {1: 2.0, 8: 2.0}})
    model, report, x, ref = _convert("mlp", "auto", timer=timer, batches=(1, 8))
    assert _rel(model(x), ref) <= 1e-5
    for name in ("0", "2", "5"):
        entry = report["kernels"][name]
        assert entry["kernel"] == "bmm"  # mean speed-up 3.33x (grouped: 3.0x)
        assert entry["times"] == {"dense": {1: 4.0, 8: 8.0}, "bmm": {1: 1.0, 8: 3.0}, "grouped": {1: 2.0, 8: 2.0}}
        assert "bmm is faster than dense at every batch" in entry["reason"]
        assert entry["threads"] == torch.get_num_threads() and entry["engine"] == "pytorch"
    assert sorted(set(timer.calls)) == [(k, b) for k in ("bmm", "dense", "grouped") for b in (1, 8)]


def test_auto_keeps_a_layer_too_small_to_gain_dense_and_says_so():
    timer = _fake_timer({"dense": {1: 1.0, 32: 8.0}, "bmm": {1: 1.5, 32: 2.0}, "grouped": {1: 1.2, 32: 3.0}})
    model, report, x, ref = _convert("mlp", "auto", timer=timer)
    assert all(report["kernels"][n]["kernel"] == "dense" for n in ("0", "2", "5"))
    assert "too small to gain" in report["kernels"]["0"]["reason"] and "stays dense" in report["kernels"]["0"]["reason"]
    assert isinstance(model[0], MaskedDenseLinear) and _gathers(model) == 0
    assert _rel(model(x), ref) <= 1e-5


def test_auto_times_convolutions_at_their_real_input_size():
    timer = _fake_timer({"dense": {1: 2.0, 32: 9.0}, "grouped": {1: 1.0, 32: 3.0}})
    model, plans, x = _masked("cnn")
    ref = model(x).detach()
    report = mpd.convert_model(model, plans, find_fold_links(model, x), kernel="auto", timer=timer,
                               example_inputs=x[:1])
    assert report["kernels"]["3"]["input"] == [6, 6] and report["kernels"]["6"]["kernel"] == "grouped"
    assert _rel(model.eval()(x), ref) <= 1e-5


def test_auto_with_the_real_clock_converts_exactly():
    model, report, x, ref = _convert("mlp", "auto", batches=(1, 4))
    assert _rel(model(x), ref) <= 1e-5
    for entry in report["kernels"].values():
        assert entry["kernel"] in ("dense", "bmm", "grouped") and all(
            t > 0 for times in entry["times"].values() for t in times.values())


@pytest.mark.parametrize("kernel,match", [
    ("bmm", r"0: kernel='bmm' does not run a Conv2d; a Conv2d runs dense, grouped"),
    ("fast", r"kernel must be one of block, auto, dense, bmm, grouped .*got 'fast'"),
    ({"99": "dense"}, r"kernel names layers that are not converted: \['99'\]"),
])
def test_a_bad_kernel_names_the_layer_and_leaves_the_model_untouched(kernel, match):
    model, plans, x = _masked("cnn")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(MPDError, match=match):
        mpd.convert_model(model, plans, find_fold_links(model, x), kernel=kernel)
    assert isinstance(model[0], nn.Conv2d) and not isinstance(model[0], MaskedDenseConv2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_batches_are_refused():
    model, plans, _ = _masked("mlp")
    with pytest.raises(MPDError, match=r"batches must be positive integers .* got \(0,\)"):
        mpd.convert_model(model, plans, kernel="auto", batches=(0,))


@pytest.mark.parametrize("kernel,gathers,core", [("bmm", 3, "MatMul"), ("grouped", 3, "Conv"), ("dense", 0, "Gemm")])
def test_the_onnx_graph_has_one_gather_per_block_boundary_and_no_shape_arithmetic(kernel, gathers, core, tmp_path):
    onnx = pytest.importorskip("onnx")
    from pfgdf_plugin.measure import export_onnx

    model, _, x, _ = _convert("mlp", kernel)
    export_onnx(model, x[:1], str(tmp_path / "m.onnx"))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert ops.count("Gather") == gathers and "Shape" not in ops  # the padding is a Pad of constant size
    assert ops.count(core) == (4 if core == "Gemm" else 3)


def test_macs_count_what_each_kernel_computes():
    from pfgdf_plugin.measure import count_macs

    model, _, x = _masked("mlp")
    dense_macs = count_macs(model, x[:1])
    assert count_macs(_convert("mlp", "dense")[0], x[:1]) == dense_macs  # the zeros are multiplied too
    assert count_macs(_convert("mlp", "bmm")[0], x[:1]) < dense_macs / 2


def _masked_linear(bias: bool = True, seed: int = 0):
    """A masked Linear(23, 19) in 3 unequal (so padded) blocks, its plan and its converted bmm layer."""
    torch.manual_seed(seed)
    lin = nn.Linear(23, 19, bias=bias)
    plan = mpd.make_plan("lin", lin.weight, 3, seed=seed)
    with torch.no_grad():
        lin.weight.mul_(plan.mask())
    return lin, mpd.convert_layer(plan, copy.deepcopy(lin), kernel="bmm")


@pytest.mark.parametrize("bias", [True, False])
def test_every_bmm_path_computes_what_the_masked_layer_does(bias, tmp_path):
    lin, layer = _masked_linear(bias)
    assert layer.padded_in and layer.in_index is not None and layer.out_index is not None
    x = torch.randn(5, 23)
    for batch in (x[:1], x):  # batch 1: no transpose; batch 5: through the transposed output view
        with torch.no_grad():
            assert _rel(layer(batch), lin(batch)) <= 1e-5
        assert _rel(layer(batch), lin(batch)) <= 1e-5  # with autograd
    assert _rel(layer(x.view(5, 1, 23)), lin(x).view(5, 1, 19)) <= 1e-5  # the reshaping path
    assert _rel(layer(nn.Parameter(x.clone())), lin(x)) <= 1e-5  # a Tensor subclass takes the general path
    assert _rel(torch.fx.symbolic_trace(layer)(x), lin(x)) <= 1e-5
    traced = torch.jit.trace(layer, x[:1], check_trace=False)  # the feature-major form, for any batch size
    assert _rel(traced(x), lin(x)) <= 1e-5 and _rel(traced(x[:1]), lin(x[:1])) <= 1e-5
    # gradients flow as through the masked layer
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(a).pow(2).sum().backward()
    lin(b).pow(2).sum().backward()
    assert _rel(a.grad, b.grad) <= 1e-5
    if bias:
        assert _rel(layer.bias.grad.sum(), lin.bias.grad.sum()) <= 1e-5
    onnxruntime = pytest.importorskip("onnxruntime")
    from pfgdf_plugin.measure import export_onnx

    for exported_at in (1, 5):
        path = str(tmp_path / f"l{exported_at}.onnx")
        export_onnx(layer, x[:exported_at], path)
        session = onnxruntime.InferenceSession(path)
        for batch in (x[:1], x[:2], x):
            out = session.run(None, {"input": batch.numpy()})[0]
            assert _rel(torch.from_numpy(out), lin(batch)) <= 1e-5


def test_the_bmm_state_dict_keeps_the_block_layout_whatever_the_stored_one():
    lin, layer = _masked_linear()
    c, o, i = layer.blocks, layer.block_out, layer.block_in
    assert layer.weight.shape == (c, i, o)  # what the batched matmul reads
    state = layer.state_dict()
    assert state["weight"].shape == (c, o, i) and torch.equal(state["weight"], layer.block_weight())
    assert layer.state_dict(keep_vars=True)["weight"] is layer.weight  # tracers find the parameter itself
    x = torch.randn(4, 23)
    twin = BlockDiagonalLinear.from_description(dict(layer.describe(), kernel="grouped"))
    twin.load_state_dict(state)
    assert twin.weight.shape == (c, o, i) and _rel(twin(x), layer(x)) <= 1e-5
    back = BlockDiagonalLinear.from_description(layer.describe())
    back.load_state_dict(twin.state_dict())
    assert torch.equal(back.weight, layer.weight) and torch.equal(back(x), layer(x))
    assert state["weight"].shape == (c, o, i)  # loading did not touch the caller's dict
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        back.load_state_dict(dict(state, weight=torch.zeros(c, o + 1, i)))


def _outputs(model: nn.Module, x: torch.Tensor):
    """``{layer name: output}`` of the converted linear layers in one forward."""
    seen, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, BlockDiagonalLinear):
            handles.append(m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out)))
    try:
        y = model(x)
    finally:
        for h in handles:
            h.remove()
    return y, seen


def test_a_bmm_chain_hands_batches_over_feature_major_and_stays_exact(tmp_path):
    masked, plans, x = _masked("mlp")
    twin = copy.deepcopy(masked)
    model, report, _, ref = _convert("mlp", "bmm")
    # 0 -> 2 and 2 -> 5 (across the widened BatchNorm) are bmm -> bmm; 5 feeds the plain classifier
    assert [model[k].handoff for k in (0, 2, 5)] == [True, True, False]
    assert "handoff=True" in repr(model[0]) and "handoff" not in repr(model[5])
    with torch.no_grad():
        y, seen = _outputs(model, x)
        assert _rel(y, ref) <= 1e-5 and y.is_contiguous()
        # batch > 1: the hand-offs are transposed views of [width, N]; the last block layer is contiguous
        assert seen["0"].stride() == (1, 5) and seen["2"].stride() == (1, 5) and seen["5"].is_contiguous()
        y1, seen1 = _outputs(model, x[:1])  # batch 1 keeps the batch-major path
        assert _rel(y1, ref[:1]) <= 1e-5 and all(t.is_contiguous() for t in seen1.values())
    # training: the same outputs and input gradients as the masked model, BatchNorm in batch mode
    model.train(), twin.train()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = model(a), twin(b)
    assert _rel(out_a, out_b) <= 1e-5
    out_a.pow(2).sum().backward()
    out_b.pow(2).sum().backward()
    assert _rel(a.grad, b.grad) <= 1e-5
    model.eval()
    # a lone layer given a batch that arrives transposed reads it feature-major, with the same values
    lone = model[5]
    h = torch.randn(5, lone.in_features)
    with torch.no_grad():
        assert torch.allclose(lone(h.t().contiguous().t()), lone(h), atol=1e-6)
    # the hand-off survives save / load, and a grouped neighbour does not take it
    path = str(tmp_path / "m.pt")
    save_pruned(model, path)
    loaded, _ = load_pruned(path, CASES["mlp"][0]())
    assert [loaded[k].handoff for k in (0, 2, 5)] == [True, True, False]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    mixed, _, _, mixed_ref = _convert("mlp", {"0": "bmm", "2": "grouped", "5": "bmm"})
    assert [mixed[k].handoff for k in (0, 2, 5)] == [False, False, False]
    with torch.no_grad():
        assert _rel(mixed(x), mixed_ref) <= 1e-5
