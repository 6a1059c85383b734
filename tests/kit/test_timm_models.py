"""timm models (model.name: timm/NAME): built through the model registry, timm's pretrained weights read offline
from a temporary Hugging Face cache laid out as timm expects, pruned by PFGDF, saved and reloaded."""

import copy
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

import torch_pruning as tp  # noqa: E402

from pfgdf_plugin import GaussianImportance, PFGDFPruner, load_pruned, save_pruned  # noqa: E402
from pfgdf_plugin.errors import ConfigError, DataNotFoundError, UnknownNameError  # noqa: E402
from pfgdf_plugin.methods.dbp import find_blocks  # noqa: E402
from pfgdf_plugin.models import build_model, build_pretrained  # noqa: E402
from pfgdf_plugin.timm_models import hub_cache_dir, sync_widths_, timm_weights_file  # noqa: E402
from pfgdf_plugin.weights import load_weights  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMIT = "3f1c0de5a9b2c4d6e8f0a1b3c5d7e9f1a2b4c6d8"
REPO = "models--timm--resnet10t.c3_in1k"  # timm's default pretrained tag of resnet10t


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models: one thread is faster than two on a shared 2-core CPU; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty HF_HOME (and TORCH_HOME); any download attempt, by timm or torch.hub, fails the test."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args} {kwargs}")

    from timm.models import _builder, _hub

    monkeypatch.setitem(_hub.load_state_dict_from_hf.__globals__, "hf_hub_download", no_download)
    monkeypatch.setitem(_builder.load_pretrained.__globals__, "download_cached_file", no_download)
    monkeypatch.setitem(_builder.load_pretrained.__globals__, "load_state_dict_from_url", no_download)
    monkeypatch.setitem(torch.hub.load_state_dict_from_url.__globals__, "download_url_to_file", no_download)
    return tmp_path / "hf"


