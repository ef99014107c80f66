"""The benchmark's methods, a registry: :data:`METHODS` maps each name to its :class:`Method`.

Every choice that names a method reads this table: ``fewshot.py --methods`` and its help, the
default set (:data:`DEFAULT_METHODS`), the table order of the outputs and the baselines DALDA is
tested against (:data:`SIGNIFICANCE_BASELINE_ORDER`).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from ..plan.ags import Scaling

__all__ = [
    "Method",
    "METHODS",
    "generator_kinds",
    "plans_own_config",
    "DEFAULT_METHODS",
    "SIGNIFICANCE_BASELINE_ORDER",
    "resolve_methods",
    "method_scaling",
    "uses_llm_prompts",
    "FILTERED",
    "method_of",
    "filtered_twin",
    "unfiltered",
    "table_position",
    "method_label",
]


@dataclass(frozen=True)
class Method:
    """One row of the table: which prompts, which λ strategy, which generator."""

    name: str
    label: str
    # "base" ("a photo of a {class}"), "llm" (the prompt bank), "tokens" (textual-inversion tokens
    # learned per seed: the plan carries its own generator config) or None (no synthetic images)
    prompts: str | None
    scaling: str | None  # "ags", "rs", "fixed" (--fixed-lambda), "none" (λ unused), "strength" or None
    # The generator config it plans for, by its registered name (``METHOD``: "ip_adapter",
    # "real_guidance", "da_fusion", or one added with dalda_aug.generators.register_generator);
    # the registry gives the config class, so settings, caches and warming follow. None: real images only.
    generator: str | None
    # Whether --class-names sets the class-name form of its prompts (the reference's DALDA prompts);
    # otherwise the readable name, as DA-Fusion's code, which the paper ran.
    class_names: bool = False


# Table order: baselines, then the ablations, then DALDA.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("real", "Real images only", None, None, None),
    Method("real_guidance", "Real Guidance (img2img, strength 0.5)", "base", "none", "real_guidance"),
    Method("da_fusion", "DA-Fusion (textual inversion + img2img)", "tokens", "strength", "da_fusion"),
    Method("fixed", "Base prompt + fixed λ", "base", "fixed", "ip_adapter", class_names=True),
    Method("llm_fixed", "LLM prompts + fixed λ", "llm", "fixed", "ip_adapter", class_names=True),
    Method("base_rs", "Base prompt + RS", "base", "rs", "ip_adapter", class_names=True),
    Method("llm_rs", "LLM prompts + RS", "llm", "rs", "ip_adapter", class_names=True),
    Method("base_ags", "Base prompt + AGS", "base", "ags", "ip_adapter", class_names=True),
    Method("dalda", "DALDA (LLM prompts + AGS)", "llm", "ags", "ip_adapter", class_names=True),
)}
DEFAULT_METHODS = tuple(name for name in METHODS if name != "llm_fixed")
# The baselines DALDA is tested against, in table order: every other method.
SIGNIFICANCE_BASELINE_ORDER = tuple(name for name in METHODS if name != "dalda")


def generator_kinds() -> list[str]:
    """The generator configs the methods name, in the registry's order (the built-ins first)."""
    from ..generators import registered_configs

    named = {m.generator for m in METHODS.values() if m.generator is not None}
    unknown = sorted(named - set(registered_configs()))
    if unknown:
        raise InputError(f"few-shot method(s) name unregistered generator(s) {unknown}; register them with "
                         "dalda_aug.generators.register_generator")
    return [kind for kind in registered_configs() if kind in named]


def plans_own_config(kind: str) -> bool:
    """Whether the methods of generator ``kind`` make their generator config per plan (textual-
    inversion tokens learned per seed): one spec and cache binding per plan, none shared."""
    return any(m.generator == kind and m.prompts == "tokens" for m in METHODS.values())


#: Suffix of a method's filtered twin (``fewshot.py --filter SPEC --oversample K``): the method's
#: plan of K x M variants per source, filtered down to M (``dalda-aug filter``), at the same
#: synthetic budget. Not part of the paper's method.
FILTERED = "+filter"


def unfiltered(name: str) -> str:
    """The method a (possibly filtered) run name is made with: ``dalda+filter`` -> ``dalda``."""
    return name[: -len(FILTERED)] if name.endswith(FILTERED) else name


def filtered_twin(name: str) -> str:
    return name + FILTERED


def method_of(name: str) -> Method:
    """The :class:`Method` of a run name, its filtered twin included (same prompts, scaling and
    generator; the label says it is filtered)."""
    base = METHODS[unfiltered(name)]
    if name == base.name:
        return base
    return dataclasses.replace(base, name=name, label=f"{base.label} + filter")


def table_position(name: str) -> tuple[int, int]:
    """Where a run name sorts in the outputs: its method's place, the filtered twin right after it."""
    return list(METHODS).index(unfiltered(name)), int(name.endswith(FILTERED))


def method_label(name: str, bank: Any = None) -> str:
    """The table label of method ``name``. An LLM-prompt method whose prompt bank no LLM wrote
    (the ``template`` backend, ``provenance["backend"]``) says "template prompts" instead."""
    method = method_of(name)
    label = method.label
    provenance = getattr(bank, "provenance", None) or {}
    if method.prompts == "llm" and provenance.get("backend") == "template":
        label = label.replace("LLM prompts", "template prompts")
    return label


def uses_llm_prompts(methods: list[str]) -> bool:
    """Whether any of ``methods`` reads the LLM prompt bank."""
    return any(method_of(m).prompts == "llm" for m in methods)


def resolve_methods(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The methods to run (table order) and those skipped, with the reason."""
    requested = args.methods if args.methods is not None else list(DEFAULT_METHODS)
    skipped: dict[str, str] = {}
    if args.prompts is None and getattr(args, "llm", None) is None:
        llm = [m for m in requested if METHODS[m].prompts == "llm"]
        if llm and args.methods is not None:
            raise InputError(f"method(s) {', '.join(llm)} need LLM prompts: pass --prompts FILE "
                             "(write one with `dalda-aug prompts`) or --llm BACKEND")
        for m in llm:
            skipped[m] = "needs LLM prompts (--prompts FILE, written by `dalda-aug prompts`)"
    methods = [m for m in METHODS if m in requested and m not in skipped]
    return methods, skipped


def method_scaling(method: Method, ags_mode: Literal["truncnorm", "clip"], fixed_lambda: float) -> Scaling:
    """The λ scaling of ``method``'s plans (``--ags-mode``, ``--fixed-lambda``)."""
    from ..plan.ags import AGSConfig, Scaling

    if method.scaling == "ags":
        return Scaling("ags", ags=AGSConfig(mode=ags_mode))
    if method.scaling == "rs":
        return Scaling("rs")
    if method.scaling == "fixed":
        return Scaling("fixed", value=fixed_lambda)
    # Real Guidance ignores λ; a constant keeps its cache keys independent of n-shot
    return Scaling("fixed", value=0.0)
