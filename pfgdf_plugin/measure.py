"""Measurements of models: size, compute, accuracy and CPU latency."""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ExportError

__all__ = [
    "available_memory",
    "conv_params",
    "count_macs",
    "count_params",
    "evaluate",
    "filters_per_layer",
    "measure_latency",
    "model_bytes",
    "summarize",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def count_params(model: nn.Module) -> int:
    """Number of parameters (each shared tensor counted once).

    Example:
        >>> count_params(nn.Linear(4, 2))
        10
    """
    _check_module(model)
    return int(sum(p.numel() for p in model.parameters()))


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass, per sample.

    Uses ``torch_pruning.utils.count_ops_and_params``, which runs a deep copy
    of the model in eval mode, averages over the batch and counts a bias add
    as one MAC per output element. It does not see the batched matmul of
    :class:`pfgdf_plugin.modules.BlockDiagonalLinear`; those layers are added
    here with every weight they store (padding included: what ``bmm`` computes).

    Args:
        model: The model.
        example_inputs: A tensor, or a tuple/list of positional inputs, or a
            dict of keyword inputs.

    Example:
        >>> count_macs(nn.Conv2d(3, 8, 3, padding=1), torch.randn(1, 3, 8, 8))
        14336
    """
    _check_module(model)
    import torch_pruning as tp

    macs, _ = tp.utils.count_ops_and_params(model, example_inputs)
    if model_bytes(model) >= _COLLECT_BYTES:
        # the counter's deep copy holds reference cycles (methods bound onto it) that only a full
        # collection frees: without one, every count of a large model kept a copy of it alive
        gc.collect()
    return int(macs) + _block_diagonal_macs(model, example_inputs)


_COLLECT_BYTES = 64 * 2 ** 20  # a full collection (~0.1 s) costs less than copying this much


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers.

    Example:
        >>> model_bytes(nn.Linear(10, 10))  # 110 float32 values
        440
    """
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _proc_kb(path: str, key: str) -> Optional[int]:
    """Bytes of the ``key: <n> kB`` line of a ``/proc`` file, or ``None``."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> Optional[int]:
    """Bytes this process can still allocate, or ``None`` where it cannot be read (not Linux).

    The smaller of the system's available memory (``MemAvailable`` in ``/proc/meminfo``) and, under
    an address-space limit (``RLIMIT_AS``, as ``ulimit -v`` or a job scheduler sets), the room left
    below it (the limit minus the process's ``VmSize``).

    Example:
        >>> free = available_memory()
        >>> free is None or free > 0
        True
    """
    free, size = _proc_kb("/proc/meminfo", "MemAvailable"), _proc_kb("/proc/self/status", "VmSize")
    if free is None or size is None:
        return None
    import resource

    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        free = min(free, max(0, limit - size))
    return free


def call(model: nn.Module, example_inputs: Any) -> Any:
    """``model`` applied to a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _block_diagonal_macs(model: nn.Module, example_inputs: Any) -> int:
    from .modules import BlockDiagonalLinear

    layers = [m for m in model.modules() if isinstance(m, BlockDiagonalLinear)]
    if not layers:
        return 0
    rows: Dict[nn.Module, int] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out: rows.__setitem__(mod, inp[0].numel() // mod.in_features))
             for m in layers]
    modes = _modes(model)
    try:
        model.eval()
        with torch.no_grad():
            call(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
        _restore_modes(modes)
    first = example_inputs if isinstance(example_inputs, torch.Tensor) else next(
        v for v in (example_inputs.values() if isinstance(example_inputs, dict) else example_inputs)
        if isinstance(v, torch.Tensor))
    batch = max(1, first.shape[0])
    total = sum(r * (m.stored_weights() + (m.bias.numel() if m.bias is not None else 0)) for m, r in rows.items())
    return int(total // batch)


def filters_per_layer(model: nn.Module) -> Dict[str, int]:
    """Output channels of every conv and output features of every Linear.

    Args:
        model: The model.

    Returns:
        ``{module name: out_channels / out_features}`` in module order.

    Example:
        >>> filters_per_layer(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2)))
        {'0': 8, '2': 2}
    """
    _check_module(model)
    out: Dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, _CONV):
            out[name] = int(m.out_channels)
        elif isinstance(m, nn.Linear):
            out[name] = int(m.out_features)
    return out


def conv_params(model: nn.Module) -> int:
    """Parameters in conv layers (weights and biases).

    Example:
        >>> conv_params(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2)))
        224
    """
    _check_module(model)
    seen = set()
    total = 0
    for m in model.modules():
        if isinstance(m, _CONV):
            for p in m.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
    return int(total)


def _modes(model: nn.Module) -> Dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: Mapping[nn.Module, bool]) -> None:
    for m, training in modes.items():
        m.training = training


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: Union[str, torch.device] = "cpu",
    desc: str = "eval",
    progress: bool = True,
) -> Dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of a classifier on a loader.

    The model is moved to ``device`` and run in eval mode; the training mode
    of each of its modules is restored afterwards.

    Args:
        model: A classifier returning logits.
        loader: Iterable of ``(inputs, targets)`` batches.
        device: Where to run.
        desc: Label of the progress bar.
        progress: Show a tqdm bar (it disappears when done).

    Returns:
        ``{"accuracy": float in [0, 1], "loss": float}``.

    Raises:
        ValueError: The loader yielded no samples.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = DataLoader(TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)), batch_size=4)
        >>> sorted(evaluate(nn.Linear(4, 2), data, progress=False))
        ['accuracy', 'loss']
    """
    _check_module(model)
    from tqdm.auto import tqdm

    modes = _modes(model)
    model.to(device)
    model.eval()
    correct = 0
    total = 0
    loss_sum = 0.0
    try:
        for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TypeError("loader must yield (inputs, targets) batches")
            x, y = batch[0].to(device), batch[1].to(device)
            out = model(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(dim=1) == y).sum())
            total += int(y.numel())
    finally:
        _restore_modes(modes)
    if total == 0:
        raise ValueError("loader yielded no samples")
    return {"accuracy": correct / total, "loss": loss_sum / total}


def _rotations(n: int, repeat: int) -> Sequence[int]:
    k = repeat % n if n else 0
    return list(range(k, n)) + list(range(k))


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile of sorted values (as numpy's default)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure_latency(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 5,
    repeats: int = 30,
    threads: Optional[int] = None,
) -> Dict[str, Dict[int, Dict[str, float]]]:
    """CPU inference latency of several models, measured side by side.

    For each batch size and each repeat, every model runs once in turn, the
    starting model rotating from one repeat to the next, so that machine
    noise falls on all models alike. Models run in eval mode under
    ``torch.no_grad``; their modes are restored afterwards.

    Args:
        models: ``{name: model}``; every model must be on the CPU.
        input_shape: ``(C, H, W)`` of one sample.
        batch_sizes: Batch sizes to time.
        warmup: Untimed runs of each model before timing, per batch size.
        repeats: Timed runs of each model per batch size.
        threads: ``torch.set_num_threads`` during the measurement (restored
            afterwards); None keeps the current setting.

    Returns:
        ``result[name][batch_size] = {"median_ms", "p10_ms", "p90_ms"}``.

    Example:
        >>> r = measure_latency({"a": nn.Conv2d(3, 4, 3)}, (3, 8, 8), batch_sizes=(1,), repeats=3)
        >>> r["a"][1]["median_ms"] > 0
        True
    """
    shape, bss = _check_latency_args(models, input_shape, batch_sizes, warmup, repeats, threads)
    names = list(models)
    modes = {n: _modes(models[n]) for n in names}
    old_threads = torch.get_num_threads()
    result: Dict[str, Dict[int, Dict[str, float]]] = {n: {} for n in names}
    gen = torch.Generator().manual_seed(0)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        for m in models.values():
            m.eval()
        with torch.no_grad():
            for b in bss:
                timed = _time_interleaved(models, torch.randn((b,) + shape, generator=gen), warmup, repeats)
                for n in names:
                    result[n][b] = timed[n]
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
        for n in names:
            _restore_modes(modes[n])
    return result


def _check_latency_args(models: Any, input_shape: Any, batch_sizes: Any, warmup: Any, repeats: Any,
                        threads: Any) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Validate :func:`measure_latency`'s arguments; return ``(input shape, batch sizes)`` as tuples."""
    if not isinstance(models, Mapping) or not models:
        raise ValueError(f"models must be a non-empty dict of name -> nn.Module, got {models!r}")
    for name, m in models.items():
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{name!r}] must be a torch.nn.Module, got {type(m).__name__}")
        for t in list(m.parameters()) + list(m.buffers()):
            if t.device.type != "cpu":
                raise ValueError(f"models[{name!r}] must be on the CPU, found a tensor on {t.device}")
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be (C, H, W) positive ints, got {input_shape!r}")
    bss = tuple(batch_sizes)
    if not bss or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bss):
        raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None or a positive int, got {threads!r}")
    return shape, bss


