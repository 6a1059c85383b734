"""The full zoo sweep (marked ``zoo``: ``pytest -m zoo``; minutes): every model of the list, every check, a pass or
the plugin's documented error. ``make zoo`` runs the same sweep and writes docs/zoo.md."""

from __future__ import annotations

import pytest
import torch

from pfgdf_plugin import zoo_sweep

pytestmark = pytest.mark.zoo


def test_every_zoo_model_passes_or_fails_with_a_documented_error(tmp_path):
    torch.set_num_threads(1)
    out = zoo_sweep.sweep(zoo_sweep.zoo_models(), max_params=100e6, log=lambda s: None)
    zoo_sweep.write_markdown(out, str(tmp_path / "zoo.md"))
    assert out["rows"], "no model of torchvision.models is in the list"
    bugs = [f"{name}/{check}: {r.error}: {r.message}" for name, row in out["rows"].items()
            for check, r in row["results"].items() if r.status == zoo_sweep.OTHER]
    assert not bugs, "\n".join(bugs)
