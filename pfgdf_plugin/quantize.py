"""Quantization of a (pruned) model with NNI's quantizers, and the evaluator both stages share.

NNI's quantizers (``QATQuantizer``, ``PtqQuantizer``, ``LsqQuantizer``) wrap every targeted
layer and simulate integer arithmetic in its forward pass; :func:`quantize` drives them over a
recipe's data through one :class:`nni.compression.utils.TorchEvaluator` built by
:func:`torch_evaluator`, which training-aware pruners (SPP, MPD) use too. That shared evaluator
is what lets a pruner and a quantizer run in one training loop
(``QATQuantizer.from_compressor(pruner, ...)``, see :func:`fuse`).

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from pfgdf_plugin.models import build_model
    >>> net = build_model("lenet5", num_classes=4)
    >>> data = DataLoader(TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,))), batch_size=8)
    >>> res = quantize(net, QuantizeConfig(method="ptq", calibration_batches=2), data)
    >>> layers = (torch.nn.Conv2d, torch.nn.Linear)
    >>> sorted(res.calibration) == sorted(n for n, m in net.named_modules() if isinstance(m, layers))
    True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import QuantizeError
from .train import TrainConfig, train

METHODS = ("qat", "ptq", "lsq")
SCHEMES = ("affine", "symmetric")
TARGETS = {"input": "_input_", "weight": "weight", "output": "_output_"}


@dataclass
class QuantizeConfig:
    """The recipe's ``quantize:`` section.

    Attributes:
        method: ``qat`` | ``ptq`` | ``lsq``, or ``None`` for no quantization.
        bits: integer width of weights and activations (2..8).
        scheme: ``affine`` | ``symmetric``; ``None`` picks ``symmetric`` for LSQ (which only
            supports it) and ``affine`` otherwise.
        targets: what to quantize in each Conv2d/Linear: ``input``, ``weight``, ``output``.
        epochs: quantization-aware training epochs (QAT, LSQ); fractions allowed.
        lr: learning rate of that training (SGD with momentum, cosine schedule).
        calibration_batches: batches PTQ observes to fix its ranges.
        fused: run the quantizer in the pruner's own training loop
            (``from_compressor``); training-aware NNI pruners only (SPP, MPD). The pruned model
            is then quantized once more after fine-tuning, so the reported model is calibrated
            on its final weights.
    """

    method: Optional[str] = None
    bits: int = 8
    scheme: Optional[str] = None
    targets: List[str] = field(default_factory=lambda: ["input", "weight", "output"])
    epochs: float = 1.0
    lr: float = 0.001
    calibration_batches: int = 20
    fused: bool = False

    def validate(self, prefix: str = "quantize") -> List[str]:
        """Every problem of these settings, each naming ``<prefix>.<key>`` and the value."""
        from .config import range_problem

        errors = []
        if self.method is not None and self.method not in METHODS:
            errors.append(f"{prefix}.method must be one of {', '.join(METHODS)} or null; got {self.method!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            errors.append(f"{prefix}.bits must be in 2..8, got {self.bits!r}")
        if self.scheme is not None and self.scheme not in SCHEMES:
            errors.append(f"{prefix}.scheme must be one of {', '.join(SCHEMES)} or null; got {self.scheme!r}")
        if self.method == "lsq" and self.scheme == "affine":
            errors.append(f"{prefix}.scheme: NNI's LsqQuantizer supports only 'symmetric', got 'affine'")
        bad = [t for t in self.targets if not isinstance(t, str) or t not in TARGETS]
        if bad or not self.targets:
            errors.append(f"{prefix}.targets must be a non-empty list of {', '.join(TARGETS)}; got {self.targets!r}")
        for key, kw in (("epochs", dict(low=0, low_open=True)), ("lr", dict(low=0, low_open=True)),
                        ("calibration_batches", dict(low=1, integer=True))):
            problem = range_problem(f"{prefix}.{key}", getattr(self, key), **kw)
            if problem:
                errors.append(problem)
        if self.fused and self.method not in ("qat", "lsq"):
            errors.append(f"{prefix}.fused needs a training quantizer (qat or lsq), got method {self.method!r}")
        return errors

    def config_list(self) -> List[Dict[str, Any]]:
        """NNI's quantization config_list for every Conv2d and Linear."""
        scheme = self.scheme or ("symmetric" if self.method == "lsq" else "affine")
        return [{"op_types": ["Conv2d", "Linear"], "target_names": [TARGETS[t] for t in self.targets],
                 "quant_dtype": f"int{self.bits}", "quant_scheme": scheme}]


@dataclass
class QuantizeResult:
    """A quantized (NNI-wrapped) model, its quantizer and the calibration of every layer."""

    model: nn.Module
    quantizer: Any
    calibration: Dict[str, Dict[str, Dict[str, Any]]]
    steps: int = 0


