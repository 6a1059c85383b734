"""Every method's pruned model saves as a state dict plus JSON and reloads with weights_only=True."""

import json
import os
import pickle

import pytest
import torch

from pfgdf_plugin import load_pruned, save_pruned
from pfgdf_plugin.data import build_dataset, make_loaders
from pfgdf_plugin.models import build_model
from pfgdf_plugin.persist import PrunedFileError
from pfgdf_plugin.pruning import PruneContext, prune
from pfgdf_plugin.train import TrainConfig

torch.set_num_threads(1)

CASES = [
    ("vgg16_bn", "pfgdf", "torch_pruning", {}, None),
    ("resnet20", "pfgdf", "nni", {}, None),
    ("resnet20", "spp", "torch_pruning", {"A": 0.5, "interval": 1, "max_epochs": 5.0}, 0.5),
    ("vgg16_bn", "dbp", "torch_pruning", {"blocks": 3, "num_batches": 2}, None),
    ("resnet20", "dbp", "nni", {"blocks": 2, "num_batches": 2}, None),
    ("lenet300", "mpd", "torch_pruning", {"compression": 10.0, "max_epochs": 0.25}, None),
    ("vgg16_bn", "mpd", "torch_pruning", {"compression": 4.0, "max_epochs": 0.0}, None),
    ("resnet20", "mpd", "nni", {"compression": 2.0, "max_epochs": 0.25}, None),
]


@pytest.fixture(scope="module")
def data():
    spec = build_dataset("digits", image_size=32, limit_train=256, limit_test=64)
    train, test = make_loaders(spec, 64)
    return spec, train, next(iter(test))[0]


@pytest.mark.parametrize("name,method,framework,params,ratio", CASES,
                         ids=[f"{c[1]}-{c[2]}-{c[0]}" for c in CASES])
def test_round_trip_gives_identical_outputs(name, method, framework, params, ratio, data, tmp_path):
    spec, train_loader, x = data
    arch = {"name": name, "width": 0.25, "num_classes": spec.num_classes, "in_channels": spec.in_channels}
    torch.manual_seed(0)
    dense = build_model(**{**arch, "name": name})
    ctx = PruneContext(train_loader=train_loader, train_cfg=TrainConfig(epochs=1, lr=0.01))
    pruned = prune(dense, x[:1], method, framework, params, ratio, ctx=ctx).model.eval()
    path = str(tmp_path / "m.pt")
    save_pruned(pruned, path, arch=arch)

    blob = torch.load(path, weights_only=True)  # no code in the file
    assert set(blob) == {"meta", "state_dict"}
    loaded, meta = load_pruned(path)  # the architecture comes from the file
    assert meta["arch"] == arch
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in dense.parameters())


def _pruned_file(tmp_path, method="dbp", params=None):
    spec = build_dataset("digits", image_size=32, limit_train=128, limit_test=64)
    train_loader, test_loader = make_loaders(spec, 64)
    arch = {"name": "vgg16_bn", "width": 0.25, "num_classes": 10, "in_channels": spec.in_channels}
    model = build_model(**arch)
    x = next(iter(test_loader))[0][:1]
    ctx = PruneContext(train_loader=train_loader)
    pruned = prune(model, x, method, "torch_pruning", params or {"blocks": 2, "num_batches": 1}, ctx=ctx).model
    path = str(tmp_path / "m.pt")
    save_pruned(pruned, path, arch=arch)
    return path, arch


def test_removed_block_that_the_base_lacks_is_a_clear_error(tmp_path):
    path, _ = _pruned_file(tmp_path)
    with pytest.raises(PrunedFileError, match=r"removed block 'features\.\d+' does not exist in CifarResNet"):
        load_pruned(path, build_model("resnet20", width=0.25, in_channels=3))


def test_tampered_block_diagonal_description_is_a_clear_error(tmp_path):
    path, _ = _pruned_file(tmp_path, "mpd", {"compression": 4.0, "max_epochs": 0.0})
    blob = torch.load(path, weights_only=True)
    meta = json.loads(blob["meta"])
    layer = next(iter(meta["block_diagonal"]["modules"]))
    meta["block_diagonal"]["modules"][layer]["out_sizes"][0] += 1  # the weights no longer fit
    blob["meta"] = json.dumps(meta)
    torch.save(blob, path)
    with pytest.raises(PrunedFileError, match="weights do not fit|block-diagonal layers do not fit"):
        load_pruned(path)


def test_a_file_with_pickled_code_is_refused(tmp_path):
    path = str(tmp_path / "evil.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(path, "wb") as f:
        pickle.dump({"meta": "{}", "state_dict": Evil()}, f)
    with pytest.raises(PrunedFileError, match="not a loadable pruned-model file"):
        load_pruned(path, build_model("lenet5"))