def _time_interleaved(models: Mapping[str, nn.Module], x: torch.Tensor, warmup: int,
                      repeats: int) -> Dict[str, Dict[str, float]]:
    """``{name: {"median_ms", "p10_ms", "p90_ms"}}`` of every model on ``x``, the starting model rotating."""
    names = list(models)
    for n in names:
        for _ in range(warmup):
            models[n](x)
    times: Dict[str, list] = {n: [] for n in names}
    for r in range(repeats):
        for i in _rotations(len(names), r):
            n = names[i]
            t0 = time.perf_counter()
            models[n](x)
            times[n].append((time.perf_counter() - t0) * 1000.0)
    out = {}
    for n in names:
        ts = sorted(times[n])
        out[n] = {"median_ms": float(statistics.median(ts)), "p10_ms": float(_percentile(ts, 10)),
                  "p90_ms": float(_percentile(ts, 90))}
    return out


def summarize(model: nn.Module, example_inputs: Any) -> Dict[str, Any]:
    """Size and compute of a model in one dict.

    Args:
        model: The model.
        example_inputs: Inputs for one forward pass (see :func:`count_macs`).

    Returns:
        ``{"params", "macs", "conv_params", "filters", "filters_per_layer"}``,
        where ``filters`` is the total of conv output channels and
        ``filters_per_layer`` also lists Linear layers.

    Example:
        >>> s = summarize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten()), torch.randn(1, 3, 3, 3))
        >>> s["filters"], s["params"]
        (8, 224)
    """
    _check_module(model)
    conv_filters = sum(int(m.out_channels) for m in model.modules() if isinstance(m, _CONV))
    return {
        "params": count_params(model),
        "macs": count_macs(model, example_inputs),
        "conv_params": conv_params(model),
        "filters": conv_filters,
        "filters_per_layer": filters_per_layer(model),
    }


