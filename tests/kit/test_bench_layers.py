"""The layer benchmark's plumbing on a tiny grid (the real grid is run by hand on a quiet machine)."""

import json
import os

import pytest

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


def test_main_runs_a_tiny_grid_with_the_real_clock(tmp_path, capsys):
    assert main(["--kinds", "linear", "--sizes", "16", "--blocks", "2", "--depths", "1", "--batches", "1",
                 "--threads", "1", "--engines", "pytorch", "--kernels", "bmm", "--warmup", "0", "--repeats", "2",
                 "--out", str(tmp_path)]) == 0
    assert "layers.md" in capsys.readouterr().out
    assert markdown_table(json.load(open(tmp_path / "layers.json"))["rows"]).count("\n") == 2


def test_a_bad_grid_lists_every_problem():
    with pytest.raises(ValueError, match=r"kinds: unknown 'lstm'.*engines: unknown 'tvm'.*blocks must be positive"):
        LayerGrid(kinds=("lstm",), engines=("tvm",), blocks=(0,))
