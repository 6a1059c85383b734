"""The Pareto bench on a tiny budget: cells over entries x targets x seeds, the shared training budget,
unreachable targets kept, the fresh-process latency, resuming, re-rendering and config errors."""

import json
import os

import pytest
import yaml

from pfgdf_plugin.bench import load_bench_config, render, run_bench
from pfgdf_plugin.config import ConfigError
from pfgdf_plugin.pareto import run_pareto

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
E = 2.0  # the shared budget after the dense model in these tests


def tiny(tmp_path, **over):
    cfg = {
        "name": "tiny_pareto", "work_dir": str(tmp_path / "work"), "progress": False, "seeds": [0, 1],
        "model": {"name": "lenet5"}, "data": {"name": "digits", "limit_train": 192, "limit_test": 64,
                                              "batch_size": 32},
        "train": {"epochs": 1}, "finetune": {"lr": 0.01}, "epochs_after_dense": E,
        "targets": [{"macs": 1.3}, {"macs": 2.0}], "timing": {"warmup": 0, "repeats": 2},
        "entries": [
            {"label": "PFGDF", "method": "pfgdf", "params": {"min_channels": 1}},
            {"label": "L1", "method": "l1", "targets": [{"macs": 2.0}, {"macs": 1000.0}]},
            {"label": "SPP", "method": "spp", "params": {"A": 0.5, "interval": 1, "max_epochs": 1.0},
             "targets": [{"macs": 1.3}]},
        ],
    }
    cfg.update(over)
    path = tmp_path / "pareto.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path), cfg


def test_pareto_bench_end_to_end(tmp_path, monkeypatch):
    path, raw = tiny(tmp_path)
    # record the epochs every fine-tuning received
    got = []
    real = run_pareto.__globals__["finetune"]

    def recording(model, loader, cfg, *args, **kwargs):
        got.append(cfg.epochs)
        return real(model, loader, cfg, *args, **kwargs)

    monkeypatch.setitem(run_pareto.__globals__, "finetune", recording)
    out = tmp_path / "docs"
    res = run_bench(path, out_dir=str(out))
    cells = res["cells"]
    # PFGDF at both shared targets, L1 and SPP at their own, each with both seeds
    assert sorted((c["label"], c["target"]["macs"], c["seed"]) for c in cells) == sorted(
        [("PFGDF", t, s) for t in (1.3, 2.0) for s in (0, 1)] + [("L1", t, s) for t in (2.0, 1000.0) for s in (0, 1)]
        + [("SPP", 1.3, s) for s in (0, 1)])
    for c in cells:
        if c["target"]["macs"] == 1000.0:
            continue
        assert c["status"] == "ok", c
        assert c["search"]["met"] and c["search"]["reached"] >= c["target"]["macs"]
        assert res["dense"]["macs"] / c["macs"] >= c["target"]["macs"] - 1e-9
        assert c["train_epochs"] + c["finetune_epochs"] == pytest.approx(E)
        assert 0 <= c["accuracy"] <= 1
        assert c["remeasured"]["median_ms"] > 0 and c["remeasured"]["speedup"] > 0
    # SPP trained while pruning and was fine-tuned only for what its pruning stage left of the budget
    spp = [c for c in cells if c["label"] == "SPP"]
    assert all(0 < c["train_epochs"] <= 1.0 for c in spp)
    assert sorted(got) == sorted(c["finetune_epochs"] for c in cells if c["finetune_epochs"])
    assert [e for e in got if e < E] == [E - c["train_epochs"] for c in spp]
    # an unreachable target is kept with the best reached, and shown at a share of it
    far = [c for c in cells if c["target"]["macs"] == 1000.0]
    for c in far:
        assert c["status"] == "unreachable" and c["best_reached"] > 1
        assert "cannot be reached" in c["message"]
        assert c["shown_at"]["macs"] == pytest.approx(round(c["best_reached"] * 0.95, 3))
        assert c["model_file"] and c["search"]["reached"] >= c["shown_at"]["macs"]
    # the latency came from another process, with the dense model among the models timed
    assert res["remeasure"]["pid"] != os.getpid() and res["dense"]["latency"]["median_ms"] > 0
    # files: the JSON with every seed, the section, two plots, and benchmarks.md assembled
    saved = json.load(open(out / "bench" / "tiny_pareto.json"))
    assert saved["mode"] == "pareto" and len(saved["cells"]) == len(cells)
    assert {(c["label"], c["seed"]) for c in saved["cells"]} >= {("PFGDF", 0), ("PFGDF", 1)}
    md = (out / "bench" / "tiny_pareto.md").read_text()
    assert "### macs 1.3x" in md and "### macs 2x" in md and "### macs 1000x" in md
    assert "| L1 (unreachable) | 2/2 |" in md and "**unreachable** (best" in md
    assert "192 training / 64 test images" in md and "Seeds: 0, 1" in md
    for png in ("tiny_pareto_speedup.png", "tiny_pareto_macs.png"):
        assert (out / "bench" / png).stat().st_size > 1000
    assert "## tiny_pareto" in (out / "benchmarks.md").read_text()

    # a second run reuses every finished cell: nothing is pruned again
    def no_prune(*a, **k):
        raise AssertionError("a finished cell was pruned again")

    monkeypatch.setitem(run_pareto.__globals__, "prune", no_prune)
    again = run_pareto(load_bench_config(path), str(tmp_path / "docs2"), command="again")
    assert [c.get("accuracy") for c in again["cells"]] == [c.get("accuracy") for c in cells]

    # --render rewrites the section from the JSON alone
    (out / "bench" / "tiny_pareto.md").unlink()
    render(str(out / "bench" / "tiny_pareto.json"), str(out))
    assert (out / "bench" / "tiny_pareto.md").read_text() == md


