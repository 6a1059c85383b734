"""DBP's measurements: pooled features from forward hooks, linear probes, and the Fisher ratio.

Framework-free: plain modules and tensors. A probe is a multinomial logistic regression on
globally average-pooled, standardised features, fitted by full-batch L-BFGS in float64; its
held-out accuracy is the discrimination of the features.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import DBPError
from .blocks import call_model, modes, restore

__all__ = [
    "check_finite_features",
    "check_finite_model",
    "check_labels",
    "collect_features",
    "fisher_ratio",
    "probe",
    "probes",
    "split",
]


def _batches(data: Iterable, num_batches: Optional[int]):
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    for i, batch in enumerate(data):
        if num_batches is not None and i >= num_batches:
            break
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DBPError(f"data must yield (inputs, labels) batches; batch {i} is a {type(batch).__name__}")
        x, y = batch[0], batch[1]
        if not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y)
        if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
            raise DBPError(f"data batch {i}: labels must be a 1-D tensor of integer class indices, got "
                           f"dtype {y.dtype} and shape {tuple(y.shape)}")
        yield x, y.long()


def _pool(t: torch.Tensor) -> torch.Tensor:
    """Global average pooling to ``[batch, channels]``."""
    if t.dim() >= 3:
        return t.flatten(2).mean(2)
    if t.dim() == 2:
        return t
    return t.reshape(t.shape[0], -1)


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def collect_features(model: nn.Module, points: Mapping[str, Tuple[nn.Module, str]], data: Iterable,
                     num_batches: Optional[int] = None, progress: bool = False, desc: str = "DBP features",
                     strict: bool = True) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, Any]:
    """Globally pooled features at several points of ``model``, from one pass over ``data``.

    Args:
        model: the network, run in eval mode under ``torch.no_grad`` (modes restored afterwards).
        points: ``{key: (module, "in" | "out")}``: pool the module's (first) input or its output.
        data: ``(inputs, labels)`` batches.
        num_batches: how many batches to use (``None``: all).
        progress: show a tqdm bar.
        desc: the bar's label.
        strict: raise :class:`DBPError` when a point does not run exactly once per forward pass;
            with ``False`` such points are left out of the result instead.

    Returns:
        ``(features, labels, out_dim)``: ``features[key]`` is ``[N, C]`` (float64), ``labels`` is
        ``[N]``, ``out_dim`` the size of the model output's last dimension (``None`` if not 2-D).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU())
        >>> data = [(torch.randn(4, 1, 5, 5), torch.tensor([0, 1, 0, 1]))]
        >>> f, y, _ = collect_features(net, {"conv": (net[0], "out")}, data)
        >>> f["conv"].shape, y.tolist()
        (torch.Size([4, 3]), [0, 1, 0, 1])
    """
    from tqdm.auto import tqdm

    store: Dict[str, List[torch.Tensor]] = {k: [] for k in points}
    handles = _register_points(points, store)
    saved = modes(model)
    model.eval()
    device = _device_of(model)
    labels: List[torch.Tensor] = []
    out_dim = None
    dropped: set = set()
    try:
        total = num_batches
        if total is None and hasattr(data, "__len__"):
            total = len(data)  # type: ignore[arg-type]
        for x, y in tqdm(_batches(data, num_batches), total=total, desc=desc, leave=False, disable=not progress):
            x = x.to(device) if isinstance(x, torch.Tensor) else x
            before = {k: len(v) for k, v in store.items()}
            try:
                out = call_model(model, x)
            except Exception as e:
                raise DBPError(f"the forward pass of {type(model).__name__} on a data batch failed: "
                               f"{type(e).__name__}: {e}") from e
            if isinstance(out, torch.Tensor) and out.dim() == 2:
                out_dim = int(out.shape[1])
            _check_batch(store, before, int(y.shape[0]), dropped, strict)
            labels.append(y.cpu())
    finally:
        for h in handles:
            h.remove()
        restore(saved)
    if not labels:
        raise DBPError("data yielded no batches")
    return {k: torch.cat(v) for k, v in store.items() if k not in dropped}, torch.cat(labels), out_dim


def _register_points(points: Mapping[str, Tuple[nn.Module, str]], store: Dict[str, List[torch.Tensor]]) -> list:
    """Hooks appending each point's pooled float64 features to ``store[key]``; returns their handles."""
    for key, (_module, where) in points.items():
        if where not in ("in", "out"):
            raise ValueError(f"points[{key!r}]: where must be 'in' or 'out', got {where!r}")
    handles = []
    for key, (module, where) in points.items():
        if where == "in":
            handles.append(module.register_forward_pre_hook(
                lambda m, a, _k=key: store[_k].append(_pool(a[0].detach()).double().cpu())))
        else:
            handles.append(module.register_forward_hook(
                lambda m, a, o, _k=key: store[_k].append(_pool(o.detach()).double().cpu())))
    return handles


