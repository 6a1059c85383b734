"""Fixtures shared by the Torch-Pruning adapter tests."""

from __future__ import annotations

import pytest

from pfgdf_plugin.measure import count_macs


@pytest.fixture
def macs_squared_clock(monkeypatch):
    """``patch(meet_target)``: the latency meter behind that ``meet_target`` becomes a deterministic
    stand-in for the clock, the MACs ratio squared (patched through the function's own globals, since
    doctest collection may import a second copy of the module)."""
    def fake(dense, candidate, example_inputs, *args):
        return (count_macs(dense, example_inputs) / count_macs(candidate, example_inputs)) ** 2

    def patch(meet_target) -> None:
        monkeypatch.setitem(meet_target.__globals__, "latency_ratio", fake)

    return patch
