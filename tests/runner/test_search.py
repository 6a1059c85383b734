"""NNI searches: the trial entry point, experiment configs, and one real offline experiment."""

import glob
import os
import socket
import sys

import pytest
import torch
import yaml

from pfgdf_plugin.search import SearchError, load_experiment, run_search, run_trial

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "recipes", "nni", "*.yml")))
RECIPE = os.path.join(ROOT, "recipes", "pfgdf_vgg16.yaml")
TINY = ["data.name=digits", "model.width=0.25", "data.limit_train=256", "data.limit_test=128", "data.batch_size=64",
        "train.epochs=1", "finetune.epochs=1", "report.latency=false", "export.onnx=false", "report.plots=false"]


def test_every_method_has_an_experiment():
    assert {os.path.basename(p) for p in EXPERIMENTS} >= {"pfgdf_search.yml", "spp_search.yml", "dbp_search.yml",
                                                          "mpd_search.yml"}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_shipped_experiment_loads_and_maps_every_parameter(path, tmp_path):
    config = load_experiment(path, work_dir=str(tmp_path))
    assert config.trial_command.startswith(f"{sys.executable} -m pfgdf_plugin trial ")
    with open(path) as f:
        assert f.readline().startswith("# nnictl create --config recipes/nni/" + os.path.basename(path))
    assert config.tuner is not None and config.search_space


def test_trial_applies_parameters_and_reports(tmp_path, monkeypatch):
    reported = {"intermediate": [], "final": None}
    import nni

    monkeypatch.setattr(nni, "report_intermediate_result", lambda v: reported["intermediate"].append(v))
    monkeypatch.setattr(nni, "report_final_result", lambda v: reported.__setitem__("final", v))
    final = run_trial(RECIPE, TINY + ["finetune.epochs=2", f"output_dir={tmp_path}"],
                      params={"prune.params.k": 1.3, "prune.params.statistic": "l2"}, quiet=True)
    assert reported["final"] == final and len(reported["intermediate"]) == 2
    assert set(final) == {"default", "params", "macs"} and 0 <= final["default"] <= 1
    saved = yaml.safe_load(open(os.path.join(tmp_path, "pfgdf_vgg16", "recipe.yaml")))
    assert saved["prune"]["params"]["k"] == 1.3 and saved["prune"]["params"]["statistic"] == "l2"


@pytest.mark.parametrize("params,match", [
    ({"k": 1.0}, r"search-space parameter\(s\) k: unknown key 'k'"),
    ({"prune.params.kk": 1.0}, r"search-space parameter\(s\) prune.params.kk: unknown key 'prune.params.kk'"),
    ({"prune.params.k": "one"}, r"prune.params.k must be float, got 'one'"),
    ({"prune.method.x": 1}, r"search-space parameter 'prune.method.x' maps to no recipe key"),
])
def test_trial_parameter_that_maps_nowhere_is_named(params, match, tmp_path):
    with pytest.raises(SearchError, match=match):
        run_trial(RECIPE, TINY + [f"output_dir={tmp_path}"], params=params, quiet=True)
    assert not os.path.exists(os.path.join(tmp_path, "pfgdf_vgg16"))


def _experiment(tmp_path, space, trials):
    command = f"pfgdf-plugin trial {RECIPE} " + " ".join(f"--set {o}" for o in TINY)
    cfg = {"experimentName": "tiny", "searchSpace": space, "trialCommand": command, "trialCodeDirectory": ".",
           "trialConcurrency": 1, "maxTrialNumber": trials, "tuner": {"name": "GridSearch"},
           "trainingService": {"platform": "local"}}
    path = os.path.join(str(tmp_path), "exp.yml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def test_search_space_key_that_maps_nowhere_fails_before_nni_starts(tmp_path):
    path = _experiment(tmp_path, {"prune.params.kay": {"_type": "choice", "_value": [1.0]}}, 1)
    with pytest.raises(SearchError, match=r"search-space parameter\(s\) prune.params.kay"):
        load_experiment(path)
    bad = _experiment(tmp_path, {"prune.params.k": {"_type": "gaussian", "_value": [1.0]}}, 1)
    with pytest.raises(SearchError, match=r"searchSpace.prune.params.k._type 'gaussian' is not an NNI"):
        load_experiment(bad)


def _listening(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _nni_processes(experiment_id):
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if experiment_id in cmd:
                found.append(cmd)
    return found


def test_real_nni_experiment_runs_trials_reads_results_and_stops(tmp_path):
    """Three grid points: two good trials and one whose k is invalid; NNI runs all three, both good
    results come back, the failed one is listed, and no manager process survives."""
    space = {"prune.params.k": {"_type": "choice", "_value": [0.8, 1.2, -1.0]}}
    path = _experiment(tmp_path, space, 3)
    out = run_search(path, work_dir=str(tmp_path / "nni"), timeout=420, poll=1.0, quiet=True)
    assert out["status"] == "DONE"
    assert sorted(t["parameters"]["prune.params.k"] for t in out["trials"]) == [0.8, 1.2]
    for t in out["trials"]:
        assert set(t["result"]) >= {"default", "params", "macs"} and 0 <= t["result"]["default"] <= 1
    params = {t["parameters"]["prune.params.k"]: t["result"]["params"] for t in out["trials"]}
    assert params[1.2] < params[0.8]  # a wider band prunes more
    assert len(out["failed_trials"]) == 1
    assert not _listening(out["port"])
    assert _nni_processes(out["id"]) == []
