"""Property-based robustness tests: every importance and pruner of the plugin on random small CNNs.

A hypothesis strategy draws small CNN specifications (1-4 stages of plain, residual, grouped or
depthwise convolutions, with or without BatchNorm, optional pooling, a global-pool or flatten
head and a Linear classifier) and weights that include edge cases: layers with a single channel,
layers whose filters are all equal (sigma = 0) and, occasionally, a NaN weight. Each importance
and pruner either returns a model that runs on the example input with the output shape it had
and no more parameters (and, where cheap to check, computes what the masked model computed), or
raises the plugin's documented error: ``PFGDFError`` naming the layer for NaN weights (PFGDF),
``ValueError`` for NaN norms (SPP), ``DBPError`` (DBP: no removable block, an unreachable
target, a single class, NaN weights naming the layer; the model is then unchanged) and
``MPDError`` naming the layer (MPDCompress: more blocks than a layer has channels, a grouped
convolution named or configured, NaN weights). The expected error is predicted from the
specification, so a documented error nobody expected fails the test too. Any other exception
fails the test.

DBP's properties also check that removed blocks became ``nn.Identity`` and that the model still
deep-copies and traces with ``torch.fx``; MPD's that the converted model computes what the
masked model computed (float64), keeps its masked weights at zero through SGD steps with
momentum and weight decay, and holds no more parameters than the dense one.

Every property also asserts that a sizable share of its examples really removed channels, so a
strategy that stops exercising the pruners fails instead of passing vacuously.
"""

from __future__ import annotations

import collections
import copy
import math
import re
import traceback
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pfgdf_plugin import (DBPPruner, DiscriminationImportance, GaussianImportance, MPDPruner, PFGDFError,
                          PFGDFPruner, SPPImportance, SPPPruner)
from pfgdf_plugin.methods.dbp import DBPError, find_blocks
from pfgdf_plugin.methods.mpd import MPDError
from pfgdf_plugin.modules import BlockDiagonalLinear, PermutedGroupConv2d

# The plugin's documented errors: PFGDFError (NaN/Inf weights; a ValueError subclass) and
# ValueError naming a bad value (SPP's NaN norms, bad parameters). A ValueError counts only when
# the plugin raised it itself (see _raised_by_plugin), not when it surfaced from torch.
PLUGIN_ERRORS = (PFGDFError, ValueError)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small convolutions run far faster on one thread when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _settings(n: int):
    # derandomize: the same examples on every run, so the suite is reproducible and its time bounded.
    # too_slow: building and tracing a model per example is slow by nature, not a strategy problem.
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- model specifications

KINDS = ("plain", "residual", "grouped", "depthwise")
# Edge cases now and then. Hypothesis favours the ends of a range, so the rare values sit inside it.
INITS = st.integers(0, 19).map(lambda i: {7: "nan", 13: "constant"}.get(i, "random"))
CLASSES = st.integers(0, 9).map(lambda i: 1 if i == 5 else 2 + i % 4)  # a one-class head now and then


@dataclass(frozen=True)
class Stage:
    kind: str
    c_in: int
    c_out: int
    kernel: int
    stride: int
    bn: bool
    groups: int = 1  # grouped: groups of the first conv; depthwise: channel multiplier
    pool: Optional[str] = None
    init: str = "random"  # of the stage's first conv: random | constant (sigma = 0) | nan

    @property
    def misread(self) -> bool:
        """A grouped conv Torch-Pruning 1.6 mistakes for a depthwise one (groups == out < in).

        The plugin's criteria leave its dependency group unpruned (``_group.misread_grouped_conv``).
        """
        return self.kind == "grouped" and self.groups == self.c_out < self.c_in

    @property
    def first_out(self) -> int:
        return self.c_in * self.groups if self.kind == "depthwise" else self.c_out


@dataclass(frozen=True)
class Spec:
    in_ch: int
    size: Tuple[int, int]
    stages: Tuple[Stage, ...]
    head: str  # "gap" (global average pool) or "flatten"
    classes: int
    seed: int

    @property
    def out_size(self) -> Tuple[int, int]:
        h, w = self.size
        for s in self.stages:
            h, w = (h - 1) // s.stride + 1, (w - 1) // s.stride + 1
            if s.pool:
                h, w = h // 2, w // 2
        return h, w

    @property
    def nan_stage(self) -> Optional[int]:
        return next((i for i, s in enumerate(self.stages) if s.init == "nan"), None)


def _divisors_above_one(a: int, b: int) -> List[int]:
    g = math.gcd(a, b)
    return [d for d in range(2, g + 1) if g % d == 0]


@st.composite
def specs(draw, keep_width: bool = False) -> Spec:
    """Random model specifications; ``keep_width`` makes about half the stages keep their input's
    width at stride 1 (DBP removes only such shape-preserving units)."""
    in_ch = draw(st.integers(1, 3))
    size = (draw(st.integers(8, 16)), draw(st.integers(8, 16)))
    h, w = size
    stages: List[Stage] = []
    c = in_ch
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(KINDS))
        c_out = draw(st.integers(1, 12))
        kernel, stride = draw(st.sampled_from((1, 3))), draw(st.sampled_from((1, 2)))
        if keep_width and draw(st.booleans()):
            c_out, stride = c, 1
        bn = draw(st.booleans())
        groups = 1
        if kind == "grouped":
            options = _divisors_above_one(c, c_out)
            if options:
                groups = draw(st.sampled_from(options))
            else:
                kind = "plain"
        elif kind == "depthwise":
            groups = draw(st.sampled_from((1, 2)))  # channel multiplier
        if not stages and c == c_out == groups and kind == "grouped":
            kind, groups = "plain", 1  # see the first-stage note in _stage_module
        if not stages and kind == "depthwise":
            groups = 2
        h, w = (h - 1) // stride + 1, (w - 1) // stride + 1
        pool = draw(st.sampled_from((None, None, "max", "avg"))) if min(h, w) >= 2 else None
        if pool:
            h, w = h // 2, w // 2
        init = draw(INITS)
        stage = Stage(kind, c, c_out, kernel, stride, bn, groups, pool, init)
        if init == "nan" and (stage.first_out < 2 or stage.misread or any(s.init == "nan" for s in stages)):
            # one NaN layer at most, with >= 2 filters, in a layer the criteria score (see Stage.misread)
            stage = replace(stage, init="random")
        stages.append(stage)
        c = c_out
    head = draw(st.sampled_from(("gap", "flatten")))
    return Spec(in_ch, size, tuple(stages), head, draw(CLASSES), draw(st.integers(0, 2**16)))


def _conv(c_in, c_out, k, stride=1, groups=1, bias=True):
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=bias)


