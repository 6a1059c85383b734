"""The layer benchmark's plumbing on a tiny grid (the real grid is run by hand on a quiet machine)."""

import json
import os

import pytest

from pfgdf_plugin import native
from pfgdf_plugin.bench_layers import LayerGrid, bench_layers, build_pair, main, markdown_table, write_results

TINY = dict(sizes=(16,), conv_sizes=(8,), blocks=(2, 4), depths=(1, 3), batches=(1, 3), threads=(1,),
            spatial=4, warmup=0, repeats=2)


def test_a_tiny_grid_gives_one_row_per_case_and_writes_table_json_and_plot(tmp_path):
    pytest.importorskip("onnxruntime")
    ticks = iter(range(10 ** 6))
    grid = LayerGrid(**TINY)
    rows = bench_layers(grid, clock=lambda: float(next(ticks)))
    # linear: 2 blocks x 2 depths x 2 kernels; conv2d: 2 x 2 x 1 (grouped); each at 2 batches and 2 engines
    assert len(rows) == (8 + 4) * 2 * 2
    assert {(r["kind"], r["kernel"]) for r in rows} == {("linear", "bmm"), ("linear", "grouped"),
                                                         ("conv2d", "grouped")}
    assert all(r["speedup"] == 1.0 and r["of_ideal"] == 1.0 / r["blocks"] for r in rows)  # the stand-in clock
    paths = write_results(rows, str(tmp_path), grid)
    assert all(os.path.getsize(p) > 0 for p in paths.values())
    table = open(paths["md"]).read().splitlines()
    assert table[0].startswith("| kind | size | blocks") and len(table) == 2 + len(rows)
    assert json.load(open(paths["json"]))["meta"]["grid"]["sizes"] == [16]


@pytest.mark.parametrize("kind,kernel", [("linear", "bmm"), ("linear", "grouped"), ("linear", "dense"),
                                         ("conv2d", "grouped")])
def test_the_converted_stack_computes_what_the_masked_dense_stack_does(kind, kernel):
    import torch

    from pfgdf_plugin.methods import mpd

    dense, converted = build_pair(kind, 12, 3, 3, kernel)
    with torch.no_grad():  # the same seeded plans, applied as masks to the dense stack
        for name in ("0", "2", "4"):
            layer = dense.get_submodule(name)
            layer.weight.mul_(mpd.make_plan(name, layer.weight, 3, seed=0).mask())
    x = torch.randn(2, 12) if kind == "linear" else torch.randn(2, 12, 5, 5)
    ref = dense(x)
    assert float((converted(x) - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))
    # without the hand-off (the comparison --no-handoff times): no layer hands over, the same values
    _, plain = build_pair(kind, 12, 3, 3, kernel, handoff=False)
    flags = [getattr(m, "handoff", False) for m in converted.modules()]
    assert any(flags) == (kernel == "bmm") and not any(getattr(m, "handoff", False) for m in plain.modules())
    assert torch.equal(plain(x), converted(x))


def test_main_runs_a_tiny_grid_with_the_real_clock(tmp_path, capsys):
    assert main(["--kinds", "linear", "--sizes", "16", "--blocks", "2", "--depths", "1", "--batches", "1",
                 "--threads", "1", "--engines", "pytorch", "--kernels", "bmm", "--warmup", "0", "--repeats", "2",
                 "--out", str(tmp_path)]) == 0
    assert "layers.md" in capsys.readouterr().out
    assert markdown_table(json.load(open(tmp_path / "layers.json"))["rows"]).count("\n") == 2


def test_a_bad_grid_lists_every_problem():
    with pytest.raises(ValueError, match=r"kinds: unknown 'lstm'.*engines: unknown 'tvm'.*blocks must be positive"):
        LayerGrid(kinds=("lstm",), engines=("tvm",), blocks=(0,))
    with pytest.raises(ValueError, match=r"grad_mode: unknown 'eval' \(no_grad, inference\)"):
        LayerGrid(grad_mode="eval")


