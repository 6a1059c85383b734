"""ONNX exports of a run: the float models, the int8 model, and the ONNX Runtime sessions that time them.

Export is a report stage: a failure is recorded in the metrics, never allowed to lose the run.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

from .. import measure
from ..quantize import onnx_int8


def _failure(e: Exception) -> Dict[str, Any]:
    return {"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str) -> Dict[str, Any]:
    """Export to ONNX; when onnxruntime is installed, check its output against torch."""
    info: Dict[str, Any] = {"file": os.path.basename(path)}
    try:
        import onnx  # noqa: F401
    except ImportError:
        return {"status": "skipped: onnx is not installed (pip install 'pfgdf-plugin[export]')"}
    try:
        measure.export_onnx(model, example, path)
    except Exception as e:  # export is a report stage: record, never lose the run
        return _failure(e)
    info["status"] = "ok"
    try:
        ort_model = measure.OnnxRuntimeModel(path)
    except ImportError:
        return info
    with torch.no_grad():
        info["max_abs_diff"] = float((model.eval()(example) - ort_model(example)).abs().max())
    return info


def export_int8(quantized: torch.nn.Module, example: torch.Tensor, stage: str, train_loader, test_loader,
                calibration_batches: int, progress: bool) -> Dict[str, Any]:
    """Float ONNX of the quantization-trained weights, rewritten to int8 QDQ by ONNX Runtime;
    its test accuracy is measured through ONNX Runtime."""
    float_path = os.path.join(stage, ".quantized-float.onnx")
    path = os.path.join(stage, "pruned-int8.onnx")
    try:
        measure.export_onnx(quantized, example, float_path)
        onnx_int8(float_path, path, train_loader, batches=min(calibration_batches, len(train_loader)))
        acc = measure.evaluate(measure.OnnxRuntimeModel(path), test_loader, "cpu", "eval int8 onnx", progress)
    except ImportError:
        return {"status": "skipped: onnxruntime is not installed (pip install 'pfgdf-plugin[export]')"}
    except Exception as e:  # export is a report stage: record, never lose the run
        return _failure(e)
    finally:
        if os.path.exists(float_path):
            os.unlink(float_path)
    return {"status": "ok", "file": os.path.basename(path), "accuracy": acc["accuracy"]}


def ort_models(stage: str, threads: Optional[int]) -> Dict[str, Any]:
    """ONNX Runtime sessions of the run's exported models (none without onnxruntime)."""
    files = {"dense": "dense.onnx", "pruned": "pruned.onnx", "pruned int8": "pruned-int8.onnx"}
    try:
        return {k: measure.OnnxRuntimeModel(os.path.join(stage, f), threads) for k, f in files.items()
                if os.path.exists(os.path.join(stage, f))}
    except ImportError:
        return {}