def _post(c: int, bn: bool) -> List[nn.Module]:
    return ([nn.BatchNorm2d(c)] if bn else []) + [nn.ReLU()]


class Residual(nn.Module):
    def __init__(self, body: nn.Module, short: nn.Module):
        super().__init__()
        self.body, self.short, self.act = body, short, nn.ReLU()

    def forward(self, x):
        return self.act(self.body(x) + self.short(x))


def _stage_module(s: Stage, first_stage: bool) -> Tuple[nn.Module, nn.Conv2d]:
    """The stage as a module, and its first convolution (where ``s.init`` applies).

    The first stage never couples its channels to the raw network input. Torch-Pruning 1.6's
    dependency graph has no node for the input tensor, so nothing pins those channels, and it
    prunes them anyway: with an identity shortcut that adds the input, the body's last convolution
    and the consumers of the sum lose channels the input still has (``mat1 and mat2 shapes cannot
    be multiplied``); with a depthwise convolution (``groups == in == out``) reading the input,
    its input channels go with its filters (``expected input[4, 2, 8, 8] to have 1 channels``).
    ``MagnitudeImportance`` fails the same way, so it is the framework, not the plugin; real
    networks start with a stem convolution. (A depthwise convolution with multiplier 2 is a
    grouped convolution to Torch-Pruning and is kept in the first stage.)
    """
    if s.kind == "residual":
        first = _conv(s.c_in, s.c_out, s.kernel, s.stride, bias=not s.bn)
        body = nn.Sequential(first, *_post(s.c_out, s.bn), _conv(s.c_out, s.c_out, s.kernel, bias=not s.bn),
                             *([nn.BatchNorm2d(s.c_out)] if s.bn else []))
        if s.c_in == s.c_out and s.stride == 1 and not first_stage:
            short: nn.Module = nn.Identity()
        else:
            short = nn.Sequential(_conv(s.c_in, s.c_out, 1, s.stride, bias=not s.bn),
                                  *([nn.BatchNorm2d(s.c_out)] if s.bn else []))
        layers: List[nn.Module] = [Residual(body, short)]
    elif s.kind == "depthwise":
        first = _conv(s.c_in, s.first_out, s.kernel, s.stride, groups=s.c_in)
        layers = [first, *_post(s.first_out, s.bn), _conv(s.first_out, s.c_out, 1), *_post(s.c_out, s.bn)]
    else:
        first = _conv(s.c_in, s.c_out, s.kernel, s.stride, groups=s.groups)
        layers = [first, *_post(s.c_out, s.bn)]
    if s.pool == "max":
        layers.append(nn.MaxPool2d(2))
    elif s.pool == "avg":
        layers.append(nn.AvgPool2d(2))
    return nn.Sequential(*layers), first


class Net(nn.Module):
    """A CNN built from a :class:`Spec`; its forward uses modules and plain tensor ops only (fx-traceable)."""

    def __init__(self, spec: Spec):
        super().__init__()
        built = [_stage_module(s, i == 0) for i, s in enumerate(spec.stages)]
        self.stages = nn.ModuleList(m for m, _ in built)
        self.firsts = [f for _, f in built]  # plain list: not registered twice
        c = spec.stages[-1].c_out
        if spec.head == "gap":
            self.pool: nn.Module = nn.AdaptiveAvgPool2d(1)
            features = c
        else:
            self.pool = nn.Identity()
            features = c * math.prod(spec.out_size)
        self.fc = nn.Linear(features, spec.classes)

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def build(spec: Spec) -> Tuple[nn.Module, torch.Tensor]:
    """The model (eval mode, seeded weights with the spec's edge cases) and an example batch of 4."""
    g = torch.Generator().manual_seed(spec.seed)
    model = Net(spec)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
        for s, first in zip(spec.stages, model.firsts):
            if s.init == "constant":
                first.weight.fill_(0.1)
            elif s.init == "nan":
                first.weight.view(-1)[0] = float("nan")
    model.eval()
    x = torch.randn(4, spec.in_ch, *spec.size, generator=g)
    return model, x


def for_nni(spec: Spec) -> Spec:
    """``spec`` without grouped convolutions (plain instead) nor depthwise channel multipliers.

    Two NNI 3.0 ``ModelSpeedup`` limitations the plugin cannot work around:

    * ``fix_group_mask_conflict`` rewrites the masks so that every group of a grouped convolution
      keeps as many input channels as the others, restoring masked filters of its producer with
      their original weights: the sped-up model no longer computes what the masked model did
      (``sparse_ratio`` masks feeding ``Conv2d(4, 10, groups=2)``: outputs differ by ~5e-3);
    * ``replace_conv2d`` rebuilds a depthwise convolution with a channel multiplier that reads
      the network input (``Conv2d(3, 6, groups=3)``) with the wrong ``groups`` (``expected
      input[4, 3, 8, 8] to have 2 channels, but got 3 channels instead``).

    True depthwise convolutions (``groups == in == out``) stay, except on the network input,
    whose channels NNI's speedup then removes with the layer's filters, as Torch-Pruning does
    (see :func:`_stage_module`).
    """
    stages = tuple(replace(s, kind="plain", groups=1) if s.kind == "grouped" or (i == 0 and s.kind == "depthwise")
                   else replace(s, groups=1) if s.kind == "depthwise" else s for i, s in enumerate(spec.stages))
    return replace(spec, stages=stages)


def _single_feature(spec: Spec) -> bool:
    """Does a tensor of one value per sample flow through the model (refused by the NNI speedup)?"""
    h, w = spec.size
    for s in spec.stages:
        h, w = (h - 1) // s.stride + 1, (w - 1) // s.stride + 1
        if h == w == 1 and min(s.c_out, s.first_out) == 1:
            return True
        if s.pool:
            h, w = h // 2, w // 2
            if h == w == 1 and s.c_out == 1:
                return True
    features = spec.stages[-1].c_out * (1 if spec.head == "gap" else h * w)
    return spec.classes == 1 or features == 1


def _nan_layer_name(spec: Spec, model: nn.Module) -> Optional[str]:
    i = spec.nan_stage
    if i is None:
        return None
    first = model.firsts[i]
    return next(n for n, m in model.named_modules() if m is first)


