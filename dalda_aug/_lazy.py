"""Lazy re-exports for a package ``__init__``, and the one map of moved import paths.

* :func:`lazy_exports`: public names load their module on first use, so ``import dalda_aug``
  stays light (no torch, diffusers, transformers, open_clip or timm).
* :data:`MOVED`: every import path that moved (a module, or a name of a module) -> where it lives
  now. An old path still resolves, with a :class:`DeprecationWarning` naming the new one: an old
  module path through a finder on ``sys.meta_path`` (``import dalda_aug.plan_columns``), an old
  name through its package's or module's ``__getattr__`` (``from dalda_aug import CLIPScorer``).
  Nothing inside the package uses an old path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any, Callable, Mapping, Sequence

# old module path -> new module path: the modules that moved (an old path imports the new module).
_MOVED_MODULES: dict[str, str] = {
    # modules that moved into their room
    "dalda_aug.plan_columns": "dalda_aug.plan.columns",
    "dalda_aug.stat_record": "dalda_aug.plan.records",
    "dalda_aug.ags": "dalda_aug.plan.ags",
    "dalda_aug.clipscore": "dalda_aug.plan.clipscore",
    "dalda_aug.bases": "dalda_aug.dataset.bases",
    "dalda_aug.draws": "dalda_aug.dataset.draws",
    "dalda_aug.pool": "dalda_aug.dataset.pool",
    "dalda_aug.warm": "dalda_aug.cache.warm",
    "dalda_aug.demo": "dalda_aug.cli.demo",
    "dalda_aug._cli_cache": "dalda_aug.cli.cache",
    "dalda_aug._cli_prompts": "dalda_aug.cli.prompts",
    "dalda_aug._cli_inspect": "dalda_aug.cli.inspect",
    "dalda_aug._cli_da_fusion": "dalda_aug.cli.da_fusion",
    "dalda_aug._cli_filter": "dalda_aug.cli.filter",
    "dalda_aug.testing": "dalda_aug.tiny_models",
    "dalda_aug.presets": "dalda_aug.prompts.presets",
    # the former shim modules
    "dalda_aug.generation": "dalda_aug.generators.ip_adapter",
    "dalda_aug.real_guidance": "dalda_aug.generators.real_guidance",
    "dalda_aug.classifier": "dalda_aug.classify.model",
    "dalda_aug.export_formats": "dalda_aug.cache.export",
}
# old path -> new path, the one map: the moved modules above, and each name of a module that moved
# (``dalda_aug.GenerationConfig``).
MOVED: dict[str, str] = {
    **_MOVED_MODULES,
    "dalda_aug.generation.GenerationConfig": "dalda_aug.generators.ip_adapter.IPAdapterConfig",
    "dalda_aug.generation.GenerationRequest": "dalda_aug.generators.base.GenerationRequest",
    "dalda_aug.generation.generation_fingerprint": "dalda_aug.generators.base.generation_fingerprint",
    "dalda_aug.generation.ddim_scheduler_config": "dalda_aug.generators.loading.ddim_scheduler_config",
    # renamed: the IP-Adapter's config sat one letter from the base GeneratorConfig
    "dalda_aug.generators.ip_adapter.GenerationConfig": "dalda_aug.generators.ip_adapter.IPAdapterConfig",
    "dalda_aug.generators.GenerationConfig": "dalda_aug.generators.ip_adapter.IPAdapterConfig",
    # the cache's lease cap lives in its leases module (read there whenever it leases)
    "dalda_aug.cache.LEASE_CAP_SECONDS": "dalda_aug.cache.leases.LEASE_CAP_SECONDS",
    # hub checks: dalda_aug.hub
    "dalda_aug.demo.HubUnreachableError": "dalda_aug.hub.HubUnreachableError",
    # the cache's spec records: out of cache/spec.py (GenerationSpec and keys) into cache/specs.py
    "dalda_aug.cache.spec.SPECS_DIR": "dalda_aug.cache.specs.SPECS_DIR",
    "dalda_aug.cache.spec.SPEC_RECORD_FORMAT": "dalda_aug.cache.specs.SPEC_RECORD_FORMAT",
    "dalda_aug.cache.spec.write_spec_record": "dalda_aug.cache.specs.write_spec_record",
    "dalda_aug.cache.spec.read_spec_records": "dalda_aug.cache.specs.read_spec_records",
    # shard names and filesystems: out of cache/shards.py (the SQLite rows) into cache/disks.py
    "dalda_aug.cache.shards.default_shard_name": "dalda_aug.cache.disks.default_shard_name",
    "dalda_aug.cache.shards.sanitize_shard_name": "dalda_aug.cache.disks.sanitize_shard_name",
    "dalda_aug.cache.shards.is_network_filesystem": "dalda_aug.cache.disks.is_network_filesystem",
    "dalda_aug.cache.shards.existing_parent": "dalda_aug.cache.disks.existing_parent",
    "dalda_aug.cache.shards.human_bytes": "dalda_aug.cache.disks.human_bytes",
}
# names that left ``dalda_aug.__all__`` (importable from their room)
for _name, _where in {
    "sample_lambda": "plan.ags", "sample_scales": "plan.ags", "CLIPScorer": "plan.clipscore",
    "ImageSource": "data", "load_image": "data", "image_sha256": "data", "readable_class_name": "data",
    "few_shot_indices": "data", "derive_seed": "plan", "PromptBank": "prompts",
    "generate_prompt_bank": "prompts", "GenerationConfig": "generators.ip_adapter",
    "GenerationRequest": "generators.base", "IPAdapterGenerator": "generators.ip_adapter",
    "GeneratorFactory": "cache", "CachedImage": "cache", "plan_indices": "dataset.bases", "ITEMS": "dataset",
    "GeneratorPool": "dataset.pool", "PoolError": "dataset.pool", "run_demo": "cli.demo",
    "RealGuidanceGenerator": "generators.real_guidance", "DAFusionGenerator": "generators.da_fusion",
    "train_textual_inversion": "generators.textual_inversion", "build_classifier": "classify",
    "ClassifierSpec": "classify", "TrainConfig": "classify", "train_classifier": "classify",
    "evaluate": "classify", "train_transform": "classify", "eval_transform": "classify",
    "EmbeddingStore": "metrics", "diversity_metrics": "metrics",
}.items():
    MOVED[f"dalda_aug.{_name}"] = f"dalda_aug.{_where}.{'IPAdapterConfig' if _name == 'GenerationConfig' else _name}"
del _name, _where


def _warn(old: str, new: str) -> None:
    """The warning of an old path, attributed to the first caller outside this module (the
    import machinery's own frames are skipped by :func:`warnings.warn`)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        level, frame = level + 1, frame.f_back  # type: ignore[assignment]
    warnings.warn(f"{old} moved to {new}; the old path will be removed", DeprecationWarning, stacklevel=level + 1)


def resolve(path: str) -> Any:
    """The object a dotted path names now (a module, or a name of a module), without warnings."""
    if path in sys.modules:
        return sys.modules[path]
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name != path:
            raise
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def moved_name(module: str, name: str) -> Any:
    """The object an old ``module.name`` path names now (with the warning); AttributeError if
    the map does not know it."""
    old = f"{module}.{name}"
    new = MOVED.get(old)
    if new is None or old in _MOVED_MODULES:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    _warn(old, new)
    return resolve(new)


def module_getattr(module: str) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` that resolves the module's moved names (see :data:`MOVED`)."""

    def __getattr__(name: str) -> Any:
        if f"{module}.{name}" in _MOVED_MODULES:
            return importlib.import_module(f"{module}.{name}")
        return moved_name(module, name)

    return __getattr__


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module-level ``__getattr__`` and ``__dir__`` for ``package``, whose public names map to the
    submodule (relative to ``package``) that defines them. A loaded name is kept in the package's
    namespace, so the next access does not come back here. A name that moved (:data:`MOVED`)
    resolves with a :class:`DeprecationWarning`."""
    moved = module_getattr(package)

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            return moved(name)
        value = getattr(importlib.import_module(f".{module}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        namespace = vars(sys.modules[package])
        return sorted(set(namespace) | set(namespace.get("__all__", exports)))

    return __getattr__, __dir__


class _MovedModule(types.ModuleType):
    """What an old module path imports: the new module's names (and the map's moved names of the
    old path), read through; calling it calls the new module's function of the same name
    (``dalda_aug.warm(...)`` after an ``import dalda_aug.warm``)."""

    def __init__(self, name: str, target: str) -> None:
        super().__init__(name, f"moved to {target}")
        self.__target = target

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            return getattr(importlib.import_module(self.__target), name)
        if f"{self.__name__}.{name}" in MOVED:
            return moved_name(self.__name__, name)
        return getattr(importlib.import_module(self.__target), name)

    def __dir__(self) -> list[str]:
        return dir(importlib.import_module(self.__target))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaf = self.__name__.rpartition(".")[2]
        return getattr(importlib.import_module(self.__target), leaf)(*args, **kwargs)


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old module paths of :data:`MOVED` (on ``sys.meta_path``, installed by ``dalda_aug``)."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _MovedModule(spec.name, _MOVED_MODULES[spec.name])

    def exec_module(self, module: types.ModuleType) -> None:
        _warn(module.__name__, _MOVED_MODULES[module.__name__])
        importlib.import_module(_MOVED_MODULES[module.__name__])


def install_finder() -> None:
    """Put the finder of old module paths first on ``sys.meta_path`` (once): it claims only the
    old paths, which no other finder may serve (a stale file or another install of the package)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
