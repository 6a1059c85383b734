"""Hypothesis fuzzing of the surface: recipes, pruned-model files, pruner inputs (bounded, derandomized)."""

import dataclasses
import json
import typing

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pfgdf_plugin import load_pruned, save_pruned
from pfgdf_plugin.config import ConfigError
from pfgdf_plugin.errors import PFGDFError, PluginError
from pfgdf_plugin.persist import PrunedFileError
from pfgdf_plugin.recipe import Recipe, recipe_from_dict
from pfgdf_plugin.torch_pruning import GaussianImportance, PFGDFPruner
from pfgdf_plugin.torch_pruning._group import checked_pruner

torch.set_num_threads(1)
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# --------------------------------------------------------------------------- recipes

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 30, 10 ** 30), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(["pfgdf", "spp", "cpu", "digits", "lenet5", "sgd"]))
garbage = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                       max_leaves=8)


def _section_keys(cls):
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


SECTIONS = {name: tp_ for name, tp_ in _section_keys(Recipe).items()}


@st.composite
def recipe_dicts(draw):
    data = {}
    for key in draw(st.lists(st.sampled_from(sorted(SECTIONS) + ["bogus", "Model"]), max_size=5, unique=True)):
        tp_ = SECTIONS.get(key)
        if tp_ is not None and dataclasses.is_dataclass(tp_) and draw(st.booleans()):
            fields = sorted(_section_keys(tp_)) + ["unknown_knob"]
            data[key] = {k: draw(garbage) for k in draw(st.lists(st.sampled_from(fields), max_size=4, unique=True))}
        else:
            data[key] = draw(garbage)
    return data


@FUZZ
@given(recipe_dicts())
def test_random_recipe_dicts_give_a_recipe_or_a_config_error_listing_every_problem(data):
    try:
        recipe_from_dict(data)
    except ConfigError as e:
        assert e.errors and all(isinstance(m, str) and m for m in e.errors)
        for key, value in data.items():
            if key not in SECTIONS:
                assert any(f"unknown key '{key}'" in m for m in e.errors)
            elif isinstance(value, dict) and dataclasses.is_dataclass(SECTIONS[key]):
                for sub in value:
                    if sub not in _section_keys(SECTIONS[key]):
                        assert any(f"unknown key '{key}.{sub}'" in m for m in e.errors), (key, sub)


# --------------------------------------------------------------------------- pruned-model files


class Net(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.gamma = nn.Parameter(torch.ones(c, 1, 1))
        self.ln = nn.LayerNorm(c)
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = self.dw(self.bn(self.conv(x))) * self.gamma
        return self.fc(self.ln(x.mean((2, 3))))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "net.pt"
    torch.manual_seed(0)
    save_pruned(Net(3).eval(), str(path))
    return path


def _assert_only_pruned_file_error(path):
    base = Net(6).train()
    before = (repr(base), {k: v.clone() for k, v in base.state_dict().items()})
    try:
        load_pruned(str(path), base)
    except PrunedFileError:
        assert repr(base) == before[0] and base.training
        assert all(torch.equal(v, before[1][k]) for k, v in base.state_dict().items())


@FUZZ
@given(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6),
       st.floats(0.05, 1))
def test_random_byte_mutations_give_only_pruned_file_error(saved, tmp_path, edits, keep):
    whole = saved.read_bytes()
    data = bytearray(whole[:max(1, int(len(whole) * keep))])
    for where, byte in edits:
        data[int(where * len(data))] = byte
    path = tmp_path / "mutated.pt"
    path.write_bytes(bytes(data))
    _assert_only_pruned_file_error(path)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@FUZZ
@given(st.data())
def test_random_description_mutations_give_only_pruned_file_error(saved, tmp_path, data):
    blob = torch.load(str(saved), weights_only=True)
    meta = json.loads(blob["meta"])
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from([p for p in _paths(meta) if p]))
        node = meta
        for k in where[:-1]:
            node = node[k]
        if data.draw(st.booleans()) and isinstance(node, dict):
            del node[where[-1]]
        else:
            node[where[-1]] = data.draw(garbage)
    blob["meta"] = json.dumps(meta)
    path = tmp_path / "mutated.pt"
    torch.save(blob, str(path))
    _assert_only_pruned_file_error(path)


# --------------------------------------------------------------------------- pruner inputs

def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


inputs = st.one_of(
    st.builds(lambda c, s: torch.randn(1, c, s, s), st.integers(1, 5), st.integers(1, 9)),
    st.builds(lambda n: torch.randn(n), st.integers(0, 4)),
    st.builds(lambda c, s: torch.zeros(1, c, s, s, dtype=torch.long), st.integers(3, 3), st.integers(4, 8)),
    st.tuples(), st.none(), st.text(max_size=4), st.integers(), st.lists(st.integers(), max_size=2),
)
ignored = st.one_of(st.none(), st.text(max_size=4), st.lists(st.one_of(st.integers(0, 7), st.text(max_size=3),
                                                                     st.just("foreign"), st.just("own")), max_size=3))


def _ignored(model, spec):
    if not isinstance(spec, list):
        return spec
    return [model[v] if isinstance(v, int) else nn.Linear(8, 4) if v == "foreign" else
            model[-1] if v == "own" else v for v in spec]


@FUZZ
@given(inputs, ignored, st.booleans())
def test_random_pruner_inputs_give_a_plugin_error_and_leave_the_model_as_it_was(x, spec, training):
    for build in (lambda m, x, ign: checked_pruner(tp.pruner.MetaPruner, m, x, error=PFGDFError,
                                                   importance=GaussianImportance(), pruning_ratio=0.3,
                                                   ignored_layers=ign),
                  lambda m, x, ign: checked_pruner(PFGDFPruner, m, x, error=PFGDFError, ignored_layers=ign)):
        model = _model().train(training)
        modes = [m.training for m in model.modules()]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            build(model, x, _ignored(model, spec))
        except PluginError as e:
            assert isinstance(e, PFGDFError) and str(e)
        assert [m.training for m in model.modules()] == modes
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