# --------------------------------------------------------------------------- checks


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _n_channels(model: nn.Module) -> int:
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def _raised_by_plugin(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and "pfgdf_plugin" in frames[-1].filename.replace("\\", "/")


def _outcome(run: Callable[[], object], expected: Optional[Tuple[type, str]], stats: collections.Counter):
    """Run ``run``; with ``expected = (error type, pattern)`` it must raise that plugin error.

    Returns ``run()``'s result, or ``None`` when the expected documented error was raised. Any
    other exception propagates (the property fails), and so does a documented error nobody
    expected: on these valid parameters and finite weights the plugin has no reason to refuse.
    """
    if expected is None:
        return run()
    kind, pattern = expected
    with pytest.raises(PLUGIN_ERRORS) as info:
        run()
    assert isinstance(info.value, kind), f"expected {kind.__name__}, got {info.value!r}"
    assert _raised_by_plugin(info.value), f"{type(info.value).__name__} did not come from the plugin"
    info.match(pattern)
    event(f"documented {kind.__name__}")
    stats["documented"] += 1
    stats[f"documented {pattern}"] += 1
    return None


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    scale = max(1.0, float(ref.abs().max()))
    return bool(torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * scale))


def _check_result(model: nn.Module, x: torch.Tensor, shape: torch.Size, params: int, channels: int,
                  stats: collections.Counter) -> None:
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == shape
    assert torch.isfinite(out).all()
    assert _n_params(model) <= params
    stats["runs"] += 1
    if _n_channels(model) < channels:
        stats["pruned"] += 1
        event("channels removed")
    else:
        event("nothing removed")


def _assert_share(stats: collections.Counter, share: float) -> None:
    assert stats["runs"] > 0, stats
    assert stats["pruned"] >= share * stats["runs"], f"too few examples removed channels: {dict(stats)}"


class _ZeroChannels:
    """Forward hooks zeroing given output channels: the masked model of a structural pruning."""

    def __init__(self, model: nn.Module, removed: Dict[str, List[int]]):
        modules = dict(model.named_modules())
        self.handles = []
        for name, idxs in removed.items():
            keep = torch.ones(modules[name].weight.shape[0] if not isinstance(modules[name], nn.BatchNorm2d)
                              else modules[name].num_features, dtype=torch.bool)
            keep[idxs] = False
            self.handles.append(modules[name].register_forward_hook(self._hook(keep)))

    @staticmethod
    def _hook(keep):
        def hook(module, inputs, output):
            return output * keep.view(1, -1, *([1] * (output.dim() - 2))).to(output.dtype)
        return hook


def _prune_recording(pruner, model: nn.Module) -> Dict[str, List[int]]:
    """``pruner.step(interactive=True)``, recording the output channels each layer loses."""
    names = {m: n for n, m in model.named_modules()}
    removed: Dict[str, set] = collections.defaultdict(set)
    for group in pruner.step(interactive=True):
        for item in group:
            module = item.dep.target.module
            out_pruned = pruner.DG.is_out_channel_pruning_fn(item.dep.handler)
            if isinstance(module, nn.BatchNorm2d) or (isinstance(module, (nn.Conv2d, nn.Linear)) and out_pruned):
                removed[names[module]].update(int(i) for i in item.idxs)
        group.prune()
    return {n: sorted(i) for n, i in removed.items()}


def _check_masked_equals_pruned(reference: nn.Module, removed: Dict[str, List[int]], pruned: nn.Module,
                                x: torch.Tensor) -> None:
    _ZeroChannels(reference, removed)
    reference.eval()
    with torch.no_grad():
        ref, out = reference(x), pruned(x)
    assert _close(out, ref), f"pruned model differs from the masked one by {(out - ref).abs().max():.3g}"


# --------------------------------------------------------------------------- Torch-Pruning: PFGDF


def _tp_run(spec: Spec, make_pruner, stats, error: type = PFGDFError,
            expect: Optional[Callable[[nn.Module], Optional[Tuple[type, str]]]] = None):
    """Prune a model of ``spec`` with ``make_pruner(model, x)``'s interactive step and check it.

    The documented error expected is ``(error, the NaN layer's name)`` for a model with a NaN
    weight, or what ``expect(model)`` returns when given.
    """
    model, x = build(spec)
    with torch.no_grad():
        shape = model(x).shape
    params, channels = _n_params(model), _n_channels(model)
    nan_name = _nan_layer_name(spec, model)
    reference = copy.deepcopy(model)
    expected = None if nan_name is None else (error, nan_name)
    if expect is not None:
        expected = expect(model)

    def run():
        pruner = make_pruner(model, x)
        return _prune_recording(pruner, model)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-variance layers warn by design
        removed = _outcome(run, expected, stats)
    if removed is None:
        return
    _check_result(model, x, shape, params, channels, stats)
    _check_masked_equals_pruned(reference, removed, model, x)


def test_gaussian_importance_in_metapruner():
    stats = collections.Counter()

    @_settings(60)
    @given(spec=specs(), ratio=st.sampled_from((0.3, 0.5)), global_pruning=st.booleans(),
           mode=st.sampled_from(("band", "tail")), reduction=st.sampled_from(("mean", "max", "first")))
    def prop(spec, ratio, global_pruning, mode, reduction):
        _tp_run(spec, lambda model, x: tp.pruner.MetaPruner(
            model, x, importance=GaussianImportance(mode=mode, group_reduction=reduction), pruning_ratio=ratio,
            global_pruning=global_pruning, ignored_layers=[model.fc]), stats)

    prop()
    _assert_share(stats, 0.5)


def test_pfgdf_pruner():
    stats = collections.Counter()

    @_settings(60)
    @given(spec=specs(), k=st.sampled_from((0.5, 1.0, 2.0)), statistic=st.sampled_from(("mean", "abs_mean", "l2")),
           mode=st.sampled_from(("band", "tail")), min_channels=st.integers(1, 3))
    def prop(spec, k, statistic, mode, min_channels):
        _tp_run(spec, lambda model, x: PFGDFPruner(model, x, k=k, statistic=statistic, mode=mode,
                                                   min_channels=min_channels, ignored_layers=[model.fc]), stats)

    prop()
    _assert_share(stats, 0.5)


# --------------------------------------------------------------------------- Torch-Pruning: SPP


def test_spp_importance_in_metapruner():
    stats = collections.Counter()

    @_settings(50)
    @given(spec=specs(), ratio=st.sampled_from((0.3, 0.5)), global_pruning=st.booleans())
    def prop(spec, ratio, global_pruning):
        _tp_run(spec, lambda model, x: tp.pruner.MetaPruner(
            model, x, importance=SPPImportance(), pruning_ratio=ratio, global_pruning=global_pruning,
            ignored_layers=[model.fc]), stats, error=ValueError)

    prop()
    _assert_share(stats, 0.5)


