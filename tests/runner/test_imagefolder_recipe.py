"""The ImageNet-style recipe runs end to end on a tiny ImageFolder tree at 224x224."""

from __future__ import annotations

import os

import pytest

from pfgdf_plugin.data import DataNotFoundError
from pfgdf_plugin.recipe import load_recipe
from pfgdf_plugin.runner import run_recipe
from pfgdf_plugin.tracking import read_curves

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "recipes", "pfgdf_resnet50_imagefolder.yaml")
# a smaller network and one short epoch per phase; the data pipeline stays the recipe's (224, workers)
TINY = ["model.name=resnet18", "train.epochs=1", "finetune.epochs=1", "data.batch_size=4", "report.repeats=1",
        "report.warmup=0", "report.batch_sizes=[1]", "export.onnx=false", "progress=false"]


def _tree(root, per_class=(2, 1)):
    """3 classes of 224x224 JPEGs: a few for train/, fewer for val/."""
    from PIL import Image

    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    for split, n in zip(("train", "val"), per_class):
        for c, colour in enumerate(colours):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (224, 224), color=tuple(v + 20 * i for v in colour)).save(folder / f"{i}.jpg")


def test_recipe_header_says_what_to_provide():
    with open(RECIPE) as f:
        header = [line for line in f if line.startswith("#")]
    text = "".join(header)
    assert header[0].startswith("# pfgdf-plugin run recipes/pfgdf_resnet50_imagefolder.yaml --set data.root=")
    assert "train/<class>" in text and "val/<class>" in text and "model.checkpoint" in text
    r = load_recipe(RECIPE)
    assert (r.model.name, r.data.name, r.data.image_size, r.prune.method) == ("resnet50", "imagefolder", 224, "pfgdf")
    assert r.data.workers > 0


def test_imagefolder_recipe_end_to_end(tmp_path):
    _tree(tmp_path / "images")
    recipe = load_recipe(RECIPE, TINY + [f"data.root={tmp_path / 'images'}", f"output_dir={tmp_path / 'runs'}"])
    metrics = run_recipe(recipe, quiet=True)
    out = metrics["run_dir"]
    assert metrics["data"].startswith("imagefolder (6 train / 3 test, (3, 224, 224))")
    assert metrics["after"]["params"] < metrics["before"]["params"]
    assert metrics["after"]["filters"] < metrics["before"]["filters"]
    for f in ("metrics.json", "report.md", "pruned.pt", "curves.csv"):
        assert os.path.exists(os.path.join(out, f)), f
    assert [r["phase"] for r in read_curves(os.path.join(out, "curves.csv"))] == ["train", "fine-tune"]


def test_imagefolder_without_train_and_val_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "images" / "photos").mkdir(parents=True)
    recipe = load_recipe(RECIPE, TINY + [f"data.root={tmp_path / 'images'}", f"output_dir={tmp_path / 'runs'}"])
    with pytest.raises(DataNotFoundError, match=r"no train/ and val/ under .*found: photos/.*train/<class>/<image>"):
        run_recipe(recipe, quiet=True)
    from pfgdf_plugin.cli import main  # the command line in this process: one line, exit code 2

    capsys.readouterr()
    assert main(["run", RECIPE, "--set", f"data.root={tmp_path}", "--set", f"output_dir={tmp_path / 'runs'}",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "val/<class>/<image>" in err, err
