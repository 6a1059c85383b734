"""The bench command on a tiny budget: every entry kind, and the same-ratio comparison."""

import json
import os

import yaml

from pfgdf_plugin.bench import run_bench


def test_bench_compares_at_the_same_per_layer_ratios(tmp_path):
    cfg = {
        "name": "tiny", "work_dir": str(tmp_path / "work"), "threads": [1], "repeats": 2, "warmup": 1,
        "progress": False,
        "model": {"name": "vgg16_bn", "width": 0.25}, "data": {"name": "digits", "limit_train": 128, "limit_test": 64},
        "train": {"epochs": 1}, "finetune": {"epochs": 1},
        "entries": [
            {"label": "pfgdf", "method": "pfgdf", "params": {"k": 1.0}},
            {"label": "l1 tp", "method": "l1", "ratios_from": "pfgdf"},
            {"label": "l1 nni", "method": "l1", "framework": "nni", "ratios_from": "pfgdf"},
            {"label": "spp", "method": "spp", "ratio": 0.5, "params": {"A": 0.5, "interval": 1, "max_epochs": 5}},
        ],
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "docs"
    res = run_bench(str(path), out_dir=str(out))
    rows = res["rows"]
    fpl = {k: r["summary"]["filters_per_layer"] for k, r in rows.items()}
    assert fpl["pfgdf"] == fpl["l1 tp"] == fpl["l1 nni"]
    assert rows["spp"]["summary"]["params"] < res["dense"]["params"]
    md = (out / "benchmarks.md").read_text()
    assert "## tiny" in md and "| l1 nni |" in md and "ONNX Runtime, 1 thread(s)" in md
    assert json.load(open(out / "bench" / "tiny.json"))["rows"].keys() == rows.keys()
    # a second bench adds its own section and keeps the first; it also quantizes its entry
    cfg2 = dict(cfg, name="other", entries=cfg["entries"][:1], quantize={"method": "qat", "epochs": 0.5})
    path.write_text(yaml.safe_dump(cfg2))
    run_bench(str(path), out_dir=str(out))
    md = (out / "benchmarks.md").read_text()
    assert "## tiny" in md and "## other" in md
    row = json.load(open(out / "bench" / "other.json"))["rows"]["pfgdf"]
    assert 0 <= row["accuracy_quantized"] <= 1 and 0 <= row["accuracy_int8_onnx"] <= 1
    assert "acc. 8-bit QAT (NNI)" in md and "| pfgdf | pfgdf, int8 |" in md  # ORT times the int8 model
    assert os.path.exists(out / "bench" / "other_filters.png")


def test_bench_matches_width_pruning_to_a_depth_pruned_budget(tmp_path):
    cfg = {
        "name": "depth", "work_dir": str(tmp_path / "work"), "threads": [1], "repeats": 2, "warmup": 1,
        "progress": False, "onnxruntime": False,
        "model": {"name": "vgg16_bn", "width": 0.25}, "data": {"name": "digits", "limit_train": 128, "limit_test": 64},
        "train": {"epochs": 1}, "finetune": {"epochs": 0.5},
        "entries": [
            {"label": "dbp", "method": "dbp", "params": {"blocks": 3, "num_batches": 1}},
            {"label": "l1 same MACs", "method": "l1", "match_from": "dbp"},
            {"label": "mpd", "method": "mpd", "params": {"compression": 4.0, "max_epochs": 0.0}},
            {"label": "l1 same params", "method": "l1", "match_from": "mpd", "match_metric": "params"},
        ],
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rows = run_bench(str(path), out_dir=str(tmp_path / "docs"))["rows"]
    dbp, l1 = rows["dbp"]["summary"], rows["l1 same MACs"]["summary"]
    assert len(rows["dbp"]["extra"]["dbp_removed"]) == 3
    assert abs(l1["macs"] - dbp["macs"]) / dbp["macs"] < 0.05
    mpd, l1p = rows["mpd"]["summary"], rows["l1 same params"]["summary"]
    assert abs(l1p["params"] - mpd["params"]) / mpd["params"] < 0.05