def test_spp_pruner_updates_then_steps():
    stats = collections.Counter()

    @_settings(50)
    @given(spec=specs(), ratio=st.sampled_from((0.3, 0.5, 0.7)), A=st.sampled_from((1.0, 2.5)),
           rounding=st.sampled_from(("ceil", "floor", "round")), rescale=st.booleans())
    def prop(spec, ratio, A, rounding, rescale):
        model, x = build(spec)
        with torch.no_grad():
            shape = model(x).shape
        params, channels = _n_params(model), _n_channels(model)
        nan_name = _nan_layer_name(spec, model)

        def run():
            pruner = SPPPruner(model, x[:1], pruning_ratio=ratio, interval=1, A=A, rounding=rounding,
                               rescale_survivors=rescale, seed=spec.seed, ignored_layers=[model.fc])
            # no training: the norms stay fixed, and with A >= 1 the weakest live channel of every
            # unfinished group reaches p = 1 at each update, so 13 updates finish any group here
            for _ in range(13):
                if pruner.finished:
                    break
                pruner.update()
            return pruner

        pruner = _outcome(run, None if nan_name is None else (ValueError, nan_name), stats)
        if pruner is None:
            return
        assert pruner.finished, pruner.summary()
        for name, info in pruner.summary().items():
            assert info["removed"] == info["target"] < info["channels"], (name, info)
        model.eval()
        with torch.no_grad():
            masked = model(x)  # in eval mode only the channels at p = 1 are masked
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner.step()
        assert not any(m._forward_hooks for m in model.modules())
        _check_result(model, x, shape, params, channels, stats)
        with torch.no_grad():
            out = model(x)
        assert _close(out, masked), f"pruned model differs from the masked one by {(out - masked).abs().max():.3g}"

    prop()
    _assert_share(stats, 0.5)


# --------------------------------------------------------------------------- DBP and MPD: shared helpers


def labelled_data(spec: Spec, batches: int = 3, batch_size: int = 8) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """A few batches of random inputs with random labels over the head's classes, every class present."""
    g = torch.Generator().manual_seed(spec.seed + 1)
    n = batches * batch_size
    labels = (torch.arange(n) % spec.classes)[torch.randperm(n, generator=g)]
    return [(torch.randn(batch_size, spec.in_ch, *spec.size, generator=g), labels[i * batch_size:(i + 1) * batch_size])
            for i in range(batches)]


def _snapshot(model: nn.Module):
    """Module names and types, and a copy of the state_dict: what "the model is unchanged" compares."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    return torch.equal(a, b)


def _assert_unchanged(model: nn.Module, snapshot) -> None:
    types, state = snapshot
    assert [(n, type(m)) for n, m in model.named_modules()] == types, "the model's modules changed"
    after = model.state_dict()
    assert state.keys() == after.keys()
    changed = [k for k in state if not _same_tensor(state[k], after[k])]
    assert not changed, f"the model's state changed: {changed}"


def _check_copies_and_traces(model: nn.Module, x: torch.Tensor) -> None:
    """The model deep-copies and traces with torch.fx, and both compute what it computes."""
    model.eval()
    with torch.no_grad():
        ref = model(x)
        twin = copy.deepcopy(model).eval()
        traced = torch.fx.symbolic_trace(model).eval()
        for other in (twin, traced):
            out = other(x)
            assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())


def _draw_k(data, n_blocks: int) -> int:
    """A block count in 1..n_blocks + 1: reachable mostly, one more than there are now and then."""
    if n_blocks == 0 or data.draw(st.integers(0, 9), label="unreachable") == 5:  # rare: inside the range
        return n_blocks + 1
    return data.draw(st.integers(1, n_blocks), label="k")


def _removable_blocks(model: nn.Module, x: torch.Tensor) -> int:
    try:
        return len(find_blocks(model, x))
    except DBPError:
        return 0


def _dbp_expected(n_blocks: int, k: int, spec: Spec, nan_name: Optional[str]) -> Optional[Tuple[type, str]]:
    """DBP's documented refusals, in the order it checks them (all before the model is changed)."""
    if n_blocks == 0:
        return DBPError, "has no removable block"
    if k > n_blocks:
        return DBPError, rf"target {k} block\(s\) cannot be met: only {n_blocks} removable block"
    if nan_name is not None:
        return DBPError, rf"layer '{re.escape(nan_name)}': weight holds NaN/Inf values"
    if spec.classes == 1:
        return DBPError, "holds only class 0"
    return None


def _check_dbp_result(pruner, model: nn.Module, x: torch.Tensor, shape, params: int, channels: int, k: int,
                      stats: collections.Counter) -> None:
    assert len(pruner.removed) == k, (pruner.removed, k)
    modules = dict(model.named_modules())
    for name, entry in pruner.report.items():
        for member in entry["members"]:
            assert isinstance(modules[member], nn.Identity) == entry["removed"], (name, member, entry["removed"])
    _check_result(model, x, shape, params, channels, stats)
    _check_copies_and_traces(model, x)


def _dbp_case(spec):
    """A drawn model, its input, and what a DBP run is checked against."""
    model, x = build(spec)
    with torch.no_grad():
        shape = model(x).shape
    return model, x, shape, _n_params(model), _n_channels(model), _removable_blocks(model, x), _snapshot(model)


def _settle_dbp(run, expected, stats, case, k):
    """Run a DBP pruner: a documented error leaves the model alone, a success passes the checks."""
    model, x, shape, params, channels, _, before = case
    pruner = _outcome(run, expected, stats)
    if pruner is None:
        _assert_unchanged(model, before)
        return
    _check_dbp_result(pruner, model, x, shape, params, channels, k, stats)


# --------------------------------------------------------------------------- Torch-Pruning: DBP


def test_dbp_pruner_removes_blocks_or_refuses_leaving_the_model_alone():
    stats = collections.Counter()

    @_settings(120)
    @given(spec=specs(keep_width=True), data=st.data(), reference=st.sampled_from(("previous", "input")))
    def prop(spec, data, reference):
        case = model, x, _, _, _, n_blocks, _ = _dbp_case(spec)
        k = _draw_k(data, n_blocks)

        def run():
            pruner = DBPPruner(model, x, data=labelled_data(spec), target={"blocks": k}, reference=reference)
            pruner.step()
            return pruner

        _settle_dbp(run, _dbp_expected(n_blocks, k, spec, _nan_layer_name(spec, model)), stats, case, k)

    prop()
    _assert_share(stats, 0.5)


