"""The package's shape as a contract (issue 21).

* Every import path that worked before the rooms were split keeps working: ``OLD_PATHS`` is the
  list of public names each module exposed on the commit before the split (written out once from
  that tree, not from the code under test).
* The import graph has no circles, and the floors stay in order: the bottom modules import nothing
  above them, no library module imports the command line, nothing inside the package imports the
  ``generation``/``real_guidance`` compatibility shims, and the generators never reach up into the
  cache, the dataset or the training code.

The graph is read from the source with ``ast``: every ``import``, also inside functions and under
``if TYPE_CHECKING:`` (as grimp counts them), so a lazy import cannot hide a circle. Command modules
loaded by name (``importlib.import_module``) are covered by the rule that they never import the
dispatcher back.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
import warnings
from pathlib import Path

import pytest

import dalda_aug
from dalda_aug._lazy import _MOVED_MODULES, MOVED, resolve

PACKAGE_DIR = Path(dalda_aug.__file__).resolve().parent

OLD_PATHS = {
    "dalda_aug": (),
    "dalda_aug.cli.cache": ("add_spec_arguments", "cache_for_plan", "default_dtype", "register",
        "spec_from_args", "spec_given",),
    "dalda_aug.cli.da_fusion": ("register",),
    "dalda_aug.cli.inspect": ("register",),
    "dalda_aug.cli.prompts": ("read_class_file", "register", "run",),
    "dalda_aug._io": ("MAX_JSON_BYTES", "MAX_JSON_DEPTH", "json_depth", "loads_bounded", "read_json_object",
        "write_atomic",),
    "dalda_aug._lazy": ("lazy_exports",),
    "dalda_aug.plan.ags": ("AGSConfig", "RNGLike", "Scaling", "ags_parameters", "sample_lambda", "sample_scales",),
    "dalda_aug.cache": ("CacheFullError", "CacheReadOnlyError", "CacheStorageError", "CachedImage",
        "CorruptEntryError", "DEFAULT_IMAGE_FORMAT", "GenerationSpec", "GeneratorFactory", "IMAGE_FORMATS",
        "KEY_FORMAT", "LEASE_CAP_SECONDS", "SHARD_PREFIX", "SPECS_DIR", "SPEC_RECORD_FORMAT",
        "SyntheticCache", "check_entry", "decode_entry", "default_shard_name", "encode_entry",
        "export_folder_names", "is_network_filesystem", "open_cache_dir", "plan_fingerprint",
        "row_refusal", "variant_key",),
    "dalda_aug.classifier": ("Classifier",),
    "dalda_aug.classify": ("BACKBONES", "BN_MODES", "CLIP_HEADS", "Classifier", "ClassifierSpec",
        "DEFAULT_TEMPLATE", "EFFICIENTNET_LITE0_TIMM_NAME", "MODES", "OPTIMIZERS", "RECIPES",
        "RESNET50_TIMM_NAME", "TrainConfig", "build_classifier", "eval_transform", "evaluate",
        "load_efficientnet_lite0", "train_classifier", "train_transform",),
    "dalda_aug.cli": ("build_parser", "describe_model_defaults", "load_models_arg", "main", "register",
        "version_report",),
    "dalda_aug.plan.clipscore": ("CLIPScorer", "Device", "HESSEL_W", "KINDS", "LOGIT_SCALE", "SCORE_BLOCK",
        "load_open_clip",),
    "dalda_aug.config": ("DEFAULTABLE_OPTIONS", "DEFAULTS_KEY", "ModelConfig", "model_defaults",
        "models_file",),
    "dalda_aug.data": ("IMG_EXTENSIONS", "ImageSource", "SourceItem", "class_folder_name",
        "class_folder_names", "few_shot_indices", "find_classes", "image_sha256", "load_image",
        "readable_class_name", "source_path", "to_rgb",),
    "dalda_aug.dataset": ("CacheMissError", "ITEMS", "ON_MISS", "SyntheticAugmentedDataset", "plan_indices",
        "source_ids",),
    "dalda_aug.cli.demo": ("DEMO_IMAGES", "HubUnreachableError", "OFFLINE_HINT", "hub_endpoint", "hub_reachable",
        "main", "missing_from_hub_cache", "register", "resolve_models", "run_demo", "write_demo_folder",),
    "dalda_aug.errors": ("DaldaError", "ImageError", "InputError", "MissingDependencyError",
        "MissingFileError", "ModelLoadError", "require",),
    "dalda_aug.export_formats": ("DEFAULT_EXPORT_FORMAT", "DEFAULT_SHARD_SIZE", "EXPORT_FORMATS",
        "ExportSample", "ExportSelection", "MANIFEST_FORMAT", "PARQUET_ROW_GROUP", "check_export_format",
        "check_output_folder", "export", "export_imagefolder", "export_parquet", "export_webdataset",
        "huggingface_features", "manifest_name", "parquet_schema", "select_samples", "shard_name",),
    "dalda_aug.generation": ("IPAdapterConfig", "GenerationRequest", "IPAdapterGenerator", "SCHEDULERS",
        "ddim_scheduler_config", "estimate_sample_bytes", "generation_fingerprint",
        "load_reference_pipeline", "reference_generate",),
    "dalda_aug.generators": (),
    "dalda_aug.generators.attention": ("PerSampleIPAdapterAttnProcessor", "ScaleAwareAttnProcessor",
        "install_per_sample_processors",),
    "dalda_aug.generators.base": ("C", "DIGEST", "FINGERPRINT_FORMAT", "G", "GenerationRequest", "Generator",
        "GeneratorConfig", "OMIT_AT_DEFAULT", "PIXELS", "apply_guidance", "check_choice", "check_int",
        "check_real", "check_requests", "config_from_dict", "decode_latents", "dtype_name",
        "field_changes_pixels", "generation_fingerprint", "generator_class_for", "image_key",
        "load_sd_pipeline", "pixel_field", "register_generator", "registered_configs", "resolve_torch_dtype",
        "speed_field",),
    "dalda_aug.generators.da_fusion": ("DAFusionConfig", "DAFusionGenerator", "DA_FUSION_PROMPT",
        "DA_FUSION_STRENGTHS", "build_da_fusion_plan", "draw_strengths",),
    "dalda_aug.generators.img2img": ("Img2ImgConfig", "Img2ImgGenerator",),
    "dalda_aug.generators.ip_adapter": ("IPAdapterConfig", "IPAdapterGenerator", "SCHEDULERS",
        "estimate_sample_bytes", "load_reference_pipeline", "load_stock_pipeline", "reference_generate",),
    "dalda_aug.generators.loading": ("HUB_PROBE_TIMEOUT", "HubFile", "HubUnreachableError", "MODELS_HINT",
        "ModelLocation", "call_loader", "check_hub", "check_local_folder", "ddim_scheduler_config",
        "describe_location", "hub_endpoint", "hub_files", "hub_reachable", "is_local_location",
        "load_tiny_vae", "load_vae", "make_scheduler", "missing_from_hub_cache", "parse_location",
        "quiet_loading", "require_hub_models",),
    "dalda_aug.generators.real_guidance": ("RealGuidanceConfig", "RealGuidanceGenerator",),
    "dalda_aug.generators.step_cache": ("check_step_caching_unet", "unet_step",),
    "dalda_aug.generators.textual_inversion": ("MANIFEST", "OBJECT_TEMPLATES", "TOKENS_FORMAT",
        "TextualInversionConfig", "TextualInversionTrainer", "TokenSet", "class_token",
        "train_textual_inversion",),
    "dalda_aug.metrics": ("ALEXNET_WEIGHTS", "EmbeddingStore", "alexnet_weights_path", "diversity_metrics",
        "load_lpips", "mean_pairwise_cosine", "mean_pairwise_lpips",),
    "dalda_aug.plan": ("AugmentationPlan", "BASE_TEMPLATE", "PLAN_FORMAT", "Processes", "Prompts", "Variant",
        "build_plan", "derive_seed", "summarize",),
    "dalda_aug.dataset.pool": ("GeneratorPool", "PoolClosedError", "PoolError", "PoolHandle", "WaitTimeoutError",
        "log",),
    "dalda_aug.presets": ("DatasetPreset", "PRESETS", "get_preset",),
    "dalda_aug.prompts": ("BackendError", "CLIP_MAX_TOKENS", "DEFAULT_BASE_URL", "DEFAULT_PREFIX",
        "DEFAULT_TEMPLATE", "HFChatBackend", "INSTRUCTIONS", "INSTRUCTION_PLACEHOLDERS",
        "IncompletePromptBankError", "Instruction", "MAX_ANSWER_BYTES", "NAME_PLACEHOLDER",
        "OPENAI_SAMPLING", "OpenAIChatBackend", "PROMPTS_FORMAT", "PromptBank", "REDACTED",
        "TemplateBackend", "build_messages", "generate_prompt_bank", "load_clip_tokenizer", "parse_answer",
        "parse_backend", "redact", "validate_prompt",),
    "dalda_aug.real_guidance": ("RealGuidanceConfig", "RealGuidanceGenerator",),
    "dalda_aug.tiny_models": ("TINY_CLIP_NAME", "TINY_DEFAULTS", "make_tiny_models",
        "write_clip_tokenizer",),
    "dalda_aug.viz": ("contact_sheet", "contact_sheet_size", "plan_contact_sheet",
        "plot_lambda_distribution", "plot_score_histogram",),
    "dalda_aug.cache.warm": ("WarmReport", "plan_keys", "shard_keys", "warm",),
}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the moved paths among them warn (tested below)
@pytest.mark.parametrize("module", sorted(OLD_PATHS))
def test_old_import_paths_keep_working(module):
    mod = importlib.import_module(module)
    missing = [name for name in OLD_PATHS[module] if not hasattr(mod, name)]
    assert missing == [], f"{module} lost {missing}"


def _forget(path: str) -> None:
    """Drop an old module path from sys.modules, so importing it runs the finder (and warns) again."""
    for name in [n for n in sys.modules if n == path or n.startswith(path + ".")]:
        if name in MOVED:
            del sys.modules[name]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_moved_path_resolves_with_a_warning_naming_the_new_one(old):
    new = MOVED[old]
    expected = resolve(new)
    _forget(old)
    with pytest.warns(DeprecationWarning, match=re.escape(f"{old} moved to {new}")):
        if old in _MOVED_MODULES:
            found = importlib.import_module(old)
        else:
            module, _, name = old.rpartition(".")
            if module in _MOVED_MODULES:
                _forget(module)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    parent = importlib.import_module(module)
            else:
                parent = importlib.import_module(module)
            found = getattr(parent, name)
    if old in _MOVED_MODULES:
        # the old module serves the new module's names, the very objects
        names = [n for n in getattr(expected, "__all__", dir(expected)) if not n.startswith("_")]
        assert names, new
        for name in names:
            assert getattr(found, name) is getattr(expected, name), f"{old}.{name}"
    else:
        assert found is expected


def test_the_old_module_path_is_the_new_module_and_a_wrong_name_still_fails():
    with pytest.warns(DeprecationWarning, match="dalda_aug.cache.warm"):
        _forget("dalda_aug.warm")
        import dalda_aug.warm as old_warm
    from dalda_aug.cache.warm import warm
    assert old_warm.warm is warm
    with pytest.raises(AttributeError):
        getattr(dalda_aug, "no_such_name")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("dalda_aug.no_such_module")


def test_the_package_itself_never_uses_a_moved_path():
    """Every import inside the package names a path's new home, so the library's own imports never
    warn (the test suite sees no DeprecationWarning from them)."""
    offenders = []
    for path in PACKAGE_DIR.rglob("*.py"):
        module = _module_name(path)
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                used = [alias.name for alias in node.names]
            else:
                base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                if node.level:
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                used = [origin] + [f"{origin}.{alias.name}" for alias in node.names]
            offenders += [f"{module}: {name}" for name in used if name in MOVED]
    assert offenders == []


def test_top_level_is_the_names_a_script_needs():
    assert len(dalda_aug.__all__) <= 30
    assert {"warm", "build_plan", "SyntheticAugmentedDataset", "AugmentationPlan", "SyntheticCache",
            "GenerationSpec", "IPAdapterConfig", "__version__"} <= set(dalda_aug.__all__)
    from dalda_aug.cache.warm import warm
    # `import dalda_aug.warm` (the old module path, imported by a test above) binds the old module
    # as the package's attribute, as Python binds every imported submodule; that module calls warm.
    vars(dalda_aug).pop("warm", None)
    assert dalda_aug.warm is warm


# Modules over the bound, if any: name -> their current length, which may only shrink.
LONG_FOR_NOW: dict[str, int] = {}


def test_layout_numbers():
    """The issue's bounds: no module over 600 lines, at most 12 top-level ``.py`` files (the
    package's ``__init__`` and ``__main__`` counted)."""
    long = {str(p.relative_to(PACKAGE_DIR)): n for p in PACKAGE_DIR.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > LONG_FOR_NOW.get(
                str(p.relative_to(PACKAGE_DIR)), 600)}
    assert long == {}
    top = sorted(p.name for p in PACKAGE_DIR.glob("*.py"))
    assert len(top) <= 12, top


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node of a module, at any depth."""
    return (node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                submodules = [f"{origin}.{alias.name}" for alias in node.names]
                found = [name for name in submodules if name in files]
                candidates = found if found else [origin]
                if found and len(found) < len(submodules):
                    candidates.append(origin)
            targets |= {name for name in candidates if name in files and name != module}
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_reader_sees_a_circle(tmp_path):
    # The checker itself: a planted two-module circle is found, a chain is not.
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    graph = import_graph()
    # Known edges, read by hand from the source: the dataset reads the cache, the CLI the plan.
    assert any(target.startswith("dalda_aug.cache") for target in graph["dalda_aug.dataset"])
    assert "dalda_aug.errors" in graph["dalda_aug._io"]


def test_no_import_circles():
    assert _cycles(import_graph()) == []


BOTTOM = {  # module -> what it may import from the package
    "dalda_aug.errors": set(),
    "dalda_aug._lazy": set(),
    "dalda_aug._io": {"dalda_aug.errors"},
    "dalda_aug.locations": set(),
    "dalda_aug.hub": {"dalda_aug.errors", "dalda_aug.locations"},
}


def test_bottom_floor_imports_nothing_above_it():
    graph = import_graph()
    for module, allowed in BOTTOM.items():
        assert graph[module] <= allowed, f"{module} imports {sorted(graph[module] - allowed)}"


def _is_cli(module: str) -> bool:
    return module == "dalda_aug.cli" or module.startswith("dalda_aug.cli.") or module == "dalda_aug.__main__"


def test_only_the_command_line_imports_the_command_line():
    graph = import_graph()
    offenders = {m: sorted(t for t in targets if _is_cli(t))
                 for m, targets in graph.items() if not _is_cli(m) and any(_is_cli(t) for t in targets)}
    assert offenders == {}


def test_command_modules_never_import_the_dispatcher():
    # dalda_aug.cli (the dispatcher) loads its command modules by name; one importing it back is a
    # hidden circle.
    graph = import_graph()
    offenders = {m: sorted(t) for m, t in graph.items()
                 if m.startswith("dalda_aug.cli.") and "dalda_aug.cli" in t}
    assert offenders == {}


def test_nothing_inside_the_package_imports_the_compatibility_shims():
    graph = import_graph()
    shims = {"dalda_aug.generation", "dalda_aug.real_guidance", "dalda_aug.classifier", "dalda_aug.export_formats"}
    offenders = {m: sorted(t & shims) for m, t in graph.items() if t & shims and m not in shims}
    assert offenders == {}


HIGHER = ("dalda_aug.cache", "dalda_aug.dataset", "dalda_aug.dataset.pool", "dalda_aug.cache.warm", "dalda_aug.classify",
          "dalda_aug.fewshot", "dalda_aug.cli.demo", "dalda_aug.viz", "dalda_aug.metrics")


def test_generators_do_not_reach_up():
    graph = import_graph()
    offenders = {m: sorted(t for t in targets if t.startswith(HIGHER))
                 for m, targets in graph.items() if m.startswith("dalda_aug.generators")}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_integrations_are_a_top_floor():
    """dalda_aug.integrations (the Lightning and ignite hooks) sits on the dataset: it imports the
    dataset and the errors only, and nothing else in the package imports it (so importing the package
    never imports a training framework)."""
    graph = import_graph()
    room = "dalda_aug.integrations"
    members = {m for m in graph if m == room or m.startswith(room + ".")}
    assert {room, f"{room}.lightning", f"{room}.ignite"} <= members
    allowed = members | {"dalda_aug.dataset", "dalda_aug.errors"}
    offenders = {m: sorted(graph[m] - allowed) for m in members if graph[m] - allowed}
    assert offenders == {}
    importers = {m: sorted(graph[m] & members) for m in graph if m not in members and graph[m] & members}
    assert importers == {}
