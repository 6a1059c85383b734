"""The base of every method's parameter set: typed fields, one set of defaults, every problem at once.

Each method defines one frozen dataclass (``PFGDFParams``, ``SPPParams``, ``DBPParams``,
``MPDParams``) in its own module. The pruners of both frameworks take their defaults from it and
the recipes validate ``prune.params`` with it, so a default lives in exactly one place.

Example:
    >>> from pfgdf_plugin.methods.pfgdf import PFGDFParams
    >>> PFGDFParams(k=1.5).k
    1.5
    >>> PFGDFParams(k=-1, statistic="median")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pfgdf_plugin.errors.PFGDFError: k must be > 0, got -1; statistic must be one of mean, abs_mean, l2; got 'median'
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Dict, List, Tuple

from ..errors import PluginError


@dataclasses.dataclass(frozen=True)
class Params:
    """Frozen, validated parameters; subclasses list their fields and implement :meth:`problems`."""

    error: ClassVar[type] = PluginError

    def problems(self) -> List[str]:
        """Every problem with these values, each naming the field and the value (empty when valid)."""
        return []

    def __post_init__(self) -> None:
        found = self.problems()
        if found:
            err = self.error("; ".join(found))
            err.problems = found  # the recipe validator lists each one
            raise err

    @classmethod
    def defaults(cls) -> Dict[str, Tuple[Any, Any]]:
        """``{field: (annotation, default)}`` in declaration order."""
        return {f.name: (f.type, f.default) for f in dataclasses.fields(cls)}

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def is_int(value: Any) -> bool:
    """A real ``int`` (``bool`` excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite ``int`` or ``float`` (``bool`` excluded)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def one_of(name: str, value: Any, options: Tuple[str, ...]) -> List[str]:
    """``[]`` when ``value`` is one of ``options``, else the message naming them."""
    return [] if value in options else [f"{name} must be one of {', '.join(options)}; got {value!r}"]