def test_discrimination_importance_in_metapruner():
    stats = collections.Counter()

    @_settings(60)
    @given(spec=specs(), ratio=st.sampled_from((0.3, 0.5)), global_pruning=st.booleans(),
           reduction=st.sampled_from(("mean", "max", "first")))
    def prop(spec, ratio, global_pruning, reduction):
        def expect(model):
            if spec.nan_stage is not None:
                return DBPError, rf"layer '{re.escape(_nan_layer_name(spec, model))}': weight holds NaN/Inf"
            return (DBPError, "holds only class 0") if spec.classes == 1 else None

        _tp_run(spec, lambda model, x: tp.pruner.MetaPruner(
            model, x, importance=DiscriminationImportance(labelled_data(spec), group_reduction=reduction),
            pruning_ratio=ratio, global_pruning=global_pruning, ignored_layers=[model.fc]), stats, expect=expect)

    prop()
    _assert_share(stats, 0.5)


# --------------------------------------------------------------------------- Torch-Pruning: MPDCompress


def _mpd_layers(model: nn.Module, exclude: Tuple[str, ...] = ("fc",)) -> List[Tuple[str, nn.Module]]:
    """The layers MPD masks model-wide: Linear and ungrouped Conv2d, without the classifier."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n not in exclude
            and getattr(m, "groups", 1) == 1]


def _dims(m: nn.Module) -> Tuple[int, int]:
    return (m.out_channels, m.in_channels) if isinstance(m, nn.Conv2d) else (m.out_features, m.in_features)


def _mpd_expected(layers: List[Tuple[str, nn.Module]], size: Tuple[str, float], nan_name: Optional[str],
                  per_layer: bool, empty: Optional[str] = "no layer to mask") -> Optional[Tuple[type, str]]:
    """MPD's documented refusals for ``size = ("blocks", c)`` or ``("compression", x)``.

    A block count above a layer's ``min(out, in)`` is refused; so is a layer whose weight holds
    NaN when it gets more than one block (with ``compression`` every layer with two channels or
    more on both sides does). The Torch-Pruning pruner checks every layer's count before it
    plans any layer; the NNI one checks layer by layer (``per_layer``) and plans every
    configured layer, so it refuses a NaN weight even in a layer left with one block.
    """
    if not layers:
        return (MPDError, empty) if empty else None
    kind, value = size

    def too_many(m):
        return kind == "blocks" and min(_dims(m)) < value

    def nan_refused(name, m):
        if per_layer:  # the NNI pruner plans every configured layer, one block or more
            return name == nan_name
        return name == nan_name and (value > 1 if kind == "blocks" else min(_dims(m)) >= 2)

    checks = [lambda n, m: too_many(m) or nan_refused(n, m)] if per_layer else [lambda n, m: too_many(m), nan_refused]
    for check in checks:
        for name, m in layers:
            if not check(name, m):
                continue
            if too_many(m):
                return MPDError, rf"^{re.escape(name)}: blocks={value} exceeds min\(out, in\)"
            return MPDError, rf"^{re.escape(name)}: the weight holds NaN/Inf values"
    return None


def _mpd_expected_per_name(model: nn.Module, blocks: Dict[str, int], nan_name: Optional[str]):
    """The Torch-Pruning pruner's refusals for ``blocks={name: c}``: each named layer in turn must be
    an ungrouped layer with ``c <= min(out, in)``; then a NaN weight in a layer with ``c > 1``."""
    for name, c in blocks.items():
        m = model.get_submodule(name)
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            return MPDError, rf"^{re.escape(name)}: Conv2d with groups={m.groups} \(depthwise or grouped\)"
        if c > min(_dims(m)):
            return MPDError, rf"^{re.escape(name)}: blocks={c} exceeds min\(out, in\)"
    if nan_name is not None and blocks.get(nan_name, 1) > 1:
        return MPDError, rf"^{re.escape(nan_name)}: the weight holds NaN/Inf values"
    return None


def _mask_zeros_hold(model: nn.Module, masks: Dict[str, torch.Tensor]) -> bool:
    return all(bool((model.get_submodule(n).weight.detach()[m == 0] == 0).all()) for n, m in masks.items())


def _mpd_size():
    return st.one_of(st.floats(1.5, 8.0).map(lambda c: ("compression", c)),
                     st.integers(1, 6).map(lambda c: ("blocks", c)))


def _check_mpd_conversion(model: nn.Module, x: torch.Tensor, masked: torch.Tensor, shape, params: int,
                          planned: Dict[str, int], stats: collections.Counter) -> None:
    modules = dict(model.named_modules())
    for name, c in planned.items():
        assert isinstance(modules[name], (BlockDiagonalLinear, PermutedGroupConv2d)) == (c > 1), (name, c)
    with torch.no_grad():
        out = model(x)
    assert out.shape == shape
    assert _n_params(model) <= params, f"{_n_params(model)} parameters after conversion, {params} before"
    assert torch.allclose(out, masked, rtol=1e-4, atol=1e-5, equal_nan=True), \
        f"converted model differs from the masked one by {(out - masked).abs().max():.3g}"
    _check_copies_and_traces(model, x)
    stats["runs"] += 1
    if any(c > 1 for c in planned.values()):
        stats["pruned"] += 1
        event("layers converted")
    else:
        event("nothing converted")


def test_mpd_pruner_masked_training_then_conversion_computes_the_same():
    stats = collections.Counter()

    @_settings(80)
    @given(spec=specs(), size=_mpd_size(), permutation=st.sampled_from(("random", "magnitude")),
           fold=st.booleans(), seed=st.integers(0, 3), data=st.data())
    def prop(spec, size, permutation, fold, seed, data):
        model, x = build(spec)
        model.double()  # float64: the converted layers sum in another order
        x = x.double()
        with torch.no_grad():
            shape = model(x).shape
        params = _n_params(model)
        nan_name = _nan_layer_name(spec, model)
        grouped = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups != 1]
        if size[0] == "blocks" and data.draw(st.integers(0, 4), label="per layer") == 2:
            # {layer name: blocks} for some layers, the classifier and grouped convolutions included
            names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True), label="layers")
            size = ("blocks", {n: data.draw(st.integers(1, 4), label=n) for n in chosen})
            expected = _mpd_expected_per_name(model, size[1], nan_name)
        else:
            expected = _mpd_expected(_mpd_layers(model), size, nan_name, per_layer=False)
        before = _snapshot(model)

        def run():
            return MPDPruner(model, x, permutation=permutation, fold=fold, seed=seed, **{size[0]: size[1]})

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruner = _outcome(run, expected, stats)
        if pruner is None:
            _assert_unchanged(model, before)
            return
        if grouped and not isinstance(size[1], dict):  # left dense, and said so
            said = " ".join(str(w.message) for w in caught if "leaves these layers dense" in str(w.message))
            assert all(f"{n} (groups=" in said for n in grouped), (grouped, said)
            assert not set(grouped) & set(pruner.plans)
        masks = pruner.masks()
        assert _mask_zeros_hold(model, masks)
        if nan_name is None:
            # SGD steps with momentum and weight decay (the second one uses the momentum buffer): the
            # masked gradients keep the zeros even before update(), which re-applies the masks anyway.
            # A model with a NaN weight is not trained: every gradient is NaN, and 0 * NaN is NaN.
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
            for _ in range(2):
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
                assert _mask_zeros_hold(model, masks)
                pruner.update()
                assert _mask_zeros_hold(model, masks)
            model.eval()
        with torch.no_grad():
            masked = model(x)
        planned = {n: p.blocks for n, p in pruner.plans.items()}
        report = pruner.step()
        assert set(report["layers"]) == {n for n, c in planned.items() if c > 1}
        _check_mpd_conversion(model, x, masked, shape, params, planned, stats)

    prop()
    _assert_share(stats, 0.5)


# --------------------------------------------------------------------------- NNI


def _nni_filter_keep(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape[0], -1).abs().sum(1) != 0


def test_nni_pfgdf_pruner_and_speedup():
    from pfgdf_plugin.nni import PFGDFPruner as NNIPFGDFPruner
    from pfgdf_plugin.nni import apply_masks, dependency_config_list, speedup

    stats = collections.Counter()

    @_settings(40)
    @given(spec=specs(), k=st.sampled_from((0.5, 1.0, 2.0)), mode=st.sampled_from(("band", "tail")),
           statistic=st.sampled_from(("mean", "abs_mean", "l2")), ratio=st.sampled_from((None, None, 0.5)))
    def prop(spec, k, mode, statistic, ratio):
        spec = for_nni(spec)
        model, x = build(spec)
        with torch.no_grad():
            shape = model(x).shape
        params, channels = _n_params(model), _n_channels(model)
        nan_name = _nan_layer_name(spec, model)
        entry = {"op_types": ["Conv2d"]}
        if ratio is not None:
            entry["sparse_ratio"] = ratio
        config = dependency_config_list(model, x, [entry])

        def run():
            pruner = NNIPFGDFPruner(model, config, k=k, mode=mode, statistic=statistic)
            try:
                _, masks = pruner.compress()
            finally:
                pruner.unwrap_model()
            return masks

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            masks = _outcome(run, None if nan_name is None else (PFGDFError, nan_name), stats)
        if masks is None:
            return
        for name, targets in masks.items():
            assert bool(_nni_filter_keep(targets["weight"]).any()), f"{name} lost every filter"
        masked = apply_masks(copy.deepcopy(model), masks, batchnorm=True).eval()

        def run_speedup():
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # coupled layers must carry equal masks
                return speedup(model, masks, x, config_list=config)

        small = _outcome(run_speedup, (ValueError, "single feature") if _single_feature(spec) else None, stats)
        if small is None:
            return
        _check_result(small, x, shape, params, channels, stats)
        with torch.no_grad():
            out, ref = small(x), masked(x)
        assert _close(out, ref), f"sped-up model differs from the masked one by {(out - ref).abs().max():.3g}"

    prop()
    _assert_share(stats, 0.5)


def test_nni_dbp_pruner_removes_blocks_or_refuses_leaving_the_model_alone():
    from pfgdf_plugin.nni.dbp import DBPPruner as NNIDBPPruner

    stats = collections.Counter()

    @_settings(100)
    @given(spec=specs(keep_width=True), data=st.data(), mode=st.sampled_from(("target", "target", "ratio")))
    def prop(spec, data, mode):
        case = model, x, _, _, _, n_blocks, _ = _dbp_case(spec)
        if mode == "target":
            k = _draw_k(data, n_blocks)
            config, kwargs = [{"op_types": ["Conv2d"]}], {"target": {"blocks": k}}
            expected = _dbp_expected(n_blocks, k, spec, _nan_layer_name(spec, model))
        else:
            ratio = data.draw(st.sampled_from((0.0, 0.5, 1.0)), label="sparse_ratio")
            k = int(ratio * n_blocks + 1e-9)
            config, kwargs = [{"op_types": ["Conv2d"], "sparse_ratio": ratio}], {}
            expected = _dbp_expected(n_blocks, k, spec, _nan_layer_name(spec, model))
        if expected is not None and expected[1] == "has no removable block":
            expected = (expected[0], "has no removable block: name candidates in op_names")

        def run():
            pruner = NNIDBPPruner(model, config, data=labelled_data(spec), example_inputs=x, **kwargs)
            pruned, masks = pruner.compress()
            assert pruned is model and masks == {}
            return pruner

        _settle_dbp(run, expected, stats, case, k)

    prop()
    _assert_share(stats, 0.4)


def test_nni_mpd_pruner_then_convert_computes_what_the_masked_model_does():
    from pfgdf_plugin.nni.mpd import MPDPruner as NNIMPDPruner
    from pfgdf_plugin.nni.mpd import convert

    stats = collections.Counter()

    @_settings(80)
    @given(spec=specs(), size=_mpd_size(), permutation=st.sampled_from(("random", "magnitude")),
           fold=st.booleans(), skip_grouped=st.sampled_from((True, True, False)))
    def prop(spec, size, permutation, fold, skip_grouped):
        model, x = build(spec)
        model.double()
        x = x.double()
        with torch.no_grad():
            shape = model(x).shape
        params = _n_params(model)
        nan_name = _nan_layer_name(spec, model)
        grouped = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups != 1]
        exclude = ["fc"] + (grouped if skip_grouped else [])
        config = [{"op_types": ["Conv2d", "Linear"], "exclude_op_names": exclude}]
        layers = _mpd_layers(model, exclude=tuple(exclude))
        expected = _mpd_expected(layers, size, nan_name, per_layer=True, empty=None)
        if grouped and not skip_grouped:
                    expected = (MPDError, rf"^{re.escape(grouped[0])}: Conv2d with groups=\d+ \(depthwise or grouped\)")
        before = _snapshot(model)

        def run():
            pruner = NNIMPDPruner(model, config, permutation=permutation, **{size[0]: size[1]})
            try:
                _, masks = pruner.compress()
            finally:
                pruner.unwrap_model()
            return pruner, masks

        result = _outcome(run, expected, stats)
        if result is None:
            _assert_unchanged(model, before)
            assert not any(hasattr(m, "_nni_wrapper") for m in model.modules())
            return
        pruner, masks = result
        reference = copy.deepcopy(model)
        with torch.no_grad():
            for name, targets in masks.items():
                reference.get_submodule(name).weight.mul_(targets["weight"])
            masked = reference(x)
        planned = {n: p.blocks for n, p in pruner.plans.items()}
        report = convert(model, pruner, x, fold=fold)
        assert set(report["layers"]) == {n for n, c in planned.items() if c > 1}
        _check_mpd_conversion(model, x, masked, shape, params, planned, stats)

    prop()
    _assert_share(stats, 0.5)


# --------------------------------------------------------------------------- the prune() entry point


def test_prune_entry_point_pfgdf():
    from pfgdf_plugin.pruning import prune

    stats = collections.Counter()

    @_settings(40)
    @given(spec=specs(), framework=st.sampled_from(("torch_pruning", "nni")),
           k=st.sampled_from((0.5, 1.0, 2.0)), ratio=st.sampled_from((None, None, 0.5)),
           min_channels=st.integers(1, 2))
    def prop(spec, framework, k, ratio, min_channels):
        if framework == "nni":
            spec = for_nni(spec)
        model, x = build(spec)
        with torch.no_grad():
            shape = model(x).shape
        params, channels = _n_params(model), _n_channels(model)
        state = copy.deepcopy(model.state_dict())
        nan_name = _nan_layer_name(spec, model)
        expected = None if nan_name is None else (PFGDFError, nan_name)
        if expected is None and framework == "nni" and _single_feature(spec):
            expected = (ValueError, "single feature")

        def run():
            return prune(model, x, "pfgdf", framework, params={"k": k, "min_channels": min_channels}, ratio=ratio)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = _outcome(run, expected, stats)
        # the caller's model is never modified (prune works on a copy unless inplace=True)
        after = model.state_dict()
        assert state.keys() == after.keys()
        assert all(torch.equal(state[n], after[n]) or (state[n].isnan() & after[n].isnan()).any() for n in state)
        if result is None:
            return
        assert result.method == "pfgdf" and result.framework == framework
        _check_result(result.model, x, shape, params, channels, stats)
        stats[f"runs_{framework}"] += 1
        for name, layer in result.layers.items():
            assert 0 <= layer["pruned"] < layer["channels"], (name, layer)

    prop()
    _assert_share(stats, 0.5)


def test_prune_entry_point_dbp_and_mpd():
    from pfgdf_plugin.pruning import PruneContext, prune

    stats = collections.Counter()

    @_settings(60)
    @given(spec=specs(keep_width=True), data=st.data(), method=st.sampled_from(("dbp", "mpd")),
           framework=st.sampled_from(("torch_pruning", "nni")))
    def prop(spec, data, method, framework):
        model, x = build(spec)
        with torch.no_grad():
            shape = model(x).shape
        params, channels = _n_params(model), _n_channels(model)
        before = _snapshot(model)
        nan_name = _nan_layer_name(spec, model)
        if method == "dbp":
            n_blocks = _removable_blocks(model, x)
            k = _draw_k(data, n_blocks)
            kwargs = {"params": {"blocks": k}, "ctx": PruneContext(train_loader=labelled_data(spec))}
            expected = _dbp_expected(n_blocks, k, spec, _nan_layer_name(spec, model))
        else:
            compression = data.draw(st.floats(1.5, 8.0), label="compression")
            kwargs = {"params": {"compression": compression, "max_epochs": 0.0}}
            size = ("compression", compression)
            grouped = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups != 1]
            if framework == "nni" and grouped:  # the NNI pruner takes every Conv2d: grouped ones are refused
                expected = (MPDError, rf"^{re.escape(grouped[0])}: Conv2d with groups=")
            else:
                expected = _mpd_expected(_mpd_layers(model), size, nan_name, per_layer=framework == "nni",
                                         empty="no layer to mask" if framework == "torch_pruning" else None)

        def run():
            return prune(model, x, method, framework, **kwargs)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = _outcome(run, expected, stats)
        _assert_unchanged(model, before)  # prune works on a copy
        if result is None:
            return
        assert result.method == method and result.framework == framework
        out_model = result.model
        with torch.no_grad():
            out = out_model(x)
        assert out.shape == shape
        assert _n_params(out_model) <= params
        stats["runs"] += 1
        stats[f"runs_{method}_{framework}"] += 1
        if method == "dbp":
            assert len(result.extra["dbp_removed"]) == k
            assert _n_channels(out_model) < channels
            stats["pruned"] += 1
        elif result.layers:
            assert all(e["blocks"] > 1 for e in result.layers.values())
            stats["pruned"] += 1

    prop()
    _assert_share(stats, 0.4)


# --------------------------------------------------------------------------- regressions found by the properties


def _narrowing_grouped() -> nn.Module:
    """A grouped convolution with groups == out_channels < in_channels after a plain one."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 1, groups=4), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()


