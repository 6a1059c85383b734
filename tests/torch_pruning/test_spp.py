"""SPP: the probability schedule, the per-layer state, and SPPPruner on real networks."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from pfgdf_plugin.methods import spp
from pfgdf_plugin.models import build_model
from pfgdf_plugin.torch_pruning.spp import SPPImportance, SPPPruner, group_l1


@pytest.fixture
def one_thread():
    """Small convolutions run far faster on one thread when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize("n_left,A,u", [(1, 0.05, 0.25), (4, 0.05, 0.25), (10, 0.5, 0.1), (37, 0.2, 0.6)])
def test_delta_starts_at_A_and_crosses_zero_at_n_left(n_left, A, u):
    assert float(spp.delta(0, n_left, A, u)) == pytest.approx(A)
    assert float(spp.delta(n_left, n_left, A, u)) == pytest.approx(0.0, abs=1e-12)
    assert float(spp.delta(n_left - 0.01, n_left, A, u)) > 0
    assert float(spp.delta(n_left + 0.01, n_left, A, u)) < 0
    ranks = torch.arange(3 * n_left + 2)
    d = spp.delta(ranks, n_left, A, u)
    assert d.shape == ranks.shape and d.dtype == torch.float64
    assert bool((d[:n_left] > 0).all()) and bool((d[n_left + 1:] < 0).all())
    assert bool((d[1:] < d[:-1]).all())  # decreasing in rank


@pytest.mark.parametrize("n_left,A,u", [(3, 0.05, 0.25), (12, 1.0, 0.4)])
def test_delta_is_point_symmetric_and_continuous_at_n_c(n_left, A, u):
    alpha, n_c = spp.alpha_nc(n_left, u)
    assert alpha == pytest.approx(math.log(2 / u) / n_left)
    assert n_c == pytest.approx(-math.log(u) / alpha)
    for x in (0.1, 0.5, 1.0, n_c / 2, n_c):
        total = spp.delta(n_c + x, n_left, A, u) + spp.delta(n_c - x, n_left, A, u)
        assert float(total) == pytest.approx(2 * u * A)
    assert float(spp.delta(n_c, n_left, A, u)) == pytest.approx(u * A)
    for eps in (1e-9, -1e-9):  # both branches meet at u*A
        assert float(spp.delta(n_c + eps, n_left, A, u)) == pytest.approx(u * A, abs=1e-8)


def test_delta_needs_something_left():
    with pytest.raises(ValueError, match="n_left must be > 0, got 0"):
        spp.delta(0, 0)


@pytest.mark.parametrize("kwargs,match", [
    ({"ratio": 1.5}, r"ratio must be in \(0, 1\), got 1.5"),
    ({"ratio": 0}, r"ratio must be in \(0, 1\), got 0"),
    ({"interval": 0}, r"interval must be an integer >= 1, got 0"),
    ({"interval": 2.0}, r"interval must be an integer >= 1, got 2.0"),
    ({"A": 0}, r"A must be > 0, got 0"),
    ({"u": 1.0}, r"u must be in \(0, 1\), got 1.0"),
])
def test_bad_parameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spp.check_params(**kwargs)


def test_target_count():
    assert spp.target_count(10, 0.3) == 3  # not 4: 0.3 * 10 is 3.0000000000000004
    assert spp.target_count(5, 0.5) == 3 and spp.target_count(5, 0.5, "floor") == 2
    assert spp.target_count(1, 0.9) == 0  # a group always stays
    with pytest.raises(ValueError, match="rounding must be one of"):
        spp.target_count(4, 0.5, "up")


# --------------------------------------------------------------------------- one layer's state


def test_update_grows_the_weakest_and_shrinks_the_strongest():
    s = spp.SPPState(6, ratio=0.5, A=0.1)  # target 3
    norms = torch.tensor([5.0, 1.0, 4.0, 2.0, 6.0, 3.0])  # ranks 4, 0, 3, 1, 5, 2
    s.update(norms)
    expected = torch.zeros(6, dtype=torch.float64)
    for idx, rank in ((1, 0), (3, 1), (5, 2)):
        expected[idx] = spp.delta(rank, 3, 0.1)
    assert torch.allclose(s.probabilities, expected)
    assert s.probabilities[1] == pytest.approx(0.1)
    assert s.probabilities[[0, 2, 4]].eq(0).all()  # negative deltas, clipped at 0

    s.probabilities.fill_(0.3)
    before = s.probabilities.clone()
    s.update(norms)
    assert bool((s.probabilities[[1, 3, 5]] > before[[1, 3, 5]]).all())
    assert s.probabilities[2] == pytest.approx(0.3)  # rank 3 = N_left: delta is 0
    assert bool((s.probabilities[[0, 4]] < before[[0, 4]]).all())
    assert s.probabilities[4] < s.probabilities[0]  # the strongest loses most


