"""The C kernels of the converted ``bmm`` layers (:mod:`pfgdf_plugin.native`): built by the install,
the same values as the PyTorch-only forward on every eager path, and memory-safe on bad input."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn as nn

from pfgdf_plugin import native
from pfgdf_plugin.bench_layers import build_pair
from pfgdf_plugin.methods import mpd


def _layer(bias: bool, sizes=(23, 19), blocks: int = 3, seed: int = 0):
    """A masked Linear in unequal (so padded) blocks and its converted bmm layer."""
    torch.manual_seed(seed)
    lin = nn.Linear(*sizes, bias=bias)
    plan = mpd.make_plan("lin", lin.weight, blocks, seed=seed)
    with torch.no_grad():
        lin.weight.mul_(plan.mask())
    return lin, mpd.convert_layer(plan, copy.deepcopy(lin), kernel="bmm")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def test_the_install_builds_the_c_kernels():
    assert native.available(), ("pfgdf_plugin/_blockdiag was not built or does not run here (setup.py needs a C "
                                "compiler and the Python headers; the kernels need AVX2 + FMA)")
    assert native.enabled()


def test_the_batch_products_can_be_capped_at_avx2():
    previous = native.set_isa("avx2")
    try:
        assert native.isa() == "avx2"
        with pytest.raises(ValueError, match="'sse' is not one of avx2, avx512"):
            native.set_isa("sse")
        with pytest.raises(ValueError, match="level must be 1 .AVX2. or 2 .AVX-512., got 3"):
            native._LIB.set_isa(3)
        assert native.isa() == "avx2"  # a refused call changed nothing
    finally:
        native.set_isa(previous)


def test_the_entry_points_refuse_a_call_they_would_misread():
    lib = native._LIB
    with pytest.raises(TypeError, match="block_gemv takes 12 arguments, got 2"):
        lib.block_gemv(0, 0)
    with pytest.raises(TypeError):  # an address must be an int (or None)
        lib.block_gemm("x", *([0] * 17))
    assert lib.block_gemm(*([0] * 18)) == 0  # nothing to multiply: nothing read or written


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gather,scatter", [(True, True), (False, True), (True, False)])
def test_a_lone_layer_gives_the_same_values_with_and_without_the_c_kernels(bias, gather, scatter, native_switch):
    lin, layer = _layer(bias)
    assert layer.padded_in
    if not scatter:
        layer.drop_scatter()
    if not gather:
        layer.set_gather(None, layer.blocks * layer.block_in)
    x = torch.randn(6, layer.in_features)
    for batch in (x[:1], x[:5], x, x.t().contiguous().t(), x[:, :].clone()[::2]):  # strided rows too
        with torch.no_grad():
            with native_switch(False):
                ref = layer(batch)
            with native_switch(True):
                got = layer(batch)
        assert got.shape == ref.shape and _rel(got, ref) <= 1e-6, batch.stride()
        if gather and scatter:
            assert _rel(got, lin(batch)) <= 1e-5


@pytest.mark.parametrize("handoff", [True, False])
def test_a_chain_gives_the_same_values_with_and_without_the_c_kernels(handoff, native_switch):
    _, model = build_pair("linear", 48, 4, 3, "bmm", handoff=handoff)
    x = torch.randn(7, 48)
    for batch in (x[:1], x[:2], x):
        with torch.no_grad():
            with native_switch(False):
                ref = model(batch)
            with native_switch(True):
                got = model(batch)
        assert got.is_contiguous() and torch.allclose(got, ref, atol=1e-5)
    # autograd takes the PyTorch path whatever the setting: gradients flow
    a = x.clone().requires_grad_()
    model(a).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def _block_product(x: torch.Tensor, index, w: torch.Tensor, bias) -> torch.Tensor:
    """What ``native.block_gemm`` computes, in float64 PyTorch: ``[c * O, N]`` features first."""
    c, i, o = w.shape
    xz = torch.cat([x.double(), torch.zeros(x.shape[0], 1, dtype=torch.float64)], 1)  # the zero feature
    cols = torch.arange(c * i) if index is None else index.clamp(-1, x.shape[1])
    cols = torch.where((cols < 0) | (cols >= x.shape[1]), torch.full_like(cols, x.shape[1]), cols)
    xb = xz[:, cols].t().reshape(c, i, -1)  # [c, I, N]
    y = torch.bmm(w.double().transpose(1, 2), xb)
    if bias is not None:
        y = y + bias.double().view(c, o, 1)
    return y.reshape(c * o, -1)


@pytest.fixture(params=["avx2", "avx512"])
def isa(request):
    """Each width of the batch products this CPU runs (AVX-512 skipped where it has none)."""
    if request.param == "avx512" and native.isa() != "avx512":
        pytest.skip("this CPU has no AVX-512")
    previous = native.set_isa(request.param)
    assert native.isa() == request.param
    yield request.param
    native.set_isa(previous)


@pytest.mark.parametrize("c,i,o,n", [(3, 7, 5, 37),        # a 5-column tail after two whole tiles
                                     (2, 300, 200, 300),   # inner dimension in pieces, two output chunks,
                                     (1, 1, 1, 1),         # two column chunks (AVX-512: weights read in
                                     (4, 16, 12, 16),      # place); the smallest layer
                                     (2, 130, 24, 40)])    # AVX-512 in place, AVX2 panels of six
def test_the_block_product_matches_pytorch_in_both_layouts(c, i, o, n, isa):
    torch.manual_seed(c * 1000 + n)
    w, bias = torch.randn(c, i, o), torch.randn(c, o)
    features = c * i + 3
    x = torch.randn(n, features)
    index = torch.randperm(features)[: c * i]
    index[0] = features  # a padded slot reads zero
    expect = _block_product(x, index, w, bias).float()
    out_index = torch.randperm(c * o)[: max(1, c * o - 2)]  # a scatter that drops two rows
    packed = native.pack(w)
    for layout in (x, x.t().contiguous().t(), torch.randn(n, 2 * features)[:, :features].copy_(x)):
        for pk in (None, packed):  # weights copied into panels on the way, or prepacked
            got = native.block_gemm(layout, index, features, w, bias, packed=pk)
            assert got.shape == (c * o, n) and _rel(got, expect) <= 1e-5, layout.stride()
            got = native.block_gemm(layout, index, features, w, bias, batch_first=True, out_index=out_index,
                                    packed=pk)
            assert got.shape == (n, out_index.numel()) and _rel(got, expect[out_index].t()) <= 1e-5
    xi = torch.randn(n, c * i)
    expect = _block_product(xi, None, w, None).float()
    assert _rel(native.block_gemm(xi, None, c * i, w, None), expect) <= 1e-5
    assert _rel(native.block_gemm(xi, None, c * i, w, None, batch_first=True), expect.t()) <= 1e-5


def test_a_packing_of_another_layout_is_refused():
    w, x = torch.randn(2, 24, 40), torch.randn(5, 48)
    packed, level = native.pack(w)
    with pytest.raises(ValueError, match="is not the layout of a .2, 24, 40. weight.*pack it again"):
        native.block_gemm(x, None, 48, w, None, packed=(packed, 3 - level))  # the other width's
    with pytest.raises(ValueError, match="is not the layout of a .2, 24, 41. weight"):
        native.block_gemm(torch.randn(5, 48), None, 48, torch.randn(2, 24, 41), None, packed=(packed, level))


def _prepacked_pair(seed: int = 0):
    _, plain = build_pair("linear", 64, 4, 3, "bmm", seed=seed, prepacked=False)
    packed = copy.deepcopy(plain)
    assert mpd.prepack(packed) == ["0", "2", "4"] and packed[0].prepacked and not plain[0].prepacked
    return plain, packed


def test_prepacked_layers_give_the_same_values_and_keep_the_copy_out_of_the_state_dict(isa):
    plain, packed = _prepacked_pair()
    x = torch.randn(40, 64)
    with torch.no_grad():
        for batch in (x[:1], x[:5], x):
            assert _rel(packed(batch), plain(batch)) <= 1e-6
    assert packed[0].packed_weight is not None  # made at the first batch
    assert not any("packed" in k for k in packed.state_dict())
    assert packed.state_dict().keys() == plain.state_dict().keys()
    mpd.prepack(packed, on=False)
    assert not packed[0].prepacked and packed[0].packed_weight is None


def test_a_prepacked_model_saves_and_loads_without_its_copy(tmp_path):
    from pfgdf_plugin import persist
    from pfgdf_plugin.bench_layers import _stack

    plain, packed = _prepacked_pair(seed=2)
    x = torch.randn(9, 64)
    with torch.no_grad():
        ref = packed(x)  # the copy now exists
        persist.save_pruned(packed, str(tmp_path / "m.pt"))
        loaded, _ = persist.load_pruned(str(tmp_path / "m.pt"), _stack("linear", 64, 3))
        assert not loaded[0].prepacked and loaded[0].packed_weight is None  # prepack it again after loading
        assert _rel(loaded(x), ref) <= 1e-6 and _rel(plain(x), ref) <= 1e-6


def test_a_prepacked_layer_follows_its_weights_and_the_isa():
    plain, packed = _prepacked_pair(seed=1)
    x = torch.randn(9, 64)
    with torch.no_grad():
        packed(x)
        for model in (plain, packed):  # through the parameter: the version counter moves
            model[2].weight.mul_(2.0)
        assert _rel(packed(x), plain(x)) <= 1e-6
        for model in (plain, packed):  # a new parameter: new storage
            model[4].weight = nn.Parameter(model[4].weight.detach() * 0.5)
        assert _rel(packed(x), plain(x)) <= 1e-6
        for model in (plain, packed):  # .data is not counted: prepack() again, as documented
            model[0].weight.data.mul_(-1.0)
        packed[0].prepack()
        assert _rel(packed(x), plain(x)) <= 1e-6
        if native.isa() == "avx512":  # the other width's layout is made when the setting changes
            previous = native.set_isa("avx2")
            try:
                assert _rel(packed(x), plain(x)) <= 1e-6
            finally:
                native.set_isa(previous)
            assert _rel(packed(x), plain(x)) <= 1e-6


def test_threads_calling_at_once_get_their_own_scratch():
    """The products run without the GIL and keep their scratch per thread: two threads alternating
    sizes (so each one's scratch grows while the other computes) still get the reference values."""
    torch.manual_seed(3)
    cases = []
    for c, i, o, n in ((8, 64, 64, 96), (4, 300, 40, 60)):  # the second transposes its input
        w, bias, x = torch.randn(c, i, o), torch.randn(c, o), torch.randn(n, c * i)
        out_index = torch.randperm(c * o)
        cases.append((x, w, bias, out_index, _block_product(x, None, w, bias).float()[out_index].t()))
    errors = []

    def run(order):
        for _ in range(15):
            for x, w, bias, out_index, expect in (cases if order else cases[::-1]):
                got = native.block_gemm(x, None, x.shape[1], w, bias, batch_first=True, out_index=out_index)
                errors.append(_rel(got, expect))

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 60 and max(errors) <= 1e-5


def test_other_dtypes_take_the_pytorch_path():
    lin, layer = _layer(True)
    lin, layer = lin.double(), layer.double()
    x = torch.randn(4, 23, dtype=torch.float64)
    with torch.no_grad():
        for batch in (x[:1], x):
            got = layer(batch)
            assert got.dtype == torch.float64 and _rel(got, lin(batch)) <= 1e-10


def test_a_damaged_index_reads_zeros_and_never_outside_the_input(native_switch):
    _, layer = _layer(True, sizes=(16, 12), blocks=4)
    assert not layer.padded_in  # balanced: every entry a real feature
    x = torch.randn(3, 16)
    zero_at = [0, 5]
    with torch.no_grad():
        layer.in_index[zero_at[0]] = -7
        layer.in_index[zero_at[1]] = 10 ** 12
        got1, got = layer(x[:1]), layer(x)
        fixed = layer.in_index.clone()
        fixed[zero_at] = layer.in_features  # the zero channel
        layer.set_gather(fixed, layer.in_features)  # padded now: the PyTorch path reads the zero channel
        with native_switch(False):
            assert torch.allclose(got1, layer(x[:1]), atol=1e-6) and torch.allclose(got, layer(x), atol=1e-6)
    y = torch.randn(4, 9)
    bad = torch.tensor([8, -1, 3, 9, 2 ** 40])
    expect = torch.zeros(4, 5)
    expect[:, [0, 2]] = y[:, [8, 3]]
    w = torch.randn(1, 5, 2)
    for r in range(4):  # batch 1: the input gather, and a scatter naming rows that are not there
        got = native.block_gemv(y[r:r + 1], bad, 9, w, None, out_index=torch.tensor([1, -1, 0, 2]))
        row = expect[r] @ w[0]
        assert torch.allclose(got, torch.stack([row[1], row.new_zeros(()), row[0], row.new_zeros(())])[None], atol=1e-5)
    assert torch.allclose(native.block_gemm(y, bad, 9, w, None), (expect @ w[0]).t(), atol=1e-5)
    for out_index in (torch.tensor([0, 0]), torch.tensor([1, 2])):  # a row twice, a row that is not there
        with pytest.raises(ValueError, match="out_index must name each of the 2 rows at most once"):
            native.block_gemm(y, bad, 9, w, None, batch_first=True, out_index=out_index)


def test_the_kernels_refuse_tensors_they_would_misread():
    w = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="x must be a contiguous torch.float32 CPU tensor of 5 elements"):
        native.block_gemv(torch.randn(1, 6), torch.zeros(6, dtype=torch.long), 5, w, None)
    with pytest.raises(ValueError, match="weight must be a contiguous"):
        native.block_gemv(torch.randn(1, 6), None, 6, w.transpose(1, 2), None)
    with pytest.raises(ValueError, match=r"x must be a float32 CPU \[N, 4\] tensor"):
        native.block_gemm(torch.randn(2, 4, dtype=torch.float64), torch.arange(6), 4, w, None)
    with pytest.raises(ValueError, match="index must be a contiguous torch.int64"):
        native.block_gemv(torch.randn(1, 6), torch.arange(6, dtype=torch.int32), 6, w, None)
    with pytest.raises(ValueError, match="out_index must be a contiguous torch.int64"):
        native.block_gemv(torch.randn(1, 6), None, 6, w, None, out_index=torch.arange(3.0))
    with pytest.raises(ValueError, match="bias must be a contiguous torch.float32 CPU tensor of 8"):
        native.block_gemm(torch.randn(4, 6), None, 6, w, torch.randn(2, 3))
    with pytest.raises(ValueError, match="x must be batch-first with unit column stride or the transpose"):
        native.block_gemm(torch.randn(4, 12)[:, ::2], None, 6, w, None)
    with pytest.raises(ValueError, match="without an index x must have 6 features, got 5"):
        native.block_gemm(torch.randn(4, 5), None, 5, w, None)
    with pytest.raises(ValueError, match="index must be a contiguous torch.int64 CPU tensor of 6"):
        native.block_gemm(torch.randn(4, 9), torch.arange(5), 9, w, None)


def test_a_layer_given_the_wrong_width_names_it():
    _, layer = _layer(True)
    with torch.no_grad(), pytest.raises(ValueError, match=r"\[N, 23\]"):
        layer(torch.randn(3, 22))