def _check_batch(store: Mapping[str, List[torch.Tensor]], before: Mapping[str, int], batch: int, dropped: set,
                 strict: bool) -> None:
    """Each point ran once on this batch and saw ``batch`` samples; otherwise raise (``strict``) or drop it."""
    for k, v in store.items():
        if k in dropped:
            continue
        ok = len(v) == before[k] + 1 and v[-1].shape[0] == batch
        if not ok and not strict:
            dropped.add(k)
            continue
        if len(v) != before[k] + 1:
            raise DBPError(f"feature point {k!r} ran {len(v) - before[k]} times in one forward pass; "
                           "it must run exactly once")
        if v[-1].shape[0] != batch:
            raise DBPError(f"feature point {k!r} has batch size {v[-1].shape[0]} but the labels "
                           f"have {batch}")


def check_finite_model(model: nn.Module) -> None:
    """:class:`DBPError` naming the first layer whose parameters or buffers hold NaN/Inf values."""
    for name, m in model.named_modules():
        for key, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise DBPError(f"layer {name or type(model).__name__!r}: {key} holds NaN/Inf values; DBP cannot "
                               "score features computed from it")


def check_finite_features(feats: Mapping[str, torch.Tensor], keys: Iterable[str]) -> None:
    """:class:`DBPError` naming the first of ``keys`` (``"in:<name>"`` / ``"out:<name>"``) whose features
    hold NaN/Inf values."""
    for key in keys:
        f = feats.get(key)
        if f is not None and not bool(torch.isfinite(f).all()):
            where, _, name = key.partition(":")
            raise DBPError(f"the {'input' if where == 'in' else 'output'} of {name!r} holds NaN/Inf values on the "
                           "data (NaN inputs or an overflow); DBP cannot score it")


def check_labels(labels: torch.Tensor, num_classes: Optional[int], out_dim: Optional[int]) -> int:
    """Validate labels against the class count the probe expects; return that count."""
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 2):
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    expected = num_classes if num_classes is not None else out_dim
    lo, hi = int(labels.min()), int(labels.max())
    if expected is None:
        expected = hi + 1
        source = "inferred from the labels"
    else:
        source = "num_classes" if num_classes is not None else "the model's output size"
    if lo < 0 or hi >= expected:
        raise DBPError(f"labels must lie in [0, {expected - 1}] ({expected} classes, {source}); "
                       f"the data holds labels from {lo} to {hi}")
    present = torch.unique(labels)
    if present.numel() < 2:
        raise DBPError(f"the data holds only class {int(present[0])}: a discrimination probe needs at least 2 classes")
    if present.numel() < expected:
        missing = sorted(set(range(expected)) - set(present.tolist()))
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise DBPError(f"the probe expects {expected} classes ({source}) but the data holds only "
                       f"{present.numel()} (missing: {shown}); use more batches (num_batches), a shuffled "
                       "loader, or num_classes=...")
    return expected