def test_update_removes_the_weakest_until_the_target_and_then_stops():
    s = spp.SPPState(8, ratio=0.5, A=0.3)
    norms = torch.arange(8, 0, -1, dtype=torch.float32)  # group 7 is the weakest
    n = 0
    while not s.finished:
        result = s.update(norms)
        n += 1
        assert s.n_removed <= s.target
        assert s.probabilities[s.removed].eq(1).all()
        assert n < 100
    assert result.finished and s.finished_at == n and s.closed
    assert s.removed.nonzero().flatten().tolist() == [4, 5, 6, 7]
    assert s.probabilities[~s.removed].eq(0).all()  # survivors kept for good
    assert result.survivor_keep.shape == (8,) and result.survivor_keep[s.removed].eq(0).all()
    before = s.state_dict()
    s.update(norms.flip(0))  # finished: nothing moves
    assert torch.equal(s.probabilities, before["probabilities"]) and s.updates == before["updates"]
    assert torch.equal(s.sample_keep_mask(), ~s.removed)


def test_removed_groups_are_excluded_from_the_ranking():
    s = spp.SPPState(4, ratio=0.5, A=0.5)
    s.probabilities[0] = 1.0
    s.removed[0] = True  # N_left is now 1
    s.update(torch.tensor([0.0, 3.0, 1.0, 2.0]))
    assert s.probabilities[0] == 1.0
    assert s.probabilities[2] == pytest.approx(0.5)  # rank 0 among the three left
    assert s.probabilities[[1, 3]].eq(0).all()


def test_a_layer_too_small_for_its_ratio_is_finished_at_once():
    for s in (spp.SPPState(1, ratio=0.5), spp.SPPState(5, ratio=0.1, rounding="floor"),
              spp.SPPState(4, ratio=0.0)):
        assert s.target == 0 and s.finished and s.finished_at == 0
        assert s.update(torch.ones(s.n_groups)).removed.numel() == 0
        assert s.sample_keep_mask(torch.Generator().manual_seed(0)).all()


def test_sampling_is_reproducible_and_follows_the_probabilities():
    def state():
        s = spp.SPPState(5, ratio=0.6, seed=3)
        s.probabilities.copy_(torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64))
        s.removed[4] = True
        return s

    a, b = state(), state()
    masks_a = torch.stack([a.sample_keep_mask() for _ in range(4000)])
    masks_b = torch.stack([b.sample_keep_mask() for _ in range(4000)])
    assert torch.equal(masks_a, masks_b)
    rate = masks_a.double().mean(0)
    assert rate[0] == 1.0 and rate[4] == 0.0
    assert torch.allclose(rate[1:4], torch.tensor([0.75, 0.5, 0.1], dtype=torch.float64), atol=0.03)

    saved = copy.deepcopy(a.state_dict())
    next_a = [a.sample_keep_mask() for _ in range(5)]
    c = spp.SPPState(5, ratio=0.6)
    c.load_state_dict(saved)
    assert torch.equal(c.probabilities, saved["probabilities"]) and torch.equal(c.keep, saved["keep"])
    assert all(torch.equal(x, c.sample_keep_mask()) for x in next_a)
    with pytest.raises(ValueError, match="state holds 5 groups"):
        spp.SPPState(6, ratio=0.5).load_state_dict(saved)


# --------------------------------------------------------------------------- SPPPruner


def _train_step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_pruner_rejects_bad_arguments():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\), got 1.5"):
        SPPPruner(model, x, pruning_ratio=1.5)
    with pytest.raises(ValueError, match="interval must be an integer >= 1, got 0"):
        SPPPruner(model, x, interval=0)
    with pytest.raises(ValueError, match="A must be > 0, got 0"):
        SPPPruner(model, x, A=0)
    with pytest.raises(ValueError, match=r"u must be in \(0, 1\), got 1.0"):
        SPPPruner(model, x, u=1.0)
    with pytest.raises(TypeError, match="'importance'"):
        SPPPruner(model, x, importance=SPPImportance())
    with pytest.raises(TypeError, match="global_pruning"):
        SPPPruner(model, x, global_pruning=True)