def bad(tmp_path, **over):
    path, _ = tiny(tmp_path, **over)
    with pytest.raises(ConfigError) as info:
        load_bench_config(path)
    return str(info.value)


def test_pareto_config_errors_name_the_key(tmp_path):
    entries = [{"label": "x", "method": "pfgdf_typo"}]
    assert "entries[0].method 'pfgdf_typo' is unknown; known:" in bad(tmp_path, entries=entries)
    spp = [{"label": "spp", "method": "spp", "params": {"max_epochs": 2.5}}]
    assert "entries[0].params.max_epochs = 2.5 exceeds epochs_after_dense = 2" in bad(tmp_path, entries=spp)
    spp_default = [{"label": "spp", "method": "spp"}]  # SPP's default max_epochs (2) does not fit either
    assert "entries[0].params.max_epochs = 2 (the default) exceeds" in bad(tmp_path, entries=spp_default,
                                                                            epochs_after_dense=1)
    assert "targets[1]: unknown kind 'speed'" in bad(tmp_path, targets=[{"macs": 2.0}, {"speed": 2.0}])
    own = [{"label": "l1", "method": "l1", "targets": [{"flops": 2}]}]
    assert "entries[0].targets[0]: unknown kind 'flops'" in bad(tmp_path, entries=own)
    assert "seeds must be a non-empty list of distinct integers, got []" in bad(tmp_path, seeds=[])
    assert "seeds must be a non-empty list of distinct integers, got [1, 1]" in bad(tmp_path, seeds=[1, 1])
    assert "finetune.epochs is not used by a Pareto bench" in bad(tmp_path, finetune={"epochs": 2})
    assert "timing: engine must be one of" in bad(tmp_path, timing={"engine": "tvm"})
    assert "epochs_after_dense must be >= 0" in bad(tmp_path, epochs_after_dense=-1)
    # a knob the target chooses
    pf = [{"label": "pf", "method": "pfgdf", "params": {"k": 1.0}}]
    assert "entries[0].target and entries[0].params.k: give one of them" in bad(tmp_path, entries=pf)
    # every problem at once
    msg = bad(tmp_path, seeds=[], entries=entries)
    assert "seeds must be" in msg and "entries[0].method" in msg


def test_pareto_ignored_layers_are_checked_before_any_cell(tmp_path, monkeypatch):
    path, _ = tiny(tmp_path, seeds=[0], entries=[
        {"label": "l1", "method": "l1", "ignored_layers": ["no_such_layer"]}])

    def no_prune(*a, **k):
        raise AssertionError("a cell ran before the layers were checked")

    monkeypatch.setitem(run_pareto.__globals__, "prune", no_prune)
    with pytest.raises(ConfigError, match=r"entries\[0\]\.ignored_layers: no layer named 'no_such_layer'"):
        run_pareto(load_bench_config(path), str(tmp_path / "docs"))


def test_an_unreachable_search_names_its_best_ratio():
    """The bench reads the best ratio from the error, not from its message."""
    from pfgdf_plugin.errors import TargetError
    from pfgdf_plugin.methods.target import Target, search

    with pytest.raises(TargetError) as info:
        search(lambda knob: 1.0 + knob, Target.parse({"macs": 9.0}), 0.0, 0.95)
    assert info.value.best == pytest.approx(1.95)


def test_a_failed_retry_follows_the_best_it_measured(tmp_path, monkeypatch):
    """Noise can put a retry's best below the first search's: the next retry starts from the lower one."""
    from pfgdf_plugin.errors import TargetError

    path, _ = tiny(tmp_path, seeds=[0], entries=[{"label": "L1", "method": "l1", "targets": [{"macs": 5.0}]}])
    real = run_pareto.__globals__["prune"]
    asked = []

    def noisy(*args, target=None, **kwargs):
        asked.append(target["macs"])
        if len(asked) < 3:  # the search, then a first retry that measured lower
            raise TargetError("target cannot be reached", best=[2.0, 1.6][len(asked) - 1])
        return real(*args, target=target, **kwargs)

    monkeypatch.setitem(run_pareto.__globals__, "prune", noisy)
    cell, = run_bench(path, out_dir=str(tmp_path / "docs"))["cells"]
    assert asked == [5.0, 1.9, 1.52]
    assert cell["status"] == "unreachable" and cell["shown_at"] == {"macs": 1.52} and cell["model_file"]
    assert "retry at macs 1.9x failed too" in cell["message"]
