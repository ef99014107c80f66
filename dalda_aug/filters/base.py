"""What every filter is (:class:`Filter`), what it is given (:class:`FilterContext`), and the
registry of filters by name (``--by NAME[:ARGUMENT]``).

A filter is built from the text after its name (``clip-class:0.5`` gives ``"0.5"``), is loaded
once with a :class:`FilterContext`, and scores images a chunk at a time: one float per image
(higher is better; the first ``--by`` ranks the variants for ``--keep``) and whether the image
passes. Its :meth:`Filter.fingerprint` (name, version, model, thresholds) is recorded in the
derived plan and names its resumable scores: a filter whose fingerprint changed scores again.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from ..errors import InputError

if TYPE_CHECKING:  # numpy only in annotations: `dalda-aug --version` builds the parser without it
    import numpy as np
    import numpy.typing as npt

__all__ = ["FILTER_FORMAT", "Filter", "FilterContext", "register_filter", "filter_names", "make_filter"]

#: The ``format`` of the ``"filter"`` section a derived plan's ``plan.json`` holds.
FILTER_FORMAT = "dalda_aug.filter/1"


@dataclass(frozen=True)
class FilterContext:
    """What a filter may read while it loads: the plan's classes and models, the device."""

    #: Readable class names, in label order (the plan's ``class_names``: CLIP prompts read them).
    class_names: tuple[str, ...]
    #: Class folder names, in label order (the plan's ``classes``: a classifier file lists them).
    classes: tuple[str, ...]
    #: Where the plan's CLIP model lives (:class:`~dalda_aug.config.ModelConfig`), or None.
    models: Any = None
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


class Filter(abc.ABC):
    """One way of judging a generated image (see the module doc).

    Subclasses set :attr:`NAME`, :attr:`VERSION` (raise it when scores change for the same
    inputs) and :attr:`NEEDS_SOURCES` (``True``: :meth:`score` receives the source images too),
    parse their argument in ``__init__`` and implement :meth:`load`, :meth:`score` and
    :meth:`settings`.
    """

    NAME: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    NEEDS_SOURCES: ClassVar[bool] = False
    #: What ``dalda-aug filter --help`` says of it.
    HELP: ClassVar[str] = ""

    def __init__(self, argument: str | None) -> None:
        self.argument = argument

    @property
    def spec(self) -> str:
        """The ``--by`` text that builds this filter."""
        return self.NAME if self.argument is None else f"{self.NAME}:{self.argument}"

    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """The model and the thresholds: what, besides name and version, fixes scores and passes."""

    def fingerprint(self) -> dict[str, Any]:
        """``{"name", "version", "spec", **settings()}``: recorded in the derived plan."""
        return {"name": self.NAME, "version": self.VERSION, "spec": self.spec, **self.settings()}

    @abc.abstractmethod
    def load(self, context: FilterContext) -> None:
        """Load models; check the plan fits (an :class:`InputError` otherwise)."""

    @abc.abstractmethod
    def score(self, images: Sequence[Any], labels: npt.NDArray[np.int64],
              sources: Sequence[Any] | None = None) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        """``(scores, passed)`` of PIL ``images`` whose classes are ``labels`` (``sources``: the
        source image of each, for a filter with :attr:`NEEDS_SOURCES`). A score depends on its own
        image only (fixed-shape batches), never on the chunk it came in."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


# name -> "package.module:Class" (imported on use, so the registry stays light)
_REGISTRY: dict[str, str] = {
    "clip-class": "dalda_aug.filters.clip:ClipClassFilter",
    "clip-source": "dalda_aug.filters.clip:ClipSourceFilter",
    "classifier": "dalda_aug.filters.classifier:ClassifierFilter",
}


def register_filter(name: str, target: str) -> None:
    """Make ``--by NAME[:ARG]`` build ``target`` (``"package.module:Class"``, a :class:`Filter`)."""
    if not name or ":" in name or "," in name:
        raise ValueError(f"a filter name is a word without ':' or ',', got {name!r}")
    if ":" not in target:
        raise ValueError(f"target must be 'package.module:Class', got {target!r}")
    _REGISTRY[name] = target


def filter_names() -> list[str]:
    """The registered filter names (every ``--by`` choice and doc list reads this)."""
    return sorted(_REGISTRY)


def filter_class(name: str) -> type[Filter]:
    target = _REGISTRY.get(name)
    if target is None:
        raise InputError(f"unknown filter {name!r}; choose one of {', '.join(filter_names())}")
    module, attr = target.split(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Filter)):
        raise InputError(f"filter {name!r} is registered as {target}, which is not a Filter")
    return cls


def make_filter(spec: str) -> Filter:
    """The filter ``spec`` names: ``NAME`` or ``NAME:ARGUMENT`` (``clip-class:0.5``,
    ``clip-source:0.6,0.95``, ``classifier:clf.pt``); a bad one is an :class:`InputError`."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"--by needs a filter name ({', '.join(filter_names())}), got {spec!r}")
    name, sep, argument = spec.strip().partition(":")
    return filter_class(name)(argument if sep else None)


def parse_unit_float(text: str, what: str, spec: str) -> float:
    """``text`` as a float in [0, 1], else an :class:`InputError` naming ``spec``."""
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"--by {spec}: {what} must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise InputError(f"--by {spec}: {what} must lie in [0, 1], got {value}")
    return value