def test_coupled_channels_share_one_probability(one_thread):
    torch.manual_seed(0)
    model = build_model("resnet20", width=0.25)
    x, y = _data()
    pruner = SPPPruner(model, x[:1], pruning_ratio=0.5, interval=1, A=0.5, ignored_layers=[model.fc], seed=1)
    assert model.training  # tracing does not leave the model in eval mode
    n_groups = len(list(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                                 root_module_types=pruner.root_module_types)))
    probs = pruner.probabilities()
    assert len(probs) == n_groups == 9 + 3  # one per block's inner conv, one per stage
    assert "conv1" in probs and "layer1.0.conv2" not in probs  # layer1's residual adds: one group
    assert probs["conv1"].shape == (4,)

    seen = {}
    stage = [model.bn1] + [blk.bn2 for blk in model.layer1]
    for bn in stage:  # runs after the pruner's hook, so it sees the masked output
        bn.register_forward_hook(lambda m, i, o: seen.__setitem__(m, o.detach()))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    dropped = 0
    for _ in range(6):
        _train_step(model, opt, x, y)
        pruner.update()
        model(x)
        keep = pruner._by_root[model.conv1].state.keep
        dropped += int((~keep).sum())
        for bn in stage:
            zero = seen[bn].abs().amax(dim=(0, 2, 3)) == 0
            assert torch.equal(zero, ~keep)  # every coupled layer drops the same channels
    assert dropped > 0