def torch_evaluator(model: nn.Module, loader, cfg: TrainConfig, device: str = "cpu", progress: bool = False,
                    desc: str = "train (NNI)", on_step: Optional[Callable[[int, float], bool]] = None,
                    calibrate_only: bool = False, eval_batches: int = 4):
    """An NNI ``TorchEvaluator`` whose training loop is :func:`pfgdf_plugin.train.train` over ``loader``.

    Args:
        on_step: called after every optimiser step with ``(step, loss)``; a true return ends training.
        calibrate_only: the "training" only runs forward passes in eval mode without gradients
            (what post-training quantization needs to observe ranges).
        eval_batches: batches the evaluator's ``evaluate()`` runs forward (PTQ calls it to observe).
    """
    import nni
    from nni.compression.utils import TorchEvaluator

    def training_step(batch, net):
        x, y = batch
        return F.cross_entropy(net(x.to(device)), y.to(device))

    def training_func(net, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        if calibrate_only:
            _forward_batches(net, loader, max_steps or len(loader), device)
            return
        run_cfg = cfg
        if max_steps is not None:
            run_cfg = dataclasses.replace(cfg, epochs=max_steps / max(1, len(loader)))
        elif max_epochs is not None:
            run_cfg = dataclasses.replace(cfg, epochs=float(max_epochs))

        def step_hook(step: int, loss: float) -> bool:
            stop = on_step(step, loss) if on_step is not None else False
            return bool(stop) or (max_steps is not None and step >= max_steps)

        train(net, loader, run_cfg, device=device, desc=desc, progress=progress, on_step=step_hook,
              optimizer=optimizers, loss_fn=training_step, distributed=False)

    def evaluating_func(net):
        _forward_batches(net, loader, eval_batches, device)
        return None

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                           weight_decay=cfg.weight_decay)
    return TorchEvaluator(training_func, optimizer, training_step, evaluating_func=evaluating_func)


def _forward_batches(net: nn.Module, loader, n: int, device: str) -> None:
    net.eval()
    with torch.no_grad():
        for i, (x, _) in enumerate(loader):
            if i >= n:
                break
            net(x.to(device))


def _quantizer_class(method: str):
    from nni.compression.quantization import LsqQuantizer, PtqQuantizer, QATQuantizer

    return {"qat": QATQuantizer, "ptq": PtqQuantizer, "lsq": LsqQuantizer}[method]


def _targeted(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def check_calibration(calibration: Dict[str, Dict[str, Dict[str, Any]]], layers: List[str]) -> None:
    """Raise :class:`QuantizeError` unless every layer has a finite, positive scale for every target."""
    missing = [n for n in layers if n not in calibration]
    if missing:
        raise QuantizeError(f"quantizer left {len(missing)} layer(s) without calibration: {', '.join(missing[:5])}")
    for name in layers:
        for target, info in calibration[name].items():
            scale = info.get("scale")
            if not isinstance(scale, torch.Tensor) or not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
                raise QuantizeError(f"layer {name!r}, target {target!r}: no usable scale after calibration "
                                    f"({scale!r}); the data never reached it")


def quantize(model: nn.Module, cfg: QuantizeConfig, loader, device: str = "cpu",
             progress: bool = False) -> QuantizeResult:
    """Quantize ``model`` in place with NNI's quantizer ``cfg.method`` over ``loader``.

    The model comes back wrapped by NNI: its forward simulates ``cfg.bits``-bit arithmetic in
    every Conv2d and Linear; ``result.quantizer.unwrap_model()`` restores plain float layers.

    Raises:
        QuantizeError: a bad setting, or a layer the data never calibrated.
    """
    errors = cfg.validate()
    if cfg.method is None:
        errors.append("quantize.method is null: nothing to do")
    if errors:
        raise QuantizeError("; ".join(errors))
    if len(loader) == 0:
        raise QuantizeError("quantization needs data: the loader is empty")
    layers = _targeted(model)
    if not layers:
        raise QuantizeError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
    train_cfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr)
    ptq = cfg.method == "ptq"
    evaluator = torch_evaluator(model, loader, train_cfg, device, progress, desc=f"{cfg.method} (quantize)",
                                calibrate_only=ptq, eval_batches=min(cfg.calibration_batches, len(loader)))
    quantizer = _quantizer_class(cfg.method)(model, cfg.config_list(), evaluator)
    steps = cfg.calibration_batches if ptq else max(1, int(math.ceil(cfg.epochs * len(loader))))
    _, calibration = quantizer.compress(max_steps=steps, max_epochs=None)
    model.eval()
    check_calibration(calibration, layers)
    return QuantizeResult(model, quantizer, calibration, steps)


def fuse(pruner, cfg: QuantizeConfig, evaluator):
    """A quantizer that runs inside ``pruner``'s training loop (NNI's ``from_compressor``).

    Call ``compress(max_steps, None)`` on the returned quantizer instead of on the pruner; its
    ``get_calibration_config()`` then covers every Conv2d and Linear, and ``unwrap_model()``
    removes both compressors' wrappers.
    """
    errors = cfg.validate()
    if not cfg.fused:
        errors.append("quantize.fused is false")
    if errors:
        raise QuantizeError("; ".join(errors))
    return _quantizer_class(cfg.method).from_compressor(pruner, cfg.config_list(), evaluator=evaluator)


def onnx_int8(float_onnx: str, out_path: str, loader, batches: int = 8, per_channel: bool = False) -> None:
    """Write a static int8 (QDQ) ONNX model of ``float_onnx``, calibrated on ``batches`` of ``loader``.

    ONNX Runtime's own post-training quantizer does the rewriting; use it on the float export
    of a QAT-trained model to get an integer model whose weights were trained for it.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(loader)
            self.left = batches

        def get_next(self):
            if self.left <= 0:
                return None
            self.left -= 1
            try:
                x, _ = next(self.it)
            except StopIteration:
                return None
            return {"input": x.numpy()}

    quantize_static(float_onnx, out_path, _Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
