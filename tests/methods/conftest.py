"""Shared helpers of the method tests."""

from __future__ import annotations

import contextlib

import pytest

from pfgdf_plugin import native


@contextlib.contextmanager
def _switch(on: bool):
    previous = native.set_enabled(on)
    try:
        yield
    finally:
        native.set_enabled(previous)


@pytest.fixture
def native_switch():
    """``with native_switch(on):`` runs the converted layers with or without the C kernels."""
    return _switch
