"""save_pruned/load_pruned cover every layer kind of the torchvision zoo; a bad file is a PrunedFileError only,
and the base model passed in is left exactly as it was."""

import json
import os
import pickle

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
import torchvision
from torchvision.ops.misc import SqueezeExcitation

from pfgdf_plugin import load_pruned, save_pruned
from pfgdf_plugin.persist import PrunedFileError
from pfgdf_plugin.torch_pruning import GaussianImportance

torch.set_num_threads(1)


class Scale(nn.Module):
    """A layer-scale parameter, as in ConvNeXt's blocks."""

    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        return x * self.gamma


class Zoo(nn.Module):
    """One of every layer kind torchvision's classifiers hold, ``c`` channels wide."""

    def __init__(self, c, removed=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 2 * c, 3, padding=1)
        self.bn = nn.BatchNorm2d(2 * c)
        self.grouped = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.gn = nn.GroupNorm(2, 2 * c)
        self.inorm = nn.InstanceNorm2d(2 * c, affine=True)
        self.se = SqueezeExcitation(2 * c, c)
        self.scale = Scale(2 * c)
        self.block = nn.Identity() if removed else nn.Sequential(nn.Conv2d(2 * c, 2 * c, 1), nn.ReLU())
        self.ln = nn.LayerNorm(2 * c)
        self.attn = nn.MultiheadAttention(2 * c, 2, batch_first=True)
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = self.inorm(self.gn(self.depthwise(self.grouped(self.bn(self.stem(x))))))
        x = self.block(self.scale(self.se(x)))
        t = self.ln(x.flatten(2).transpose(1, 2))
        t = t + self.attn(t, t, t, need_weights=False)[0]
        x = self.up(t.transpose(1, 2).reshape(x.shape))
        return self.fc(x.mean((2, 3)))


def _snapshot(model):
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}, model.training


def _unchanged(model, snap):
    text, state, training = snap
    now = model.state_dict()
    return (repr(model) == text and model.training == training and set(now) == set(state)
            and all(torch.equal(now[k], v) for k, v in state.items()))


