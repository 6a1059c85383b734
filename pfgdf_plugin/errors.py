"""One error family: every error the plugin documents derives from :class:`PluginError`.

Each error also keeps the built-in base it always had (``ValueError``, ``RuntimeError``,
``FileNotFoundError``, ``KeyError``), so ``except ValueError`` keeps working, while
``except pfgdf_plugin.PluginError`` catches anything the plugin raises on purpose.

Example:
    >>> from pfgdf_plugin.errors import PluginError
    >>> from pfgdf_plugin.methods.pfgdf import PFGDFError
    >>> issubclass(PFGDFError, PluginError) and issubclass(PFGDFError, ValueError)
    True
"""

from __future__ import annotations

from typing import List


class PluginError(Exception):
    """Base of every documented pfgdf-plugin error; its message names the problem and the fix."""


class ConfigError(PluginError, ValueError):
    """One or more problems in a recipe; ``errors`` lists each, naming the key and the value."""

    def __init__(self, errors: List[str], source: str = "recipe") -> None:
        self.errors = list(errors)
        head = f"{source}: {len(self.errors)} problem(s)" if len(self.errors) > 1 else source
        super().__init__(head + ":\n  - " + "\n  - ".join(self.errors) if len(self.errors) > 1
                         else f"{source}: {self.errors[0]}")


class DataNotFoundError(PluginError, FileNotFoundError):
    """A data set's files are not where they were looked for.

    The message is one line saying where it looked and how to get the data.
    """

    def __str__(self) -> str:  # FileNotFoundError would prefix an errno tuple
        return str(self.args[0]) if self.args else ""


class UnknownNameError(PluginError, KeyError):
    """Raised for a name a registry does not know; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class PFGDFError(PluginError, ValueError):
    """Raised for input PFGDF cannot score (NaN/Inf weights, bad parameters)."""


class SPPError(PluginError, ValueError):
    """A bad SPP parameter, or SPP used out of order; the message names the value or the call to make."""


class DBPError(PluginError, ValueError):
    """Raised for input DBP cannot work with: no removable block, an unreachable target, bad labels,
    NaN/Inf weights or features (the message names the layer)."""


class MPDError(PluginError, ValueError):
    """A bad MPD argument or layer; the message names the layer and the value."""


class BaselineError(PluginError, ValueError):
    """A baseline criterion (``taylor``, ``lamp``, ``slim``) cannot score this model or data, or got a bad
    parameter; the message names the layer or the key and the value."""


class TargetError(PluginError, ValueError):
    """A budget (``target``) that is malformed or cannot be reached; the message names the target and the
    best ratio reached, and the model is left untouched.

    Attributes:
        best: the best ratio (dense / pruned) the search reached when the target is out of reach, else ``None``.
    """

    def __init__(self, *args, best: "float | None" = None):
        super().__init__(*args)
        self.best = None if best is None else float(best)


class DBPTargetError(DBPError, TargetError):
    """DBP cannot reach its target (by blocks, or by blocks then width); both a :class:`DBPError` and a
    :class:`TargetError`. The message names the target and the best reached; the model is untouched."""


class PrunedFileError(PluginError, ValueError):
    """The file is not a pruned model of this package, or does not fit the base model."""


class QuantizeError(PluginError, ValueError):
    """A quantization setting is invalid, or a quantizer left a targeted layer uncalibrated."""


class SearchError(PluginError, ValueError):
    """An experiment config or search space that cannot work; the message names the key."""


class ExportError(PluginError, RuntimeError):
    """The model cannot be written to ONNX; the message names the layer and the exporter's complaint."""


class MemoryBudgetError(PluginError, MemoryError):
    """An operation would need more memory than this process can still allocate; the message names
    both figures and what to do instead. Raised before anything is changed."""


class RunError(PluginError, RuntimeError):
    """A recipe stage failed; the message names the stage."""
