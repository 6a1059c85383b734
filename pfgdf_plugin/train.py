"""Training loops: seeded, with progress bars, atomic checkpoints and per-epoch records."""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")


#: What :func:`train` hands every sink after each epoch: ``sink(record, model)``.
EpochSink = Callable[[Dict[str, Any], nn.Module], None]
_SINKS: List[EpochSink] = []


@contextlib.contextmanager
def recording(sink: Optional[EpochSink]) -> Iterator[None]:
    """Send a record of every epoch that :func:`train` runs inside the block to ``sink``.

    After each full epoch (and after a last, partial one) ``sink(record, model)`` is called with
    ``record`` holding ``phase`` (the ``desc`` of that training), ``epoch`` (epochs trained, a
    fraction for a partial one), ``step``, ``loss`` (mean over the epoch's steps),
    ``train_accuracy`` (share of the epoch's training samples classified right; None with a
    custom ``loss_fn``) and ``lr`` (the learning rate of the epoch's last step). Trainings that a pruning
    method runs inside the block are recorded too. ``None`` records nothing.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> m = torch.nn.Linear(4, 2)
        >>> dl = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
        >>> seen = []
        >>> with recording(lambda record, model: seen.append(record)):
        ...     _ = train(m, dl, TrainConfig(epochs=1.5, lr=0.1), progress=False)
        >>> [(r["phase"], r["epoch"], r["step"]) for r in seen]
        [('train', 1.0, 2), ('train', 1.5, 3)]
    """
    if sink is None:
        yield
        return
    _SINKS.append(sink)
    try:
        yield
    finally:
        _SINKS.remove(sink)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A kill at any instant leaves either the old file or the new one, never half of one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class TrainConfig:
    """Settings of one training run (pretraining or fine-tuning)."""

    epochs: float = 1.0
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    distill_weight: float = 0.0
    distill_temperature: float = 4.0

    def validate(self, prefix: str = "train") -> List[str]:
        """Every problem of these settings, each naming ``<prefix>.<key>`` and the value.

        Example:
            >>> TrainConfig(lr=0.0, label_smoothing=1.5).validate("finetune")
            ['finetune.lr must be > 0, got 0.0', 'finetune.label_smoothing must be in [0, 1), got 1.5']
        """
        from .config import range_problem

        checks = (("epochs", dict(low=0)), ("lr", dict(low=0, low_open=True)),
                  ("momentum", dict(low=0, high=1, high_open=True)), ("weight_decay", dict(low=0)),
                  ("label_smoothing", dict(low=0, high=1, high_open=True)), ("distill_weight", dict(low=0, high=1)),
                  ("distill_temperature", dict(low=0, low_open=True)))
        errors = [p for key, kw in checks if (p := range_problem(f"{prefix}.{key}", getattr(self, key), **kw))]
        if self.optimizer not in OPTIMIZERS:
            errors.append(f"{prefix}.optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            errors.append(f"{prefix}.schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        return errors


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    total_steps = max(1, total_steps)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, total_steps // 3), gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


@dataclass
class Checkpointing:
    """Where and how often :func:`train` saves a resumable checkpoint.

    Attributes:
        path: the checkpoint file; when it exists as training starts, training resumes from it.
        every: optimiser steps between checkpoints; 0 saves at the end of every epoch only.
        extra: returns more JSON-like state to keep beside the training state (read it back
            with :func:`read_checkpoint`), e.g. a log of accuracies.
    """

    path: str
    every: int = 0
    extra: Optional[Callable[[], dict]] = None


def read_checkpoint(path: str) -> Optional[dict]:
    """The checkpoint at ``path`` (loaded with ``weights_only=True``), or ``None`` if there is none."""
    if not os.path.exists(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it to start "
                         "that stage over") from None


def _epoch_seed(base: int, epoch: int) -> int:
    return (base * 1_000_003 + epoch) % (2**63 - 1)


@dataclass
class _Position:
    """Where a training run stands: what a checkpoint saves and a resumed run starts from."""

    step: int = 0
    epoch: int = 0
    skip: int = 0  # batches of the current epoch already trained on
    base: int = 0  # the seed every epoch's batch order is drawn from
    running: Optional[float] = None  # smoothed loss
    rng: Optional[torch.Tensor] = None  # torch's RNG state to restore before the next batch


def _restore(checkpoint: Optional[Checkpointing], model: nn.Module, opt, sched, pos: _Position) -> None:
    """Load model, optimiser, schedule and position from ``checkpoint.path`` when it exists."""
    state = read_checkpoint(checkpoint.path) if checkpoint is not None else None
    if state is None:
        return
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"checkpoint {checkpoint.path} does not fit this model or optimiser "
                         f"({' '.join(str(e).splitlines()[:2])}); delete it to start that stage over") from None
    pos.step, pos.epoch, pos.skip, pos.base = state["step"], state["epoch"], state["batch"], state["base_seed"]
    pos.running, pos.rng = state["running_loss"], state["rng"]


