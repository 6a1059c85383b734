"""The building blocks of a run that a recipe and a bench share: data, the dense model with its
cache, pruning, fine-tuning and measuring.

The recipe's stages (:mod:`.stages`) call these with a run's settings; ``pfgdf-plugin bench``
calls them once for the dense model and once per entry.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .. import measure
from ..data import build_dataset, make_loaders
from ..errors import ConfigError, DataNotFoundError, RunError
from ..models import build_model, build_pretrained, check_input
from ..models import logger as models_logger
from ..pruning import PruneResult
from ..train import Checkpointing, TrainConfig, atomic_save, train
from ..weights import fit_state_dict, read_state_dict


@dataclass
class Data:
    """A data set with its loaders and one example input (batch of 1) for tracing and measuring."""

    spec: Any
    train_loader: Any
    test_loader: Any
    example: torch.Tensor

    @property
    def input_shape(self) -> tuple:
        return tuple(self.example.shape[1:])

    def describe(self, name: str) -> str:
        return f"{name} ({len(self.spec.train)} train / {len(self.spec.test)} test, {self.input_shape})"


def load_data(section, seed: int) -> Data:
    """Build the data set of a recipe's (or a bench's) ``data`` section and its seeded loaders."""
    d = section
    spec = build_dataset(d.name, root=d.root, image_size=d.image_size, in_channels=d.in_channels,
                         limit_train=d.limit_train, limit_test=d.limit_test, seed=seed)
    train_loader, test_loader = make_loaders(spec, d.batch_size, workers=d.workers, seed=seed)
    return Data(spec, train_loader, test_loader, next(iter(test_loader))[0][:1])


def new_model(section, data: Data, log: Optional[Callable[[str], None]] = None) -> nn.Module:
    """The model of a ``model`` section, sized for ``data`` (classes, channels, image side), freshly
    initialised or with the section's ``weights`` (torchvision's pretrained weights from the local
    cache, or a state dict file; a head for another number of classes is replaced).

    Args:
        section: the ``model`` section (``name``, ``width``, optional ``weights``).
        data: the data the model is sized for.
        log: where notes go (a replaced head); default: ``pfgdf_plugin.models``' logger.

    Raises:
        ConfigError: the model cannot take the data's inputs (too small for its poolings, or a
            layer whose size does not follow the input); raised before any training, naming the
            model and the size. Also an unknown weights name or weights for another architecture.
        DataNotFoundError: the weights file is missing; the message says which file to put where.
    """
    weights = getattr(section, "weights", None)
    sizes = dict(num_classes=data.spec.num_classes, in_channels=data.spec.in_channels, width=section.width,
                 image_size=data.spec.image_size)
    try:
        if weights is None:
            model, notes = build_model(section.name, **sizes), []
        else:
            model, notes = build_pretrained(section.name, weights, **sizes)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError([f"model.name {section.name!r} cannot be built for {data.input_shape} inputs: {e}"],
                          "model") from None
    for note in notes:
        (log or models_logger.info)(note)
    check_input(model, section.name, data.example)
    return model


def load_checkpoint(model: nn.Module, path: str, log: Optional[Callable[[str], None]] = None) -> None:
    """Load a plain state dict (or a dict with ``state_dict``) with ``weights_only=True``, in place.

    A classifier head sized for another number of classes is kept as built (noted to ``log``);
    anything else that differs is an error and ``model`` is left untouched.

    Raises:
        RunError: no such file, a file that is not a state dict, or one for another architecture;
            the message names the file and the first missing/unexpected keys and mismatching shapes.
    """
    try:
        notes = fit_state_dict(model, read_state_dict(path), f"model.checkpoint {path}")
    except (ConfigError, DataNotFoundError) as e:
        detail = str(e)[len("model: "):] if str(e).startswith("model: ") else str(e)
        raise RunError(detail) from None
    for note in notes:
        (log or models_logger.info)(note)


def dense_weights(model: nn.Module, cache: str, fit: Optional[Callable[[], Any]], checkpoint: Optional[str] = None,
                  cached: Optional[bool] = None, write: bool = True, wrap: bool = True) -> None:
    """Give ``model`` its dense weights: from ``cache`` when it holds them, else from ``checkpoint``,
    else by calling ``fit`` (no call: the weights stay as built); then write the cache.

    Args:
        cache: the file the dense weights are kept in (a run's ``dense.pt``, a bench's keyed file).
        fit: trains ``model`` in place.
        checkpoint: a user's state dict to start from instead of training.
        cached: whether ``cache`` is to be read (``None``: whether it exists); distributed runs
            decide it once for every rank.
        write: write ``cache`` (only one rank of a distributed run does).
        wrap: write ``{"state_dict": ...}`` rather than a bare state dict.
    """
    cached = os.path.exists(cache) if cached is None else cached
    if cached:
        load_checkpoint(model, cache)
    elif checkpoint:
        load_checkpoint(model, checkpoint)
    elif fit is not None:
        fit()
    model.cpu().eval()
    if write and not cached:
        state = model.state_dict()
        atomic_save({"state_dict": state} if wrap else state, cache)


def measure_model(model: nn.Module, data: Data, device: str, desc: str, progress: bool) -> Dict[str, Any]:
    """Size (params, MACs, filters) and test accuracy of ``model``."""
    out = measure.summarize(model, data.example)
    out.update(measure.evaluate(model, data.test_loader, device, desc, progress))
    return out


def prune_and_score(make: Callable[[], PruneResult], data: Data, device: str,
                    progress: bool) -> Tuple[PruneResult, Dict[str, Any], float]:
    """``(result, test metrics right after pruning, seconds pruning took)`` of ``make()``."""
    t = time.perf_counter()
    result = make()
    seconds = time.perf_counter() - t
    return result, measure.evaluate(result.model, data.test_loader, device, "eval pruned", progress), seconds


def finetune(model: nn.Module, loader, cfg: TrainConfig, device: str, desc: str, progress: bool,
             teacher: Optional[nn.Module] = None, on_epoch: Optional[Callable[[int], None]] = None,
             checkpoint: Optional[Checkpointing] = None) -> None:
    """Fine-tune a pruned ``model`` in place (optionally distilling from ``teacher``); leave it on the CPU
    in eval mode."""
    train(model, loader, cfg, device=device, desc=desc, teacher=teacher, progress=progress, on_epoch=on_epoch,
          checkpoint=checkpoint)
    model.cpu().eval()


def dense_key(model_section, data_section, train_cfg: TrainConfig, seed: int) -> str:
    """The key of a bench's cached dense model: its model, data and training sections and seed."""
    import hashlib
    import json

    from ..config import to_dict

    blob = json.dumps({"m": to_dict(model_section), "d": to_dict(data_section), "t": to_dict(train_cfg), "s": seed},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def cached_dense(model_section, data_section, train_cfg: TrainConfig, seed: int, data: "Data", work_dir: str,
                 progress: bool) -> nn.Module:
    """The benches' dense model: trained once per :func:`dense_key` and kept in ``work_dir`` as
    ``dense-<key>.pt`` (a plain bench and a Pareto bench of the same setting share it)."""
    cache = os.path.join(work_dir, f"dense-{dense_key(model_section, data_section, train_cfg, seed)}.pt")
    model = new_model(model_section, data)
    cached = os.path.exists(cache)
    print(f"reusing the dense model {cache}" if cached else
          f"training the dense model: {model_section.name} width {model_section.width:g}, "
          f"{len(data.spec.train)} images, {train_cfg.epochs:g} epochs", flush=True)
    dense_weights(model, cache, lambda: train(model, data.train_loader, train_cfg, desc="train dense",
                                              progress=progress), cached=cached, wrap=False)
    return model