def test_metapruner_nan_error_names_the_layer_by_its_path():
    # GaussianImportance outside PFGDFPruner used to name the layer "Conv2d@7f..."
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 3, 8, 8)
    model(x)
    with torch.no_grad():
        model[2].weight[1, 0, 0, 0] = float("nan")
    pruner = tp.pruner.MetaPruner(model, x, importance=GaussianImportance(), pruning_ratio=0.5,
                                  ignored_layers=[model[4]])
    with pytest.raises(PFGDFError, match=r"layer '2': weight holds 1 NaN/Inf value"):
        pruner.step()


@pytest.mark.parametrize("make", [
    lambda m, x: tp.pruner.MetaPruner(m, x, importance=GaussianImportance(), pruning_ratio=0.5, ignored_layers=[m[9]]),
    lambda m, x: tp.pruner.MetaPruner(m, x, importance=SPPImportance(), pruning_ratio=0.5, ignored_layers=[m[9]]),
    lambda m, x: PFGDFPruner(m, x, ignored_layers=[m[9]]),
], ids=["gaussian", "spp-importance", "pfgdf-pruner"])
def test_narrowing_grouped_conv_is_left_alone_not_corrupted(make):
    # Torch-Pruning 1.6 reads Conv2d(8, 4, groups=4) as depthwise and used to leave it expecting
    # fewer inputs than its producer gives ("expected input[2, 5, 8, 8] to have 4 channels")
    model, x = _narrowing_grouped(), torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"layer '3' is a grouped convolution with groups == out_channels"):
        make(model, x).step()
    assert model(x).shape == (2, 3)
    assert model[0].out_channels == 8 and model[3].out_channels == 4  # its dependency group stays whole
    assert model[5].out_channels < 6  # the others are still pruned