def test_the_targets_mode_marks_each_goal_met_or_not_by_the_clock():
    from pfgdf_plugin.bench_layers import TARGETS, bench_targets

    assert [(t["size"], t["depth"], t["batch"], t["target"]) for t in TARGETS] == [
        (1024, 3, 1, 4.0), (1024, 3, 64, 6.0), (4096, 1, 64, 7.2)]
    # a ticking clock: every timed call lasts one tick, so each speed-up is exactly 1
    small = [dict(kind="linear", size=12, blocks=3, depth=3, kernel="bmm", batch=b, target=t)
             for b, t in ((1, 1.0), (5, 1.5))]
    ticks = iter(range(10 ** 6))
    rows = bench_targets(("pytorch",), warmup=0, repeats=3, clock=lambda: float(next(ticks)), targets=small)
    assert [(r["depth"], r["batch"], r["speedup"], r["target"], r["met"]) for r in rows] == [
        (3, 1, 1.0, 1.0, True), (3, 5, 1.0, 1.5, False)]


def test_the_wide_mlp_pair_computes_what_the_masked_mlp_does_and_the_mode_runs_both_engines(tmp_path):
    import torch

    from pfgdf_plugin.bench_layers import bench_wide_mlp, engine_table, wide_mlp_pair
    from pfgdf_plugin.modules import BlockDiagonalLinear

    dense, converted = wide_mlp_pair("bmm", blocks=4, width=1 / 32)
    assert isinstance(converted.fc1, BlockDiagonalLinear) and isinstance(converted.fc3, torch.nn.Linear)
    assert converted.fc2.in_index is not None and converted.fc2.out_index is None  # fc3 absorbs fc2's scatter
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert converted(x).shape == dense(x).shape == (3, 10)
    engines = ("pytorch", "onnxruntime") if _has("onnxruntime") else ("pytorch",)
    ticks = iter(range(10 ** 6))
    rows = bench_wide_mlp(batches=(1, 2), blocks=4, engines=engines, warmup=0, repeats=2, width=1 / 32,
                          clock=lambda: float(next(ticks)))
    assert [(r["batch"], r["engine"]) for r in rows] == [(b, e) for b in (1, 2) for e in engines]
    assert all(r["kind"] == "wide_mlp" and r["size"] == 64 and 1 < r["ideal"] <= 4 for r in rows)
    if len(engines) == 2:
        assert engine_table(rows).count("\n") == 3  # header, rule, one line per batch


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_main_runs_the_modes_and_refuses_bad_options(tmp_path, capsys):
    assert main(["--wide-mlp", "--wide-width", "0.03125", "--wide-batches", "2", "--engines", "pytorch",
                 "--warmup", "0", "--repeats", "2", "--clock", "cpu", "--warm", "--out", str(tmp_path)]) == 0
    saved = json.load(open(tmp_path / "wide_mlp.json"))
    assert saved["meta"]["clock"] == "cpu" and saved["meta"]["warm"] is True and len(saved["rows"]) == 1
    assert saved["meta"]["handoff"] is True and saved["meta"]["native"] is True
    assert saved["meta"]["grad_mode"] == "no_grad"
    assert main(["--wide-mlp", "--wide-width", "0.03125", "--wide-batches", "2", "--engines", "pytorch",
                 "--warmup", "0", "--repeats", "2", "--no-handoff", "--no-native", "--grad-mode", "inference",
                 "--out", str(tmp_path)]) == 0
    saved = json.load(open(tmp_path / "wide_mlp.json"))
    assert saved["meta"]["handoff"] is False and saved["meta"]["native"] is False
    assert saved["meta"]["grad_mode"] == "inference" and len(saved["rows"]) == 1
    assert native.enabled()  # the command switches the C kernels back on when it ends
    capsys.readouterr()
    for argv, message in ((["--wide-mlp", "--wide-kernels", "fast"], "--wide-kernels: unknown"),
                          (["--clock", "cpu", "--threads", "1,2"], "--clock cpu measures one thread"),
                          (["--clock", "sundial"], "invalid choice")):
        with pytest.raises(SystemExit):
            main(argv + ["--out", str(tmp_path)])
        assert message in capsys.readouterr().err