def _save(checkpoint: Checkpointing, model: nn.Module, opt, sched, pos: _Position, batch_in_epoch: int) -> None:
    from . import distributed as dist

    if not dist.is_main():
        return
    blob = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "step": pos.step, "epoch": pos.epoch, "batch": batch_in_epoch, "base_seed": pos.base,
            "running_loss": pos.running, "rng": torch.get_rng_state(),
            "extra": checkpoint.extra() if checkpoint.extra else {}}
    atomic_save(blob, checkpoint.path)


def _loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, teacher: Optional[nn.Module],
          loss_fn: Optional[Callable[[tuple, nn.Module], torch.Tensor]], desc: str,
          step: int) -> Tuple[torch.Tensor, Optional[int]]:
    """Cross-entropy (with distillation from ``teacher``), or ``loss_fn``; an error when not finite.
    Also the number of samples classified right (None with ``loss_fn``)."""
    correct = None
    if loss_fn is not None:
        loss = loss_fn((x, y), net)
    else:
        out = net(x)
        correct = int((out.detach().argmax(1) == y).sum()) if out.dim() == 2 and y.dim() == 1 else None
        loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
        if teacher is not None and cfg.distill_weight > 0:
            with torch.no_grad():
                t_out = teacher(x)
            T = cfg.distill_temperature
            kd = F.kl_div(F.log_softmax(out / T, 1), F.softmax(t_out / T, 1), reduction="batchmean") * T * T
            loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * kd
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}; lower the learning rate")
    return loss, correct


@dataclass
class _EpochTally:
    """Loss and accuracy of the steps of one epoch, for the records of :func:`recording`."""

    steps: int = 0
    loss: float = 0.0
    correct: Optional[int] = 0
    seen: int = 0
    lr: float = float("nan")

    def add(self, loss: float, correct: Optional[int], n: int, lr: float) -> None:
        self.steps += 1
        self.lr = lr
        self.loss += loss
        self.correct = None if correct is None or self.correct is None else self.correct + correct
        self.seen += n

    def emit(self, lp: "_Loop", pos: "_Position", steps_per_epoch: int) -> None:
        """Hand the epoch's record to every sink; start a new tally."""
        if self.steps and _SINKS:
            record = {"phase": lp.desc, "epoch": round(pos.step / max(1, steps_per_epoch), 4), "step": pos.step,
                      "loss": self.loss / self.steps, "lr": self.lr,
                      "train_accuracy": None if self.correct is None else self.correct / max(1, self.seen)}
            for sink in list(_SINKS):
                sink(dict(record), lp.model)
        self.__init__()


@dataclass
class _Loop:
    """The fixed parts of one training run, for :func:`_run_epoch`."""

    model: nn.Module
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    loader: object
    cfg: TrainConfig
    device: str
    desc: str
    opt: torch.optim.Optimizer
    sched: object
    bar: object
    teacher: Optional[nn.Module]
    loss_fn: Optional[Callable]
    on_step: Optional[Callable[[int, float], None]]
    on_epoch: Optional[Callable[[int], None]]
    checkpoint: Optional[Checkpointing]
    tally: Optional[_EpochTally] = None
    after_backward: Optional[Callable[[nn.Module], None]] = None


def _run_epoch(lp: _Loop, pos: _Position, total: int) -> bool:
    """Train the rest of the current epoch; return whether training is over (``total`` reached or
    ``on_step`` said stop)."""
    steps_per_epoch = len(lp.loader)
    for i, (x, y) in enumerate(lp.loader):
        if i < pos.skip:  # batches this epoch already trained on before the checkpoint
            continue
        if pos.rng is not None:
            torch.set_rng_state(pos.rng)  # as it was when the checkpoint was written
            pos.rng = None
        x, y = x.to(lp.device), y.to(lp.device)
        loss, correct = _loss(lp.net, x, y, lp.cfg, lp.teacher, lp.loss_fn, lp.desc, pos.step)
        lp.opt.zero_grad(set_to_none=True)
        loss.backward()
        if lp.after_backward is not None:
            lp.after_backward(lp.model)
        lp.opt.step()
        lr = float(lp.opt.param_groups[0]["lr"])  # the rate this step used
        lp.sched.step()
        pos.step += 1
        pos.running = loss.item() if pos.running is None else 0.9 * pos.running + 0.1 * loss.item()
        lp.tally.add(loss.item(), correct, len(y), lr)
        lp.bar.set_postfix(loss=f"{pos.running:.3f}")
        lp.bar.update(1)
        stop = lp.on_step(pos.step, loss.item()) if lp.on_step is not None else False
        end_of_epoch = i == steps_per_epoch - 1
        if end_of_epoch:  # a full epoch ended, including the last one
            if lp.on_epoch is not None:
                lp.on_epoch(pos.epoch)
            pos.epoch += 1
            lp.tally.emit(lp, pos, steps_per_epoch)
        every = lp.checkpoint.every if lp.checkpoint is not None else 0
        if lp.checkpoint is not None and (end_of_epoch or (every and pos.step % every == 0)):
            _save(lp.checkpoint, lp.model, lp.opt, lp.sched, pos, 0 if end_of_epoch else i + 1)
        if pos.step >= total or stop:
            return True
    return False