def test_spp_pruner_skips_the_narrowing_grouped_conv_and_still_matches_the_masked_model():
    model, x = _narrowing_grouped(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = SPPPruner(model, x, pruning_ratio=0.5, A=2.0, ignored_layers=[model[9]])
    assert "3" not in pruner.summary() and "0" not in pruner.summary()
    while not pruner.finished:
        pruner.update()
    model.eval()
    with torch.no_grad():
        masked = model(x)
    pruner.step()
    assert model[5].out_channels == 3
    assert torch.allclose(model(x), masked, atol=1e-5)


def test_spp_nan_weights_raise_value_error_naming_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(64, 2))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model[2].weight[1, 0, 0, 0] = float("nan")
    # SPPImportance used to rank a NaN filter as the most important one, silently
    with pytest.raises(ValueError, match=r"layer '2': weight holds NaN/Inf values; SPP cannot rank"):
        tp.pruner.MetaPruner(model, x, importance=SPPImportance(), pruning_ratio=0.5,
                             ignored_layers=[model[4]]).step()
    # SPPPruner.update() said only "norms hold NaN/Inf values", and updated the groups before it
    pruner = SPPPruner(model, x, pruning_ratio=0.5, interval=1, A=0.5, ignored_layers=[model[4]])
    with pytest.raises(ValueError, match=r"layer '2'"):
        pruner.update()
    assert all(bool((p == 0).all()) for p in pruner.probabilities().values())