def _reference():
    """resnet10t's 1000-class state dict, shifted away from a fresh initialisation."""
    torch.manual_seed(11)
    state = timm.create_model("resnet10t", pretrained=False).state_dict()
    return {k: (v + 0.5 if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def _cache(hf_home, filename="model.safetensors", state=None):
    """Put ``state`` where timm's pretrained=True reads it: hub/<repo>/snapshots/<commit>/<file>, refs/main."""
    state = _reference() if state is None else state
    snapshot = hf_home / "hub" / REPO / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (hf_home / "hub" / REPO / "refs").mkdir()
    (hf_home / "hub" / REPO / "refs" / "main").write_text(COMMIT)
    if filename.endswith(".safetensors"):
        safetensors_torch.save_file(state, str(snapshot / filename))
    else:
        torch.save(state, snapshot / filename)
    return state


def _assert_loaded(model, reference, skip=()):
    loaded = model.state_dict()
    for key, value in reference.items():
        if not key.startswith(skip):
            assert torch.equal(loaded[key], value), key


# --------------------------------------------------------------------------- building by name


def test_timm_names_build_through_the_model_registry():
    model = build_model("timm/resnet10t", num_classes=7, in_channels=1, image_size=32)
    assert isinstance(model, timm.models.ResNet)
    assert model.fc.out_features == 7 and model.conv1[0].in_channels == 1
    assert model.eval()(torch.zeros(2, 1, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name, error, match", [
    ("timm/resnet10x", UnknownNameError, r"unknown timm model 'resnet10x'; similar: .*resnet10t"),
    ("timm/resnet10t.bogus_tag", UnknownNameError, r"no pretrained tag 'bogus_tag'; known: c3_in1k"),
    ("timm/hf-hub:timm/resnet10t", UnknownNameError, r"hub and local-folder models are not loaded"),
])
def test_bad_timm_names_are_named(name, error, match):
    with pytest.raises(error, match=match):
        build_model(name, num_classes=10)


def test_width_and_weight_fetching_arguments_are_refused():
    with pytest.raises(ValueError, match=r"width must be 1.0 for timm model 'timm/resnet10t', got 0.5"):
        build_model("timm/resnet10t", width=0.5)
    with pytest.raises(TypeError, match="pretrained not accepted; starting weights come from model.weights"):
        build_model("timm/resnet10t", pretrained=True)


def test_without_timm_the_error_says_how_to_install_it_and_nothing_imports_timm_early():
    """timm blocked as if not installed: the package and its layers import, timm/NAME names the extra."""
    code = textwrap.dedent("""
        import sys, traceback
        attempts = []
        class NoTimm:
            def find_spec(self, name, path=None, target=None):
                if name == "timm" or name.startswith("timm."):
                    frames = [f.filename for f in traceback.extract_stack()[:-1] if not f.filename.startswith("<")]
                    attempts.append(frames[-1])  # the module whose import statement asked for timm
                    raise ImportError("No module named 'timm'")
        sys.meta_path.insert(0, NoTimm())
        import pfgdf_plugin, pfgdf_plugin.models, pfgdf_plugin.recipe, pfgdf_plugin.runner, pfgdf_plugin.cli
        assert attempts and not [f for f in attempts if "pfgdf_plugin" in f], attempts  # Torch-Pruning tries it
        from pfgdf_plugin.models import build_model
        from pfgdf_plugin.recipe import recipe_from_dict
        assert build_model("resnet20")
        for call in (lambda: build_model("timm/resnet10t"),
                     lambda: recipe_from_dict({"model": {"name": "timm/resnet10t"}, "data": {"name": "digits"}})):
            try:
                call()
            except (KeyError, ValueError) as e:
                print(type(e).__name__, str(e))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == ("UnknownNameError model 'timm/resnet10t' needs timm, which is not installed: "
                        "pip install 'pfgdf-plugin[timm]'")
    assert lines[1].startswith("ConfigError recipe: model.name: model 'timm/resnet10t' needs timm") and \
        "pip install 'pfgdf-plugin[timm]'" in lines[1]


# --------------------------------------------------------------------------- pretrained weights, offline


def test_hub_cache_follows_the_environment_at_call_time(hf_home):
    assert hub_cache_dir() == str(hf_home / "hub")
    assert hub_cache_dir({"HF_HUB_CACHE": "/a", "HF_HOME": "/b"}) == "/a"
    assert hub_cache_dir({"XDG_CACHE_HOME": "/c"}) == os.path.join("/c", "huggingface", "hub")


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_default_weights_load_exactly_the_cached_tensors(hf_home, filename):
    reference = _cache(hf_home, filename)
    path = hf_home / "hub" / REPO / "snapshots" / COMMIT / filename
    assert timm_weights_file("timm/resnet10t") == str(path)
    model, notes = build_pretrained("timm/resnet10t", "DEFAULT", num_classes=1000)
    assert notes == []
    assert model.state_dict().keys() == reference.keys()
    _assert_loaded(model, reference)
    # the tag spelt out in the name reads the same file
    again, _ = build_pretrained("timm/resnet10t.c3_in1k", "DEFAULT", num_classes=1000)
    assert torch.equal(again.fc.weight, reference["fc.weight"])


def test_head_replaced_for_ten_classes_is_logged_backbone_kept(hf_home, caplog):
    reference = _cache(hf_home)
    with caplog.at_level(logging.INFO, logger="pfgdf_plugin.models"):
        model = build_model("timm/resnet10t", num_classes=10, weights="DEFAULT")
    notes = [r.getMessage() for r in caplog.records if r.name == "pfgdf_plugin.models"]
    assert len(notes) == 1 and "classifier head fc replaced (1000 classes in the file, 10 for the data)" in notes[0]
    assert str(hf_home / "hub" / REPO) in notes[0]
    assert model.fc.weight.shape == (10, 512) and not torch.equal(model.fc.weight, reference["fc.weight"][:10])
    _assert_loaded(model, reference, skip=("fc.",))


def test_one_channel_data_gets_the_first_conv_adapted_by_timm(hf_home):
    reference = _cache(hf_home)
    model, notes = build_pretrained("timm/resnet10t", "DEFAULT", num_classes=10, in_channels=1)
    assert any("first convolution conv1.0 adapted by timm from 3 to 1 input channel(s)" in n for n in notes)
    # timm's adapt_input_conv sums a 3-channel filter into one channel
    assert torch.allclose(model.conv1[0].weight, reference["conv1.0.weight"].sum(1, keepdim=True))
    _assert_loaded(model, reference, skip=("fc.", "conv1.0."))


def test_missing_cache_file_is_one_line_naming_the_path(hf_home):
    with pytest.raises(DataNotFoundError) as info:
        build_pretrained("timm/resnet10t", "DEFAULT", num_classes=10)
    message = str(info.value)
    folder = os.path.join(str(hf_home), "hub", REPO)
    assert "\n" not in message
    assert (f"put model.safetensors (or pytorch_model.bin) into {os.path.join(folder, 'snapshots', '<commit>')}"
            f"{os.sep} with the commit id in {os.path.join(folder, 'refs', 'main')}") in message
    assert "hf download timm/resnet10t.c3_in1k" in message
    assert not os.path.exists(folder)


def test_timm_old_torch_hub_cache_is_read_too(hf_home, tmp_path):
    reference = _reference()
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(reference, folder / "resnet10t_176_c3-f3215ab1.pth")  # the file name of timm's url
    model, _ = build_pretrained("timm/resnet10t", "DEFAULT", num_classes=1000)
    _assert_loaded(model, reference)


def test_a_cached_file_that_does_not_fit_names_the_file(hf_home):
    state = _reference()
    del state["layer1.0.conv1.weight"]
    _cache(hf_home, state=state)
    # timm loads non-strictly when the head is replaced, and only logs a missing layer: it is an error here
    with pytest.raises(ConfigError, match=r"model.weights DEFAULT \(.*model.safetensors\) does not fit timm model "
                                          r"'timm/resnet10t': missing keys: layer1.0.conv1.weight; is it a file"):
        build_pretrained("timm/resnet10t", "DEFAULT", num_classes=10)
    # with the file's class count timm loads strictly
    with pytest.raises(ConfigError, match=r"cannot be loaded into timm model 'timm/resnet10t' \(RuntimeError: "
                                          r".*replace the file"):
        build_pretrained("timm/resnet10t", "DEFAULT", num_classes=1000)
    # an extra tensor in the file is named too
    for f in (hf_home / "hub").rglob("model.safetensors"):
        safetensors_torch.save_file({**_reference(), "extra.weight": torch.zeros(2)}, str(f))
    with pytest.raises(ConfigError, match=r"does not fit timm model 'timm/resnet10t': unexpected keys: extra.weight"):
        build_pretrained("timm/resnet10t", "DEFAULT", num_classes=10)


def test_other_weights_names_and_state_dict_files(hf_home, tmp_path):
    with pytest.raises(ConfigError, match="timm models take DEFAULT"):
        build_pretrained("timm/resnet10t", "IMAGENET1K_V1", num_classes=10)
    with pytest.raises(ValueError, match=r"width must be 1.0 for timm model 'timm/resnet10t', got 0.5"):
        build_pretrained("timm/resnet10t", "DEFAULT", num_classes=10, width=0.5)
    with pytest.raises(ConfigError, match=r"use pfgdf_plugin.models.build_pretrained\('timm/resnet10t'"):
        load_weights(build_model("timm/resnet10t"), "timm/resnet10t", "DEFAULT")
    # a state_dict file works for timm models as for any other (the head kept as built for 10 classes)
    path = tmp_path / "w.pt"
    reference = _reference()
    torch.save(reference, path)
    model, notes = build_pretrained("timm/resnet10t", str(path), num_classes=10)
    assert "classifier head fc replaced" in notes[0]
    _assert_loaded(model, reference, skip=("fc.",))


# --------------------------------------------------------------------------- pruning and persistence


def _prune(model, how, x):
    head = model.get_classifier()
    if how == "gaussian":
        imp = GaussianImportance()
        pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=0.5, ignored_layers=[head])
        unscored = [g[0].dep for g in pruner.DG.get_all_groups(ignored_layers=[head],
                                                                 root_module_types=pruner.root_module_types)
                    if imp(g) is None]
        assert unscored == []  # every group of timm's layers is scored (BatchNormAct2d, SE, depthwise, ...)
    else:
        pruner = PFGDFPruner(model, x, ignored_layers=[head])
    pruner.step()
    return model.eval()


@pytest.mark.parametrize("how", ["gaussian", "pfgdf"])
@pytest.mark.parametrize("name", ["resnet10t", "efficientnet_b0"])
def test_timm_models_prune_run_and_round_trip(name, how, tmp_path):
    torch.manual_seed(0)
    model = build_model(f"timm/{name}", num_classes=10, in_channels=3).eval()
    x = torch.randn(2, 3, 32, 32)
    before = sum(p.numel() for p in model.parameters())
    pruned = _prune(copy.deepcopy(model), how, x)
    after = sum(p.numel() for p in pruned.parameters())
    assert after < 0.6 * before
    with torch.no_grad():
        y = pruned(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    if name == "efficientnet_b0":  # timm's fused norm+activation layers were pruned with their convolutions
        norms = [m for m in pruned.modules() if type(m).__name__ == "BatchNormAct2d"]
        assert norms and all(m.num_features == m.weight.numel() for m in norms)
    path = str(tmp_path / "pruned.pt")
    save_pruned(pruned, path, arch={"name": f"timm/{name}", "num_classes": 10, "in_channels": 3})
    for reloaded in (load_pruned(path)[0], load_pruned(path, build_model(f"timm/{name}", num_classes=10))[0]):
        assert type(reloaded) is type(pruned)
        with torch.no_grad():
            assert torch.equal(reloaded(x), y)
        assert sum(p.numel() for p in reloaded.parameters()) == after
    # timm's width attributes follow the pruned layers, so a new head fits
    assert pruned.num_features != pruned.get_classifier().in_features
    assert sync_widths_(pruned) and pruned.num_features == pruned.get_classifier().in_features
    pruned.reset_classifier(3)
    assert pruned.eval()(x).shape == (2, 3)


def test_dbp_finds_timm_residual_blocks():
    resnet = build_model("timm/resnet10t", num_classes=10).eval()
    blocks = find_blocks(resnet, torch.randn(1, 3, 32, 32))
    assert [(b.name, b.kind) for b in blocks] == [("layer1.0", "residual")]  # the others downsample
    effnet = build_model("timm/efficientnet_b0", num_classes=10).eval()
    names = {b.name for b in find_blocks(effnet, torch.randn(1, 3, 32, 32)) if b.kind == "residual"}
    skips = {n for n, m in effnet.named_modules() if getattr(m, "has_skip", False)}
    assert names == skips and len(names) >= 8


# --------------------------------------------------------------------------- recipes


def test_the_timm_recipe_validates_from_the_command_line(capsys):
    from pfgdf_plugin.cli import main

    recipe = os.path.join(ROOT, "recipes", "pfgdf_timm_resnet10t.yaml")
    assert main(["validate", recipe, "--set", "model.weights=DEFAULT"]) == 0
    assert capsys.readouterr().out.strip().endswith("pfgdf_timm_resnet10t.yaml: ok")
    assert main(["validate", recipe, "--set", "model.width=0.5", "--set", "model.weights=IMAGENET1K_V1"]) == 2
    err = capsys.readouterr().err
    assert "model.width must be 1.0 for timm model 'timm/resnet10t', got 0.5" in err
    assert "model.weights 'IMAGENET1K_V1': timm models take DEFAULT" in err


def test_a_recipe_model_section_with_default_weights_builds_offline(hf_home):
    from types import SimpleNamespace

    from pfgdf_plugin.recipe import recipe_from_dict
    from pfgdf_plugin.runner.steps import Data, new_model

    reference = _cache(hf_home)
    recipe = recipe_from_dict({"model": {"name": "timm/resnet10t", "weights": "DEFAULT"}, "data": {"name": "digits"}})
    spec = SimpleNamespace(num_classes=10, in_channels=1, image_size=16)
    notes = []
    model = new_model(recipe.model, Data(spec, None, None, torch.zeros(1, 1, 16, 16)), log=notes.append)
    assert [n.split(": ", 1)[1].split(" (")[0] for n in notes] == [
        "classifier head fc replaced", "first convolution conv1.0 adapted by timm from 3 to 1 input channel(s)"]
    _assert_loaded(model, reference, skip=("fc.", "conv1.0."))