def test_masked_channels_get_zero_gradients(one_thread):
    torch.manual_seed(0)
    model = build_model("resnet20", width=0.25)
    x, y = _data()
    pruner = SPPPruner(model, x[:1], pruning_ratio=0.5, interval=1, A=0.4, ignored_layers=[model.fc], seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    checked = 0
    for _ in range(4):
        _train_step(model, opt, x, y)
        pruner.update()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for t in pruner._tracked:
            dead = ~t.state.keep
            for module, idxs, entries in t.items:
                rows = idxs[dead[entries]]
                if rows.numel() == 0:
                    continue
                checked += 1
                assert module.weight.grad[rows].abs().max() == 0
                if isinstance(module, nn.BatchNorm2d):
                    assert module.bias.grad[rows].abs().max() == 0
            consumers = [it for it in t.group if pruner.DG.is_in_channel_pruning_fn(it.dep.handler)
                         and isinstance(it.dep.target.module, nn.Conv2d)]
            for it in consumers:  # the next layers' input slices see zeros
                cols = torch.tensor([i for i, r in zip(it.idxs, it.root_idxs) if dead[r % t.size]],
                                    dtype=torch.long)
                if cols.numel():
                    assert it.dep.target.module.weight.grad[:, cols].abs().max() == 0
    assert checked > 0
    # channels at p = 1 stay exactly zero despite momentum and weight decay
    for t in pruner._tracked:
        for module, idxs, entries in t.items:
            rows = idxs[t.state.removed[entries]]
            if rows.numel():
                assert module.weight[rows].abs().max() == 0


@pytest.mark.slow
def test_resnet56_prunes_to_target_and_matches_the_masked_model(one_thread):
    torch.manual_seed(0)
    model = build_model("resnet56", width=0.25)
    batches = [_data(seed=s) for s in range(3)]
    x0 = batches[0][0]
    dense_macs, _ = tp.utils.count_ops_and_params(model, x0[:1])
    pruner = SPPPruner(model, x0[:1], pruning_ratio=0.5, interval=1, A=0.5, ignored_layers=[model.fc])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    it = 0
    while not pruner.finished:
        x, y = batches[it % len(batches)]
        _train_step(model, opt, x, y)
        pruner.update()
        it += 1
        assert it <= 300, "SPP did not reach its targets"
    for name, info in pruner.summary().items():
        assert info["removed"] == info["target"] == math.ceil(0.5 * info["channels"]), name
    for p in pruner.probabilities().values():
        assert bool(((p == 0) | (p == 1)).all())

    model.eval()
    with torch.no_grad():
        masked = model(x0)
    assert pruner.importance(pruner._tracked[0].group).tolist().count(0.0) == pruner._tracked[0].state.target
    pruner.step()
    assert not any(m._forward_hooks for m in model.modules())
    with torch.no_grad():
        pruned = model(x0)
    assert torch.allclose(pruned, masked, atol=1e-4)
    macs, _ = tp.utils.count_ops_and_params(model, x0[:1])
    assert macs < 0.6 * dense_macs
    assert model.conv1.out_channels == 2 and model.layer3[0].conv1.out_channels == 8
    with pytest.raises(RuntimeError, match="after step"):
        pruner.update()


def test_checkpoint_resumes_with_identical_probabilities_and_masks(one_thread):
    torch.manual_seed(0)
    model = build_model("resnet20", width=0.25)
    x, _ = _data()
    twin = copy.deepcopy(model)
    pruner = SPPPruner(model, x[:1], pruning_ratio=0.5, A=0.2, interval=2, ignored_layers=[model.fc], seed=5)
    for _ in range(3):
        pruner.update()
    saved = copy.deepcopy(pruner.state_dict())
    weights = copy.deepcopy(model.state_dict())
    trail = []
    for _ in range(4):
        pruner.update()
        trail.append((pruner.probabilities(), [t.state.keep.clone() for t in pruner._tracked]))

    resumed = SPPPruner(twin, x[:1], pruning_ratio=0.5, A=0.2, interval=2, ignored_layers=[twin.fc], seed=0)
    twin.load_state_dict(weights)
    resumed.load_state_dict(saved)
    assert resumed.steps == 3
    for probs, keeps in trail:
        resumed.update()
        assert all(torch.equal(probs[k], v) for k, v in resumed.probabilities().items())
        assert all(torch.equal(a, t.state.keep) for a, t in zip(keeps, resumed._tracked))

    other = SPPPruner(build_model("resnet20", width=0.5), x[:1], ignored_layers=[])
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict(saved)


def test_early_step_warns_and_removes_only_channels_at_p_one(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    x = torch.randn(4, 3, 8, 8)
    pruner = SPPPruner(model, x[:1], pruning_ratio=0.5, interval=1, A=0.5, ignored_layers=[model[8]], seed=0)
    first = pruner._by_root[model[0]].state
    while first.n_removed == 0:
        pruner.update()
    assert not pruner.finished
    removed = {m: pruner._by_root[m].state.n_removed for m in (model[0], model[3])}
    model.eval()
    with torch.no_grad():
        masked = model(x)
    with pytest.warns(UserWarning, match="before every group reached its target"):
        pruner.step()
    assert model[0].out_channels == 8 - removed[model[0]] and model[3].out_channels == 8 - removed[model[3]]
    with torch.no_grad():
        assert torch.allclose(model(x), masked, atol=1e-5)


def test_importance_reports_survival_or_l1_ranks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([3.0, 1.0, 4.0, 2.0]).view(4, 1, 1, 1).expand(4, 3, 1, 1))
    x = torch.randn(1, 3, 4, 4)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    group = DG.get_pruning_group(model[0], tp.prune_conv_out_channels, [0, 1, 2, 3])
    assert torch.allclose(group_l1(group), torch.tensor([9.0, 3.0, 12.0, 6.0]))
    assert torch.allclose(SPPImportance()(group), torch.tensor([2 / 3, 0.0, 1.0, 1 / 3]))

    pruner = SPPPruner(model, x, pruning_ratio=0.5, interval=1, A=0.3, ignored_layers=[model[2]])
    pruner.update()
    imp = pruner.importance
    scores = imp(group)
    assert scores.shape == (4,)
    assert torch.allclose(scores, 1 - pruner.probabilities()["0"].float())
    assert scores[1] == pytest.approx(0.7)  # the weakest filter gained p = A

    other = build_model("resnet20", width=0.25)
    tp.pruner.MetaPruner(other, torch.randn(1, 3, 32, 32), importance=SPPImportance(), pruning_ratio=0.5,
                         ignored_layers=[other.fc]).step()
    assert other.conv1.out_channels == 2


@pytest.mark.parametrize("rescale", [True, False])
def test_survivors_are_scaled_by_their_keep_probability_on_finishing(rescale):
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1.0, 5.0).view(4, 1, 1, 1).expand(4, 3, 1, 1))
        model[1].weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        model[1].bias.fill_(0.5)
    pruner = SPPPruner(model, torch.randn(1, 3, 4, 4), pruning_ratio=0.5, interval=1, A=0.5,
                       ignored_layers=[model[3]], rescale_survivors=rescale)
    state = pruner._by_root[model[0]].state
    state.probabilities.copy_(torch.tensor([0.99, 0.99, 0.3, 0.0], dtype=torch.float64))
    pruner.update()  # channels 0 and 1 reach p = 1; channel 2 sits at rank N_left (delta 0)
    assert pruner.finished and state.removed.tolist() == [True, True, False, False]
    assert state.probabilities.tolist() == [1.0, 1.0, 0.0, 0.0]
    q = 0.7 if rescale else 1.0
    assert torch.allclose(model[1].weight, torch.tensor([0.0, 0.0, 3.0 * q, 4.0]))
    assert torch.allclose(model[1].bias, torch.tensor([0.0, 0.0, 0.5 * q, 0.5]))
    assert torch.equal(model[0].weight[2:, 0, 0, 0], torch.tensor([3.0, 4.0]))  # BN undoes conv scales
    assert model[0].weight[:2].abs().max() == 0


def test_pruning_ratio_dict_sets_a_groups_target():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1))
    pruner = SPPPruner(model, torch.randn(1, 3, 9, 9), pruning_ratio=0.5, ignored_layers=[model[4]],
                       pruning_ratio_dict={model[2]: 0.25})
    assert {k: v["target"] for k, v in pruner.summary().items()} == {"0": 4, "2": 2}
    with pytest.raises(ValueError, match=r"pruning_ratio_dict values must be in \[0, 1\)"):
        SPPPruner(model, torch.randn(1, 3, 9, 9), pruning_ratio_dict={model[2]: 1.0})
