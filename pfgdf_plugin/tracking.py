"""Per-epoch curves of a run: ``curves.csv`` always, TensorBoard event files when installed.

:class:`CurveWriter` is a sink for :func:`pfgdf_plugin.train.recording`: every epoch of every
training in a run (the dense training, a pruning method's own training, fine-tuning,
quantization-aware training) becomes one row of ``curves.csv``. Besides what the training loop
reports (loss, training accuracy, learning rate) a row holds the test accuracy when the run
measured it that epoch, and the pruning progress visible in the weights: ``pruned_channels``,
the share of output channels of the convolution and linear layers whose weights are all zero
(SPP zeroes a channel for good when its probability reaches 1), and ``masked_weights``, the
share of their weights that are zero (MPDCompress's masked training zeroes the weights outside
its blocks). Methods that mask outside the weights (NNI's wrappers) show 0 there.

TensorBoard files (``tensorboard/`` beside ``curves.csv``) are written when the ``tensorboard``
package is importable (``pip install 'pfgdf-plugin[tensorboard]'``).
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["CURVE_COLUMNS", "CurveWriter", "read_curves", "zero_shares"]

#: The columns of ``curves.csv``, in order.
CURVE_COLUMNS = ("phase", "epoch", "step", "loss", "train_accuracy", "test_accuracy", "lr", "pruned_channels",
                 "masked_weights")


@torch.no_grad()
def zero_shares(model: nn.Module) -> Tuple[float, float]:
    """``(share of all-zero output channels, share of zero weights)`` over conv and linear layers.

    Example:
        >>> fc = nn.Linear(4, 2)
        >>> _ = fc.weight.data[0].zero_()
        >>> zero_shares(fc)
        (0.5, 0.5)
    """
    channels = dead = weights = zeros = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) or not isinstance(w, torch.Tensor):
            continue
        rows = w.detach().reshape(w.shape[0], -1) == 0
        channels += rows.shape[0]
        dead += int(rows.all(1).sum())
        weights += rows.numel()
        zeros += int(rows.sum())
    return (dead / channels if channels else 0.0), (zeros / weights if weights else 0.0)


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.10g}" if isinstance(value, float) else str(value)


def read_curves(path: str) -> List[Dict[str, Any]]:
    """The rows of a ``curves.csv`` (numbers as floats, empty cells as None).

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> w = CurveWriter(folder, tensorboard=False)
        >>> w({"phase": "train", "epoch": 1.0, "step": 10, "loss": 0.5, "lr": 0.1}, nn.Linear(2, 2))
        >>> [(r["phase"], r["step"], r["test_accuracy"]) for r in read_curves(w.path)]
        [('train', 10.0, None)]
    """
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            rows.append({k: (v if k == "phase" else (float(v) if v else None)) for k, v in row.items()})
    return rows


class CurveWriter:
    """Writes the epochs of a run to ``folder/curves.csv`` (and TensorBoard).

    Call it as a :func:`pfgdf_plugin.train.recording` sink. Rows already in ``curves.csv`` are
    kept (a resumed run continues the file); a row for an epoch already written replaces it.
    The file is rewritten whole, through a temporary file and a rename, after every epoch.

    Args:
        folder: the run's folder.
        tensorboard: write TensorBoard event files under ``folder/tensorboard``; None: when the
            ``tensorboard`` package is importable.

    Example:
        >>> import tempfile
        >>> w = CurveWriter(tempfile.mkdtemp(), tensorboard=False)
        >>> w.note(test_accuracy=0.75)
        >>> w({"phase": "fine-tune", "epoch": 1.0, "step": 5, "loss": 0.3, "lr": 0.01}, nn.Linear(2, 2))
        >>> open(w.path).read().splitlines()[1]
        'fine-tune,1,5,0.3,,0.75,0.01,0,0'
    """

    def __init__(self, folder: str, tensorboard: Optional[bool] = None) -> None:
        self.path = os.path.join(folder, "curves.csv")
        self.rows: List[Dict[str, Any]] = read_curves(self.path) if os.path.exists(self.path) else []
        self._pending: Dict[str, Any] = {}
        if tensorboard is None:
            tensorboard = importlib.util.find_spec("tensorboard") is not None
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(folder, "tensorboard"))

    def note(self, **values: Any) -> None:
        """Values for the next row (e.g. the test accuracy measured at the end of an epoch)."""
        unknown = set(values) - set(CURVE_COLUMNS)
        if unknown:
            raise ValueError(f"CurveWriter.note: unknown column(s) {sorted(unknown)}; "
                             f"known: {', '.join(CURVE_COLUMNS)}")
        self._pending.update(values)

    def __call__(self, record: Dict[str, Any], model: nn.Module) -> None:
        row = {k: record.get(k) for k in CURVE_COLUMNS}
        row.update(self._pending)
        self._pending = {}
        row["pruned_channels"], row["masked_weights"] = zero_shares(model)
        key = (row["phase"], float(row["epoch"]))
        self.rows = [r for r in self.rows if (r["phase"], float(r["epoch"])) != key] + [row]
        self._write()
        if self._tb is not None:
            tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(row["phase"])).strip("_") or "train"
            for name in CURVE_COLUMNS[3:]:
                if isinstance(row[name], (int, float)):
                    self._tb.add_scalar(f"{tag}/{name}", row[name], int(row["step"]))
            self._tb.flush()

    def _write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            out.writerow(CURVE_COLUMNS)
            for r in self.rows:
                out.writerow([_text(_int_if_whole(r[k])) for k in CURVE_COLUMNS])
        os.replace(tmp, self.path)

    def close(self) -> None:
        """Close the TensorBoard files (the CSV is always complete on disk)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _int_if_whole(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