def test_nni_dependency_ids_do_not_couple_misread_convs_with_their_producers():
    from pfgdf_plugin.nni import dependency_config_list

    # NNI 3.0 calls every conv with groups == out_channels depthwise: Conv2d(8, 1) and
    # Conv2d(8, 4, groups=4) were put in one dependency group with their producers
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 1, 1), nn.ReLU(), nn.Conv2d(1, 8, 1),
                          nn.ReLU(), nn.Conv2d(8, 4, 1, groups=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    config = dependency_config_list(model, torch.randn(2, 3, 8, 8), [{"op_types": ["Conv2d"]}])
    assert not any("dependency_group_id" in entry for entry in config), config
    assert model[2].out_channels == 1 and model[6].out_channels == 4  # restored
    grouped = next(e for e in config if e["op_names"] == ["6"])
    assert grouped["internal_metric_block"] == 4  # a grouped conv with 4 groups, not a depthwise one


def test_nni_speedup_of_misread_convs_matches_the_masked_model():
    from pfgdf_plugin.nni import PFGDFPruner as NNIPFGDFPruner
    from pfgdf_plugin.nni import apply_masks, dependency_config_list, speedup

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 1, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(1, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1, groups=4), nn.ReLU(),
                          nn.Conv2d(4, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).eval()
    x = torch.randn(4, 3, 8, 8)
    config = dependency_config_list(model, x, [{"op_types": ["Conv2d"]}])
    pruner = NNIPFGDFPruner(model, config, k=1.0)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    masked = apply_masks(copy.deepcopy(model), masks, batchnorm=True)
    small = speedup(model, masks, x, config_list=config)  # NNI's mask-conflict fix used to assert
    assert small[6].in_channels < 8 and small[6].groups == 4
    assert torch.allclose(small(x), masked(x), atol=1e-5)


def test_nni_speedup_refuses_single_feature_tensors_with_a_clear_error():
    from pfgdf_plugin.nni import speedup

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
    masks = {"0": {"weight": torch.tensor([0.0, 1, 1, 1]).view(4, 1, 1, 1).expand(4, 3, 1, 1).clone()}}
    # NNI itself fails with "The output type should be <class 'torch.Tensor'>, but NoneType"
    with pytest.raises(ValueError, match=r"layer '4' outputs a single feature per sample \(shape \(4, 1\)\)"):
        speedup(model, masks, torch.randn(4, 3, 8, 8))


def _nan_net() -> Tuple[nn.Module, torch.Tensor, List[Tuple[torch.Tensor, torch.Tensor]]]:
    """Two removable Conv-ReLU blocks; the second holds one NaN weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[4].weight[1, 0, 0, 0] = float("nan")
    data = [(torch.randn(8, 3, 8, 8), torch.arange(8) % 3) for _ in range(3)]
    return model, torch.randn(2, 3, 8, 8), data


def _nni_dbp(model, x, data):
    from pfgdf_plugin.nni.dbp import DBPPruner as NNIDBPPruner

    NNIDBPPruner(model, [{"op_types": ["Conv2d"]}], data=data, example_inputs=x, target={"blocks": 1}).compress()


@pytest.mark.parametrize("run", [
    lambda m, x, d: DBPPruner(m, x, data=d, target={"blocks": 1}).step(),
    _nni_dbp,
    lambda m, x, d: tp.pruner.MetaPruner(m, x, importance=DiscriminationImportance(d), pruning_ratio=0.5,
                                         ignored_layers=[m[8]]).step(),
], ids=["dbp-pruner", "nni-dbp-pruner", "discrimination-importance"])
def test_dbp_nan_weights_raise_dbp_error_naming_the_layer(run):
    # DBP used to fit its probes on NaN features and remove blocks by NaN losses; the importance
    # ranked channels by NaN Fisher ratios
    model, x, data = _nan_net()
    before = _snapshot(model)
    with pytest.raises(DBPError, match=r"layer '4': weight holds NaN/Inf values"):
        run(model, x, data)
    _assert_unchanged(model, before)


def test_dbp_nan_data_raises_dbp_error_naming_the_block():
    model, x, data = _nan_net()
    with torch.no_grad():
        model[4].weight.nan_to_num_(0.0)
    data[1][0][3, 0, 2, 2] = float("nan")
    before = _snapshot(model)
    with pytest.raises(DBPError, match=r"the input of '2' holds NaN/Inf values on the data"):
        DBPPruner(model, x, data=data, target={"blocks": 1}).step()
    _assert_unchanged(model, before)
    with pytest.raises(DBPError, match=r"the output of '0' holds NaN/Inf values on the data"):
        tp.pruner.MetaPruner(model, x, importance=DiscriminationImportance(data), pruning_ratio=0.5,
                             ignored_layers=[model[8]]).step()


def test_nni_mpd_plans_and_errors_follow_the_model_order():
    from pfgdf_plugin.nni.mpd import MPDPruner as NNIMPDPruner

    # NNI selects the configured modules into a set: the plans, and the layer named by an error,
    # used to follow the process's string hashing instead of the model
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(10)])
    pruner = NNIMPDPruner(model, [{"op_types": ["Linear"]}], blocks=2)
    assert list(pruner.plans) == [str(i) for i in range(10)]
    pruner.unwrap_model()
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)], *[nn.Linear(4, 1 + i % 2) for i in range(6)])
    with pytest.raises(MPDError, match=r"^4: blocks=2 exceeds min\(out, in\)"):
        NNIMPDPruner(model, [{"op_types": ["Linear"]}], blocks=2)