def train(model: nn.Module, loader, cfg: TrainConfig, device: str = "cpu", desc: str = "train",
          teacher: Optional[nn.Module] = None, progress: bool = True,
          on_step: Optional[Callable[[int, float], None]] = None,
          on_epoch: Optional[Callable[[int], None]] = None,
          optimizer: Optional[torch.optim.Optimizer] = None,
          checkpoint: Optional[Checkpointing] = None,
          loss_fn: Optional[Callable[[tuple, nn.Module], torch.Tensor]] = None,
          distributed: Optional[bool] = None,
          after_backward: Optional[Callable[[nn.Module], None]] = None) -> Dict[str, float]:
    """Train ``model`` in place for ``cfg.epochs`` epochs (fractions allowed) and return stats.

    Args:
        model: the network.
        loader: training batches ``(x, y)``.
        cfg: optimiser, schedule and distillation settings.
        teacher: optional model distilled from (``cfg.distill_weight`` > 0).
        on_step: called as ``on_step(step, loss)`` after every optimiser step; a true return
            value ends training there.
        on_epoch: called with the epoch index after each full epoch, before the epoch's record
            goes to the sinks of :func:`recording`.
        optimizer: use this optimiser (e.g. one an NNI evaluator patched) instead of building one
            from ``cfg``; the schedule still follows ``cfg``.
        checkpoint: save model, optimiser, schedule, position and random state atomically, and
            resume from ``checkpoint.path`` when it exists. A resumed run sees the same batches in
            the same order and ends with the same weights as an uninterrupted one: when the
            loader has a ``generator``, every epoch's order is drawn from a seed fixed at the
            start of training.
        loss_fn: ``loss_fn((x, y), model) -> loss`` instead of cross-entropy (and distillation),
            e.g. the ``training_step`` an NNI evaluator hands its training function (which NNI
            may have patched).
        distributed: train under DistributedDataParallel (``None``: whenever a process group of
            more than one process is active, see :mod:`pfgdf_plugin.distributed`). A
            ``DistributedSampler`` behind ``loader`` gets ``set_epoch`` every epoch; only rank 0
            writes checkpoints.
        after_backward: called as ``after_backward(model)`` after every ``loss.backward()`` and
            before the optimiser step, e.g. to add a penalty's subgradient to the gradients
            (network slimming's L1 on BatchNorm scales).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> dl = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
        >>> stats = train(m, dl, TrainConfig(epochs=1, lr=0.1), progress=False)
        >>> stats["steps"]
        2
    """
    errors = cfg.validate()
    if errors:
        raise ValueError("; ".join(errors))
    total = int(round(cfg.epochs * len(loader)))
    stats = {"steps": 0, "loss": float("nan")}
    if total == 0:
        return stats
    model.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    from . import distributed as dist

    use_ddp = dist.active() if distributed is None else bool(distributed) and dist.active()
    net = dist.wrap(model, device) if use_ddp else model
    opt = optimizer if optimizer is not None else make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, total)
    gen = getattr(loader, "generator", None)
    pos = _Position(base=int(torch.randint(0, 2**31 - 1, (1,), generator=gen).item()) if gen is not None else 0)
    _restore(checkpoint, model, opt, sched, pos)
    bar = tqdm(total=total, initial=pos.step, desc=desc, leave=False, disable=not progress, unit="step")
    lp = _Loop(model, net, loader, cfg, device, desc, opt, sched, bar,
               teacher, loss_fn, on_step, on_epoch, checkpoint, _EpochTally(), after_backward)
    sampler = getattr(loader, "sampler", None)
    while pos.step < total:
        if gen is not None:
            gen.manual_seed(_epoch_seed(pos.base, pos.epoch))
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(pos.epoch)
        if _run_epoch(lp, pos, total):
            break
        pos.skip = 0
    lp.tally.emit(lp, pos, len(loader))  # a last, partial epoch
    bar.close()
    if use_ddp:  # BatchNorm statistics are per rank under DDP: take rank 0's, like DDP's forward does
        dist.broadcast_buffers(model)
    stats.update(steps=pos.step, loss=float(pos.running))
    return stats
