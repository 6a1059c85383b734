"""Recipes: every shipped recipe runs on a tiny budget; bad recipes fail with named errors."""

import glob
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from pfgdf_plugin.config import ConfigError
from pfgdf_plugin.persist import PrunedFileError, load_pruned, read_pruned
from pfgdf_plugin.recipe import load_recipe, recipe_from_dict
from pfgdf_plugin.runner import RunError, run_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALL_YAML = sorted(glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"), recursive=True))
BENCH_CONFIGS = [p for p in ALL_YAML if os.path.basename(os.path.dirname(p)) == "bench"]
RECIPES = [p for p in ALL_YAML if p not in BENCH_CONFIGS]
PFGDF_RECIPE = os.path.join(ROOT, "recipes", "pfgdf_vgg16.yaml")
TINY = ["data.name=digits", "model.width=0.25", "data.limit_train=256", "data.limit_test=128", "data.batch_size=64",
        "train.epochs=1", "finetune.epochs=1", "report.repeats=2", "report.warmup=1", "progress=false"]


# training-aware methods get a schedule that finishes within the tiny budget
TINY_METHOD = {"spp": ["prune.params.A=0.5", "prune.params.interval=1", "prune.params.max_epochs=5"],
               "dbp": ["prune.params.blocks=2", "prune.params.latency=null", "prune.params.macs=null",
                       "prune.params.num_batches=2"],
               "mpd": ["prune.params.max_epochs=0.5"]}


# recipes whose model or images are too big for the tiny budget get a smaller stand-in
TINY_RECIPE = {"pfgdf_resnet50_imagefolder.yaml": ["model.name=resnet18", "model.width=1.0", "data.image_size=32",
                                                   "data.workers=0"],
               "pfgdf_timm_resnet10t.yaml": ["model.width=1.0", "data.image_size=16"]}


def _needs_timm(path):
    """Recipes of timm models are skipped where timm (the optional [timm] extra) is not installed."""
    with open(path) as f:
        if "timm/" in str((yaml.safe_load(f).get("model") or {}).get("name", "")):
            pytest.importorskip("timm")


def tiny(path, tmp_path, extra=()):
    _needs_timm(path)
    method = load_recipe(path).prune.method
    return load_recipe(path, TINY + TINY_METHOD.get(method, []) + TINY_RECIPE.get(os.path.basename(path), [])
                       + [f"output_dir={tmp_path}"] + list(extra))


def test_recipes_are_found():
    names = {os.path.basename(p) for p in RECIPES}
    assert {"pfgdf_vgg16.yaml", "pfgdf_vgg16_nni.yaml", "spp_resnet56.yaml", "spp_resnet56_nni.yaml",
            "dbp_vgg16.yaml", "dbp_resnet56.yaml", "dbp_vgg16_nni.yaml",
            "mpd_lenet300.yaml", "mpd_vgg16.yaml", "mpd_lenet300_nni.yaml"} <= names


def test_every_yaml_under_recipes_is_a_recipe_or_a_bench_config():
    assert BENCH_CONFIGS and RECIPES
    assert all(os.path.dirname(p) == os.path.join(ROOT, "recipes") for p in RECIPES), \
        "a YAML file in a new folder under recipes/ is neither a recipe nor a bench config: teach this test"


@pytest.mark.parametrize("path", BENCH_CONFIGS, ids=os.path.basename)
def test_bench_config_validates_and_states_its_command(path):
    from pfgdf_plugin.bench import load_bench_config

    cfg = load_bench_config(path)
    assert cfg.entries
    with open(path) as f:
        first = f.readline()
    assert first.startswith("# pfgdf-plugin bench --config recipes/bench/" + os.path.basename(path))


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_validates_and_states_its_command(path):
    _needs_timm(path)
    load_recipe(path)
    with open(path) as f:
        first = f.readline()
    assert first.startswith("# pfgdf-plugin run recipes/" + os.path.basename(path))


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_runs_end_to_end(path, tmp_path):
    recipe = tiny(path, tmp_path)
    metrics = run_recipe(recipe, quiet=True)
    out = metrics["run_dir"]
    for f in ("metrics.json", "report.md", "recipe.yaml", "dense.pt", "pruned.pt", "filters_per_layer.png"):
        assert os.path.exists(os.path.join(out, f)), f
    assert metrics["after"]["params"] < metrics["before"]["params"]
    if recipe.prune.method == "mpd":  # same channels, block-diagonal weights
        assert metrics["mpd"]["compression"] > 2 and os.path.exists(os.path.join(out, "mpd_blocks.png"))
    else:
        assert metrics["after"]["filters"] < metrics["before"]["filters"]
    if recipe.prune.method == "dbp":
        assert len(metrics["dbp"]["removed"]) == 2 and os.path.exists(os.path.join(out, "dbp_blocks.png"))
    if recipe.quantize.method:
        assert metrics["quantized"]["layers"] > 0 and metrics["onnx"]["int8"]["status"] == "ok"
    assert set(metrics["latency"]) == {"1", "32"}
    if recipe.prune.method == "pfgdf":
        assert os.path.exists(os.path.join(out, "pfgdf_gaussian.png"))
    if recipe.prune.method == "spp":
        assert metrics["spp"]["finished"] and os.path.exists(os.path.join(out, "spp_probabilities.png"))
    # the pruned model reloads without unpickling code and computes the same outputs
    blob = torch.load(os.path.join(out, "pruned.pt"), weights_only=True)
    assert "state_dict" in blob
    model, meta = load_pruned(os.path.join(out, "pruned.pt"))
    x = torch.randn(2, *meta_input(metrics))
    model2, _ = load_pruned(os.path.join(out, "pruned.pt"))
    assert torch.equal(model(x), model2(x))
    assert metrics["onnx"]["status"] == "ok" and metrics["onnx"]["max_abs_diff"] < 1e-3
    # the saved recipe reruns
    again = yaml.safe_load(open(os.path.join(out, "recipe.yaml")))
    assert recipe_from_dict(again).to_dict() == recipe.to_dict()


def meta_input(metrics):
    shape = metrics["data"].rsplit("(", 1)[1].rstrip(")")
    return tuple(int(v) for v in shape.strip("()").split(",") if v.strip())


def test_pruned_outputs_match_between_run_and_reload(tmp_path):
    recipe = tiny(PFGDF_RECIPE, tmp_path, ["model.name=resnet20", "model.width=0.5", "name=r20",
                                          "prune.ignored_layers=[fc]", "export.onnx=false", "report.latency=false"])
    metrics = run_recipe(recipe, quiet=True)
    path = os.path.join(metrics["run_dir"], "pruned.pt")
    model, _ = load_pruned(path)
    assert metrics["after"]["params"] == sum(p.numel() for p in model.parameters())
    # tampering: a mismatched structure is refused with a clear error
    blob = torch.load(path, weights_only=True)
    meta = json.loads(blob["meta"])
    meta["structure"]["conv1"]["out_channels"] += 1
    blob["meta"] = json.dumps(meta)
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(PrunedFileError, match="do not fit"):
        load_pruned(str(tmp_path / "bad.pt"))
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(PrunedFileError, match="not a pfgdf-plugin"):
        read_pruned(str(tmp_path / "other.pt"))


@pytest.mark.parametrize("data,match", [
    ({"prune": {"methd": "pfgdf"}}, r"unknown key 'prune.methd'"),
    ({"prune": {"method": "pfdgf"}}, r"prune.method 'pfdgf' is unknown; known: .*pfgdf"),
    ({"prune": {"params": {"k": -1}}}, r"prune.params.k must be > 0, got -1"),
    ({"prune": {"params": {"k": "big"}}}, r"prune.params.k must be float, got 'big'"),
    ({"prune": {"method": "l1"}}, r"prune.ratio is required"),
    ({"prune": {"method": "l1", "ratio": 1.5}}, r"prune.ratio must be in \(0, 1\), got 1.5"),
    ({"prune": {"framework": "keras"}}, r"prune.framework must be one of"),
    ({"data": {"name": "imagenet21k"}}, r"data.name 'imagenet21k' is unknown"),
    ({"model": {"width": "wide"}}, r"model.width must be float"),
    ({"finetune": {"epochs": -1}}, r"finetune.epochs must be >= 0"),
    ({"report": {"batch_sizes": [0]}}, r"report.batch_sizes"),
])
def test_bad_recipes_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        recipe_from_dict(data)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        recipe_from_dict({"prune": {"params": {"k": 0}}, "data": {"batch_size": 0}, "bogus": 1})
    assert len(e.value.errors) == 3


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pfgdf_plugin", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": ROOT})


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    from pfgdf_plugin.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("prune:\n  params:\n    k: 0\n")
    r = _cli("validate", str(bad))  # the real entry point, in its own process
    assert r.returncode == 2 and "k must be > 0" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    # the same entry point in this process (an escaping exception would fail the test)
    capsys.readouterr()
    assert main(["run", PFGDF_RECIPE, "--set", "data.name=cifar10", "--set", f"data.root={tmp_path}",
                 "--set", f"output_dir={tmp_path}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cifar-10-batches-py" in err and err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "no such recipe file" in err and err.strip().count("\n") == 0, err
    assert main(["validate", PFGDF_RECIPE, "--set", "prune.params.k=2.0"]) == 0, capsys.readouterr().err


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _digests(folder):
    """``{relative path: sha256}`` of every file below ``folder`` (TensorBoard writes a subfolder)."""
    return {os.path.relpath(os.path.join(root, f), folder): _digest(os.path.join(root, f))
            for root, _, files in os.walk(folder) for f in files}


def test_failed_run_keeps_earlier_results_and_input_model(tmp_path):
    recipe = tiny(PFGDF_RECIPE, tmp_path, ["export.onnx=false", "report.latency=false", "report.plots=false"])
    first = run_recipe(recipe, quiet=True)
    ckpt = os.path.join(first["run_dir"], "dense.pt")
    before = _digests(first["run_dir"])
    # a checkpoint that does not fit the model: the run fails, nothing earlier changes
    bad = tiny(PFGDF_RECIPE, tmp_path, [f"model.checkpoint={ckpt}", "model.width=0.5"])
    with pytest.raises(RunError, match="does not fit model"):
        run_recipe(bad, quiet=True)
    after = _digests(first["run_dir"])
    assert before == after
    # a second successful run goes beside the first one, never over it
    ok = tiny(PFGDF_RECIPE, tmp_path, [f"model.checkpoint={ckpt}", "export.onnx=false", "report.latency=false"])
    second = run_recipe(ok, quiet=True)
    assert second["run_dir"] != first["run_dir"] and _digest(ckpt) == before["dense.pt"]


def _target_recipe(tmp_path, method, framework, target=None, **prune):
    """The PFGDF recipe on the tiny digits budget, turned to ``method`` via ``framework`` with a target."""
    from pfgdf_plugin.config import set_by_path

    data = yaml.safe_load(open(PFGDF_RECIPE))
    for item in TINY + [f"output_dir={tmp_path}", "export.onnx=false", "report.latency=false", "report.plots=false"]:
        set_by_path(data, item)
    params = {"spp": {"A": 0.5, "interval": 1, "max_epochs": 5}, "dbp": {"num_batches": 2},
              "mpd": {"max_epochs": 0.5}}.get(method, {})
    ignored = ["classifier"] + (["features.0"] if method == "mpd" else [])  # MPD: a 1-channel stem takes 1 block
    data["prune"] = {"framework": framework, "method": method, "params": params, "ignored_layers": ignored,
                     "target": target or {"macs": 1.3}, **prune}
    return data


def _method_frameworks():
    """Every registered method in each of its frameworks; of the frameworks' plain criteria
    (``pruning/builtin.py``: l1, l2, fpgm, random, one wrapper each for Torch-Pruning and NNI that differs
    only in the importance or pruner class it names) l1 stands for the family (test_conformance runs
    every one of them)."""
    from pfgdf_plugin.pruning import METHODS
    from pfgdf_plugin.pruning.builtin import BUILTINS

    same_path = set(BUILTINS) - {"l1"}
    return [(m, fw) for m in METHODS.names() if m not in same_path for fw in sorted(METHODS.get(m).run)]


@pytest.mark.parametrize("method,framework", _method_frameworks())
def test_every_method_meets_a_recipe_target(method, framework, tmp_path):
    metrics = run_recipe(recipe_from_dict(_target_recipe(tmp_path, method, framework)), quiet=True)
    target = metrics["target"]
    assert target["requested"] == {"macs": 1.3}
    assert target["reached"] >= 1.3 and target["met"]
    assert metrics["before"]["macs"] / metrics["after"]["macs"] == pytest.approx(target["reached"], rel=1e-6)
    with open(os.path.join(metrics["run_dir"], "metrics.json")) as f:
        assert json.load(f)["target"]["requested"] == {"macs": 1.3}
    with open(os.path.join(metrics["run_dir"], "report.md")) as f:
        assert "Budget: macs 1.3x requested" in f.read()


@pytest.mark.parametrize("method,prune,match", [
    ("l1", {"ratio": 0.5}, r"prune.target and prune.ratio: give one of them"),
    ("pfgdf", {"params": {"k": 1.0}}, r"prune.target and prune.params.k: give one of them"),
    ("mpd", {"params": {"blocks": 4}}, r"prune.target and prune.params.blocks: give one of them"),
    ("dbp", {"params": {"macs": 2.0}}, r"prune.target and prune.params.macs: give one of them"),
    ("l1", {"target": {"macs": 2.0, "latency": 2.0}}, r"prune.target: give one target at a time"),
    ("l1", {"target": {"macs": 0.5}}, r"prune.target: macs must be a finite ratio >= 1"),
    ("l1", {"target": {"macs": float("nan")}}, r"ratio >= 1 .* got nan"),
    ("l1", {"timing": {"engine": "tvm"}}, r"prune.timing: engine must be one of pytorch, onnxruntime"),
])
def test_bad_recipe_targets_are_named(method, prune, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        recipe_from_dict(_target_recipe(tmp_path, method, "torch_pruning", **prune))


def test_timing_without_a_target_is_named(tmp_path):
    data = _target_recipe(tmp_path, "l1", "torch_pruning", ratio=0.5, timing={"threads": 2})
    del data["prune"]["target"]
    with pytest.raises(ConfigError, match=r"prune.timing is used only with prune.target"):
        recipe_from_dict(data)