def _randomised(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model.eval()


def test_every_layer_kind_round_trips(tmp_path):
    torch.manual_seed(0)
    small = _randomised(Zoo(3, removed=True))
    path = str(tmp_path / "zoo.pt")
    save_pruned(small, path)
    base = Zoo(6).train()
    loaded, meta = load_pruned(path, base)
    assert loaded is base and not loaded.training and isinstance(loaded.block, nn.Identity)
    assert meta["tensors"]["scale.gamma"] == [6, 1, 1] and meta["structure"]["ln"]["normalized_shape"] == [6]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


@pytest.fixture(scope="module")
def convnext(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(num_classes=10).eval()
    dense_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 3, 32, 32)
    pruner = tp.pruner.MetaPruner(model, x, importance=GaussianImportance(), pruning_ratio=0.3,
                                  ignored_layers=[model.classifier[-1]])
    pruner.step()
    path = str(tmp_path_factory.mktemp("convnext") / "convnext.pt")
    save_pruned(model, path)
    return model, path, dense_params


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pruned_convnext_round_trips_with_identical_outputs(convnext):
    pruned, path, dense_params = convnext
    loaded, _ = load_pruned(path, torchvision.models.convnext_tiny(num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in pruned.parameters()) < dense_params


def _edit(path, out, change):
    blob = torch.load(path, weights_only=True)
    meta = json.loads(blob["meta"])
    change(meta)
    blob["meta"] = json.dumps(meta)
    torch.save(blob, out)
    return out


def _pop(d, key):
    d.pop(key)


EDITS = {
    "wrong shape": lambda m: m["structure"]["stem"].update(out_channels=7),
    "missing key": lambda m: _pop(m["structure"]["grouped"], "groups"),
    "zero size": lambda m: m["structure"]["fc"].update(in_features=0),
    "negative size": lambda m: m["structure"]["bn"].update(num_features=-6),
    "string size": lambda m: m["structure"]["stem"].update(in_channels="3"),
    "float size": lambda m: m["structure"]["stem"].update(in_channels=3.0),
    "bool size": lambda m: m["structure"]["gn"].update(num_groups=True),
    "groups not dividing": lambda m: m["structure"]["grouped"].update(groups=4),
    "unknown type": lambda m: m["structure"]["ln"].update(type="rmsnorm"),
    "wrong layer type": lambda m: m["structure"]["ln"].update(type="conv", in_channels=6, out_channels=6, groups=1),
    "missing type": lambda m: _pop(m["structure"]["fc"], "type"),
    "no structure": lambda m: _pop(m, "structure"),
    "structure as list": lambda m: m.update(structure=[1, 2]),
    "entry as list": lambda m: m["structure"].update(fc=[6, 5]),
    "layer scale shape": lambda m: m["tensors"].update({"scale.gamma": [7, 1, 1]}),
    "layer scale huge": lambda m: m["tensors"].update({"scale.gamma": [10 ** 12, 1, 1]}),
    "tensor of no module": lambda m: m["tensors"].update({"nothing.here": [1]}),
    "tensors as string": lambda m: m.update(tensors="scale.gamma"),
    "normalized_shape": lambda m: m["structure"]["ln"].update(normalized_shape=[5]),
    "normalized_shape empty": lambda m: m["structure"]["ln"].update(normalized_shape=[]),
    "attention heads": lambda m: m["structure"]["attn"].update(num_heads=4),
    "identity of nothing": lambda m: m.update(identity=["no.such.block"]),
    "identity as string": lambda m: m.update(identity="block"),
    "identity removed": lambda m: m.update(identity=[]),
    "extra identity": lambda m: m.update(identity=["se"]),
    "format": lambda m: m.update(format="other/v9"),
    "block diagonal garbage": lambda m: m.update(block_diagonal={"format": "x", "modules": {"fc": {"type": 3}}}),
    "block diagonal huge": lambda m: m.update(block_diagonal={"modules": {"fc": {
        "type": "BlockDiagonalLinear", "in_features": 6, "out_sizes": [10 ** 6] * 3, "in_sizes": [10 ** 6],
        "bias": True, "scatter": True}}}),
    "arch garbage": lambda m: m.update(arch=["resnet20"]),
}


@pytest.fixture(scope="module")
def zoo_file(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("zoo") / "zoo.pt")
    save_pruned(_randomised(Zoo(3, removed=True)), path)
    return path


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_description_fails_with_pruned_file_error_and_leaves_the_base_untouched(edit, zoo_file, tmp_path):
    path = _edit(zoo_file, str(tmp_path / "edited.pt"), EDITS[edit])
    base = Zoo(6).train()
    snap = _snapshot(base)
    with pytest.raises(PrunedFileError, match="edited.pt"):
        load_pruned(path, base)
    assert _unchanged(base, snap)


def test_a_stored_architecture_that_cannot_be_built_is_a_pruned_file_error(zoo_file, tmp_path):
    for arch in ({"name": "resnet20", "width": "wide"}, {"name": 5}, {"name": "no_such_net"}, {"width": 1.0}):
        path = _edit(zoo_file, str(tmp_path / "arch.pt"), lambda m, a=arch: m.update(arch=a))
        with pytest.raises(PrunedFileError, match="arch.pt"):
            load_pruned(path)


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_a_truncated_file_fails_with_pruned_file_error_and_leaves_the_base_untouched(keep, zoo_file, tmp_path):
    data = open(zoo_file, "rb").read()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[:int(len(data) * keep)])
    base = Zoo(6)
    snap = _snapshot(base)
    with pytest.raises(PrunedFileError, match="cut.pt"):
        load_pruned(str(path), base)
    assert _unchanged(base, snap)


def test_a_pickle_with_code_fails_with_pruned_file_error_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    for payload in ({"meta": "{}", "state_dict": Evil()}, Evil()):
        path.write_bytes(pickle.dumps(payload))
        base = Zoo(6)
        snap = _snapshot(base)
        with pytest.raises(PrunedFileError, match="not a loadable pruned-model file"):
            load_pruned(str(path), base)
        assert _unchanged(base, snap) and not marker.exists()


def test_weights_of_another_type_are_a_pruned_file_error(zoo_file, tmp_path):
    blob = torch.load(zoo_file, weights_only=True)
    blob["state_dict"]["fc.weight"] = [[1.0]]
    torch.save(blob, str(tmp_path / "typed.pt"))
    base = Zoo(6)
    snap = _snapshot(base)
    with pytest.raises(PrunedFileError, match="must map names to tensors"):
        load_pruned(str(tmp_path / "typed.pt"), base)
    assert _unchanged(base, snap)


def test_mnasnet_round_trips_with_its_module_versions(tmp_path):
    """MNASNet refuses a state dict without its module versions; the file keeps them."""
    import torchvision

    from pfgdf_plugin import load_pruned, save_pruned

    torch.manual_seed(0)
    model = torchvision.models.mnasnet0_5(num_classes=10).eval()
    path = str(tmp_path / "mnas.pt")
    save_pruned(model, path)
    fresh = torchvision.models.mnasnet0_5(num_classes=10)
    loaded = load_pruned(path, fresh)[0].eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