def split(n: int, holdout: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(train, held-out)`` sample indices: a seeded permutation of ``range(n)``, ``holdout`` of it held out.

    Example:
        >>> train, test = split(8, 0.25, seed=0)
        >>> len(train), len(test), sorted(train.tolist() + test.tolist()) == list(range(8))
        (6, 2, True)
    """
    if not isinstance(holdout, (int, float)) or isinstance(holdout, bool) or not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout!r}")
    n_test = int(round(n * holdout))
    if n_test < 1 or n - n_test < 2:
        raise DBPError(f"{n} labelled samples are too few to train and score a probe "
                       f"(holdout={holdout}); use more batches")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[n_test:], perm[:n_test]


def _lbfgs(loss_and_grad: Callable[[torch.Tensor], Tuple[float, torch.Tensor]], theta: torch.Tensor,
           max_iter: int, history: int = 10, tol: float = 1e-10) -> torch.Tensor:
    """Minimise a smooth convex function by L-BFGS with a backtracking (Armijo) line search.

    Plain tensor arithmetic only: every step is elementwise in ``theta`` apart from a few global
    scalars, so coordinates of ``theta`` that start equal and see equal gradients stay equal.
    """
    f, g = loss_and_grad(theta)
    steps: List[Tuple[torch.Tensor, torch.Tensor, float]] = []
    for _ in range(max_iter):
        if float(g.abs().max()) <= tol:
            break
        q = g.clone()
        alphas = []
        for s_, y_, rho in reversed(steps):
            a = rho * float(s_ @ q)
            q -= a * y_
            alphas.append(a)
        if steps:
            s_, y_, _ = steps[-1]
            q *= float(s_ @ y_) / float(y_ @ y_)
        else:
            q *= min(1.0, 1.0 / float(g.abs().sum()))
        for (s_, y_, rho), a in zip(steps, reversed(alphas)):
            q += (a - rho * float(y_ @ q)) * s_
        d = -q
        slope = float(g @ d)
        if slope >= 0:  # not a descent direction: restart from the gradient
            steps.clear()
            d = -g * min(1.0, 1.0 / float(g.abs().sum()))
            slope = float(g @ d)
        t = 1.0
        while True:
            new = theta + t * d
            f_new, g_new = loss_and_grad(new)
            if f_new <= f + 1e-4 * t * slope or t < 1e-10:
                break
            t *= 0.5
        s_, y_ = new - theta, g_new - g
        sy = float(s_ @ y_)
        if sy > 1e-16:
            steps.append((s_, y_, 1.0 / sy))
            if len(steps) > history:
                steps.pop(0)
        done = abs(f - f_new) <= 1e-14 * max(1.0, abs(f))
        theta, f, g = new, f_new, g_new
        if done:
            break
    return theta


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
          num_classes: int, weight_decay: float = 1e-3, max_iter: int = 100) -> Tuple[float, float]:
    """Held-out ``(accuracy, cross-entropy)`` of a multinomial logistic-regression probe.

    One probe of :func:`probes`.

    Example:
        >>> x = torch.tensor([[0.], [1.], [2.], [3.], [10.], [11.], [12.], [13.]])
        >>> y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
        >>> acc, loss = probe(x[::2], y[::2], x[1::2], y[1::2], num_classes=2)
        >>> acc
        1.0
    """
    idx = torch.arange(train_x.shape[0] + test_x.shape[0])
    x = torch.cat([train_x, test_x])
    y = torch.cat([train_y, test_y])
    return probes([x], y, idx[:train_x.shape[0]], idx[train_x.shape[0]:], num_classes, weight_decay, max_iter)[0]


def probes(features: Sequence[torch.Tensor], labels: torch.Tensor, train_idx: torch.Tensor, test_idx: torch.Tensor,
           num_classes: int, weight_decay: float = 1e-3, max_iter: int = 100) -> List[Tuple[float, float]]:
    """Held-out ``(accuracy, cross-entropy)`` of one linear probe per feature matrix, fitted together.

    Each probe is a multinomial logistic regression on standardised features (the training
    part's mean and standard deviation), weights and bias started at zero, minimising mean
    cross-entropy plus ``weight_decay * ||W||^2``. The probes are independent problems; they are
    solved as one separable objective by full-batch L-BFGS in float64 with analytic gradients
    (one loop for all of them, no ``torch.optim``), which keeps equal feature matrices on equal
    iterates, so equal features score exactly equal.

    Args:
        features: ``[N, C_p]`` matrices (the channel count may differ between them).
        labels: ``[N]`` class indices.
        train_idx, test_idx: sample indices fitting and scoring the probes.
        num_classes: the probes' output size.
        weight_decay: L2 penalty on the weights (>= 0).
        max_iter: L-BFGS iterations.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    p = len(features)
    cmax = max(int(f.shape[1]) for f in features)
    n_tr, n_te = int(train_idx.numel()), int(test_idx.numel())
    xtr = torch.zeros(p, n_tr, cmax, dtype=torch.float64)
    xte = torch.zeros(p, n_te, cmax, dtype=torch.float64)
    for i, f in enumerate(features):
        f = f.double()
        a, t = f[train_idx], f[test_idx]
        mu = a.mean(0)
        sd = a.std(0, unbiased=False)
        sd = torch.where(sd > 1e-12, sd, torch.ones_like(sd))
        xtr[i, :, :f.shape[1]] = (a - mu) / sd
        xte[i, :, :f.shape[1]] = (t - mu) / sd
    ytr = labels[train_idx].long()
    yte = labels[test_idx].long()
    onehot = F.one_hot(ytr, num_classes).double().expand(p, n_tr, num_classes)
    n_w = p * cmax * num_classes

    def loss_and_grad(theta: torch.Tensor) -> Tuple[float, torch.Tensor]:
        w = theta[:n_w].view(p, cmax, num_classes)
        b = theta[n_w:].view(p, 1, num_classes)
        logp = torch.log_softmax(torch.bmm(xtr, w) + b, dim=2)
        loss = -(onehot * logp).sum() / n_tr + weight_decay * (w * w).sum()
        r = (logp.exp() - onehot) / n_tr
        gw = torch.bmm(xtr.transpose(1, 2), r) + 2.0 * weight_decay * w
        return float(loss), torch.cat([gw.reshape(-1), r.sum(1).reshape(-1)])

    theta = _lbfgs(loss_and_grad, torch.zeros(n_w + p * num_classes, dtype=torch.float64), max_iter)
    w = theta[:n_w].view(p, cmax, num_classes)
    b = theta[n_w:].view(p, 1, num_classes)
    out = []
    with torch.no_grad():
        logits = torch.bmm(xte, w) + b
        for i in range(p):
            acc = float((logits[i].argmax(1) == yte).double().mean())
            out.append((acc, float(F.cross_entropy(logits[i], yte))))
    return out


def fisher_ratio(features: torch.Tensor, labels: torch.Tensor, num_classes: Optional[int] = None) -> torch.Tensor:
    """Per channel: between-class variance / within-class variance of ``features[:, c]``.

    A channel whose classes do not overlap at all scores very high (its within-class variance is
    floored at ``1e-12`` of the channel's total variance); a constant channel scores 0.

    Example:
        >>> f = torch.tensor([[0., 5.], [0., 1.], [1., 2.], [1., 4.]])
        >>> fisher_ratio(f, torch.tensor([0, 0, 1, 1])).tolist()[1]
        0.0
    """
    x = features.double()
    k = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    onehot = F.one_hot(labels.long(), k).double()  # [N, K]
    counts = onehot.sum(0)
    present = counts > 0
    means = (onehot.t() @ x)[present] / counts[present, None]  # [K', C]
    mu = x.mean(0)
    n = x.shape[0]
    between = (counts[present, None] * (means - mu) ** 2).sum(0) / n
    total = ((x - mu) ** 2).sum(0) / n
    within = (total - between).clamp_min(0)
    floor = 1e-12 * total + 1e-300
    ratio = between / torch.maximum(within, floor)
    return torch.where(total > 0, ratio, torch.zeros_like(ratio))

