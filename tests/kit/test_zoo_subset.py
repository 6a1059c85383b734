"""The zoo sweep's fixed fast subset (default suite): a ConvNeXt, an EfficientNet, a RegNet, a GoogLeNet
(concatenating branches) and a MobileNetV3 go through every check of pfgdf_plugin/zoo_sweep.py at the smallest
input they take; each check passes or fails with the plugin's documented error, never a raw exception. The full
sweep (every torchvision classifier, the DenseNets' dense concatenations among them; ``make zoo``) is
tests/kit/test_zoo_full.py.
"""

from __future__ import annotations

import pytest
import torch

from pfgdf_plugin import zoo_sweep
from pfgdf_plugin.errors import DBPError

SUBSET = ("convnext_tiny", "efficientnet_b0", "regnet_x_400mf", "googlenet", "mobilenet_v3_small")
CASES = [(m, c) for m in SUBSET for c in zoo_sweep.CHECKS]


@pytest.fixture(scope="module")
def cases():
    torch.set_num_threads(1)
    found = {}

    def get(name):
        if name not in found:
            found[name] = zoo_sweep.eligible(name)
        return found[name]
    return get


@pytest.mark.parametrize("name", SUBSET)
def test_subset_models_are_in_the_list_at_a_small_input(name, cases):
    case, reason = cases(name)
    assert case is not None, reason
    assert case.size <= 64


@pytest.mark.parametrize("name,check", CASES, ids=["-".join(c) for c in CASES])
def test_every_check_passes_or_raises_a_documented_error(name, check, cases):
    case, _ = cases(name)
    before = {k: v.clone() for k, v in case.dense.state_dict().items()}
    result = zoo_sweep.run_check(zoo_sweep.CHECKS[check], case, check)
    assert result.status in (zoo_sweep.PASS, zoo_sweep.PLUGIN), f"{name}/{check}: {result.error}: {result.message}"
    after = case.dense.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())


def test_run_check_sorts_errors_into_documented_and_bugs():
    def plugin(case):
        raise DBPError("no removable block in Net")

    def bug(case):
        raise KeyError("features.3")

    def refusal(case):
        raise RuntimeError("torch.fx could not trace Net (TraceError: x)")

    assert zoo_sweep.run_check(plugin, None, "dbp").status == zoo_sweep.PLUGIN
    assert zoo_sweep.run_check(bug, None, "dbp").status == zoo_sweep.OTHER
    assert zoo_sweep.run_check(refusal, None, "nni_speedup").status == zoo_sweep.PLUGIN
    assert zoo_sweep.run_check(refusal, None, "onnx").status == zoo_sweep.OTHER
    r = zoo_sweep.run_check(bug, None, "persist")
    assert (r.error, r.message) == ("KeyError", "'features.3'")


def test_markdown_has_counts_table_and_every_reason(tmp_path):
    res = zoo_sweep.Result
    out = {"checks": ["dbp", "onnx"],
           "rows": {"net_a": {"size": 32, "params": 1, "results": {"dbp": res("pass"), "onnx": res("pass")}},
                    "net_b": {"size": 64, "params": 1,
                              "results": {"dbp": res(zoo_sweep.PLUGIN, "DBPError", "no removable block"),
                                          "onnx": res(zoo_sweep.OTHER, "KeyError", "'x'")}}},
           "excluded": {"net_c": "MagnitudeImportance at 32x32: ValueError: bad"},
           "skipped": {"net_d": "700M parameters"}}
    path = tmp_path / "zoo.md"
    zoo_sweep.write_markdown(out, str(path))
    text = path.read_text()
    assert "| dbp | 1 | 1 | 0 |" in text and "| onnx | 1 | 0 | 1 |" in text
    assert "| net_b | 64 | DBPError | **KeyError** (bug) |" in text
    assert "no removable block" in text and "net_c" in text and "700M parameters" in text


def test_time_budget_skips_the_models_left_with_the_reason():
    ticks = iter(range(0, 1000, 10))
    out = zoo_sweep.sweep(["resnet18", "vgg11"], budget=5.0, clock=lambda: float(next(ticks)), log=lambda s: None)
    assert out["rows"] == {} and set(out["skipped"]) == {"resnet18", "vgg11"}
    assert "time budget (5 s)" in out["skipped"]["vgg11"]


def test_one_process_per_model_runs_the_checks_and_survives_a_process_that_dies():
    """``isolate=True``: a model's checks run in a child process and come back as results; a child that
    cannot run (here: its address space capped far below what torch needs) is recorded with how it
    ended, and the sweep goes on to the next model."""
    out = zoo_sweep.sweep(["squeezenet1_1"], ["persist"], isolate=True)
    assert out["rows"]["squeezenet1_1"]["results"]["persist"].status == zoo_sweep.PASS
    out = zoo_sweep.sweep(["squeezenet1_1", "squeezenet1_0"], ["persist"], isolate=True, memory_gb=0.05)
    assert set(out["excluded"]) == {"squeezenet1_1", "squeezenet1_0"}
    assert "address space capped at 0.05 GB" in out["excluded"]["squeezenet1_1"]