class OnnxRuntimeModel(nn.Module):
    """An ONNX Runtime CPU session behind the ``nn.Module`` call interface.

    Lets :func:`measure_latency` time ONNX Runtime and PyTorch models side by side.

    Args:
        path: the ``.onnx`` file (input named ``input``).
        threads: ONNX Runtime intra-op threads (None: its default).
    """

    def __init__(self, path: str, threads: Optional[int] = None) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])


def _unexportable_pools(net: nn.Module, example: torch.Tensor) -> List[str]:
    """Adaptive average pools whose output size does not divide their input size at ``example``'s
    size: the ONNX exporter cannot write them as a fixed pooling."""
    found: List[str] = []

    def check(name: str):
        def hook(module, inputs, _output):
            size = inputs[0].shape[-2:]
            out = torch.nn.modules.utils._pair(module.output_size)
            out = tuple(s if o is None else o for s, o in zip(size, out))
            if any(s % o for s, o in zip(size, out)):
                found.append(f"{name} (input {tuple(size)}, output {out})")
        return hook

    handles = [m.register_forward_hook(check(n)) for n, m in net.named_modules()
               if isinstance(m, nn.AdaptiveAvgPool2d)]
    try:
        with torch.no_grad():
            net(example)
    finally:
        for h in handles:
            h.remove()
    return found


def export_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """Export ``model`` (a copy, in eval mode) with a dynamic batch dimension.

    Raises:
        ExportError: the exporter cannot write the model at this input size (the message names the
            layer, e.g. an adaptive pool whose output size does not divide its input size), or failed.
    """
    import copy

    net = copy.deepcopy(model).eval()
    pools = _unexportable_pools(net, example)
    if pools:
        raise ExportError(
            f"ONNX export at input {tuple(example.shape[-2:])}: adaptive average pool {', '.join(pools)} has an "
            "output size that does not divide its input size, which ONNX cannot express; export at a larger "
            "input size (one where the input is a multiple of the pool's output)")
    try:
        torch.onnx.export(net, (example,), path, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    except Exception as e:  # the exporter's own errors are long TorchScript dumps; keep its first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {type(e).__name__}: {first}") from None
