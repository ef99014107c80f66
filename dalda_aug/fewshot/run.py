"""One invocation of the few-shot benchmark, as named steps.

:func:`run` is the whole pipeline: :func:`~dalda_aug.fewshot.settings.prepare` (arguments,
data, prompts, configurations) and :func:`~dalda_aug.fewshot.settings.write_config`, then per
(seed, shots, method):
:func:`score_few_shot` (CLIPScores, once per few-shot image), :func:`make_plans`,
:func:`warm_plans` (generate what the cache lacks) and :func:`train_and_evaluate`, which writes
the outputs (:func:`dalda_aug.fewshot.report.write_outputs`) after every finished run.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any, Callable

from ..errors import InputError
from .data import reference_few_shot_indices
from .methods import FILTERED, generator_kinds, method_label, method_of, method_scaling
from .protocol import best_epoch, evaluation_draws, row_settings
from .report import write_outputs
from .settings import Benchmark, finished_runs, log, prepare, write_config

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..classify import Classifier

__all__ = [
    "run",
    "few_shot_draws",
    "score_few_shot",
    "make_plans",
    "warm_plans",
    "train_and_evaluate",
    "train_one",
    "drawn_items",
]

RunKey = tuple[int, int, str]  # (seed, shots, method)


class _Lazy:
    """A zero-argument factory that builds its object once (``warm`` calls it on the first miss)."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build
        self.instance: Any = None

    def __call__(self) -> Any:
        if self.instance is None:
            self.instance = self._build()
        return self.instance



def _generator_of(spec: Any, device: str) -> _Lazy:
    """The generator of ``spec`` on ``device``, built on the first call (a cache miss)."""
    return _Lazy(lambda: spec.make_generator(device))


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the benchmark of ``args`` (``fewshot.py``'s parsed command line; ``argv`` is recorded)."""
    bench = prepare(args, argv, time.perf_counter())
    write_config(bench)
    done = finished_runs(bench.runs_path, args.overwrite)
    grid = [(seed, shots, m) for seed in args.seeds for shots in args.shots for m in bench.methods]
    todo = [g for g in grid if bench.run_key(*g) not in done]
    if len(todo) < len(grid):
        log(f"{len(grid) - len(todo)} of {len(grid)} runs already in {bench.runs_path}; running {len(todo)}")

    t0 = time.perf_counter()
    fewshot = few_shot_draws(bench, todo)
    needs_plan = [(seed, shots, m) for seed, shots, m in todo if method_of(m).generator is not None]
    scores = score_few_shot(bench, sorted({i for seed, shots, _ in needs_plan for i in fewshot[(seed, shots)]}))
    bench.timing["scores"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    plans = make_plans(bench, needs_plan, fewshot, scores)
    bench.timing["plan"] = time.perf_counter() - t0
    if args.stop_after == "plan":
        log(f"wrote {len(plans)} plans to {bench.out / 'plans'}; stopping (--stop-after plan)")
        return 0

    t0 = time.perf_counter()
    bench.meta["warm"] = warm_plans(bench, plans)
    bench.timing["warm"] = time.perf_counter() - t0
    if args.stop_after == "warm":
        log(f"cache warm for {len(plans)} plans in {bench.cache_dir}; stopping (--stop-after warm)")
        return 0

    t0 = time.perf_counter()
    filter_plans(bench, plans)
    bench.timing["filter"] = time.perf_counter() - t0

    rows = train_and_evaluate(bench, grid, todo, done, fewshot, plans)
    bench.timing["total"] = time.perf_counter() - bench.started
    paths = write_outputs(bench.out, rows, bench.meta, args.shots)
    print(paths["table"].read_text(encoding="utf-8"))
    print(f"results: {paths['json']}, {paths['csv']}, {paths['table']}")
    return 0





# ---------------------------------------------------------------------------------------------
# 1. few-shot images and their CLIPScores
# ---------------------------------------------------------------------------------------------
def few_shot_draws(bench: Benchmark, todo: list[RunKey]) -> dict[tuple[int, int], list[int]]:
    """The few-shot images (source indices) of each (seed, shots) to run: the per-class draw
    (``--protocol honest``) or the reference's (``reference``)."""
    from ..data import few_shot_indices

    source, fewshot = bench.source, {}
    for seed, shots, _ in todo:
        if (seed, shots) not in fewshot:
            fewshot[(seed, shots)] = few_shot_indices(source.targets, shots, seed) if bench.args.protocol == "honest" \
                else reference_few_shot_indices(source.targets, shots, seed, bench.data.class_order)
    return fewshot


def score_few_shot(bench: Benchmark, wanted: list[int]) -> dict[Any, float]:
    """CLIPScore of each source image in ``wanted``, by its source id (computed once, shared by every plan)."""
    from ..plan.clipscore import CLIPScorer

    source = bench.source
    if not wanted:
        return {}
    scorer = CLIPScorer.from_models(bench.models, device=bench.device)
    values = scorer.score([source.items[i].load() for i in wanted], [source.items[i].label for i in wanted],
                          source.class_names, progress=bench.progress)
    scores = {source.items[i].source: float(v) for i, v in zip(wanted, values)}
    del scorer
    log(f"CLIPScore of {len(wanted)} few-shot images: mean {sum(scores.values()) / len(scores):.3f}")
    return scores


# ---------------------------------------------------------------------------------------------
# 2. plans
# ---------------------------------------------------------------------------------------------
def make_plans(bench: Benchmark, needs_plan: list[RunKey], fewshot: dict[tuple[int, int], list[int]],
               scores: dict[Any, float]) -> dict[RunKey, Any]:
    """Build and save (``OUT/plans``) the augmentation plan of each run with a generator."""
    from tqdm.auto import tqdm

    plans: dict[RunKey, Any] = {}
    for seed, shots, m in tqdm(needs_plan, desc="plans", unit="plan", disable=not bench.progress or not needs_plan):
        plans[(seed, shots, m)] = _make_plan(bench, seed, shots, m, fewshot[(seed, shots)], scores)
    return plans


def _make_plan(bench: Benchmark, seed: int, shots: int, m: str, idx: list[int], scores: dict[Any, float]) -> Any:
    from ..generators.da_fusion import build_da_fusion_plan
    from ..generators.textual_inversion import train_textual_inversion
    from ..plan.build import build_plan

    args, source, out, method = bench.args, bench.source, bench.out, method_of(m)
    # honest: build_plan draws the same few-shot subset itself; reference: it is given the subset
    # (σ still uses n = shots, each class holding `shots` images)
    plan_source, plan_shots = (source, shots) if args.protocol == "honest" else (source.subset(idx), None)
    plan_scores = [scores[source.items[i].source] for i in idx]
    if method.prompts == "tokens":  # tokens learned on this seed's few-shot images, cached by content
        configs = bench.configs
        tokens = train_textual_inversion(plan_source, out / "tokens" / f"seed{seed}-{shots}shot", models=bench.models,
                                         shots=plan_shots, seed=seed, config=configs.ti_config, device=bench.device,
                                         dtype=bench.dtype, cache_dir=out / "textual-inversion-cache",
                                         progress=bench.progress)
        variants = args.variants * (args.oversample if m.endswith(FILTERED) else 1)
        plan = build_da_fusion_plan(plan_source, tokens.folder, variants=variants, seed=seed,
                                    n_shot=plan_shots, models=bench.models,
                                    config=configs.generators[str(method.generator)],
                                    scores=plan_scores, progress=False)
        plan.save(out / "plans" / (f"seed{seed}-{shots}shot-{m}" + ("-candidates" if m.endswith(FILTERED) else "")))
        _bind_plan_cache(bench, (seed, shots, m), plan)
        return plan
    variants = args.variants * (args.oversample if m.endswith(FILTERED) else 1)  # a twin: K x M candidates
    plan = build_plan(plan_source, variants=variants, seed=seed, n_shot=plan_shots,
                      scaling=method_scaling(method, args.ags_mode, args.fixed_lambda),
                      prompts=bench.bank if method.prompts == "llm" else None, models=bench.models,
                      base_prompt_names=_class_names(bench, method), scores=plan_scores, progress=False)
    plan.save(out / "plans" / (f"seed{seed}-{shots}shot-{m}" + ("-candidates" if m.endswith(FILTERED) else "")))
    return plan


def _class_names(bench: Benchmark, method: Any) -> str:
    """The class-name form of ``method``'s prompts: ``--class-names`` for the IP-Adapter methods (the
    reference's DALDA prompts); readable for Real Guidance, as DA-Fusion's code, which the paper ran."""
    return str(bench.args.class_names) if method.class_names else "readable"


def _bind_plan_cache(bench: Benchmark, key: RunKey, plan: Any) -> None:
    """A plan that records its own generator config (DA-Fusion's: its token set) makes its own
    generation spec, so its own cache binding; the registry rebuilds the config by name."""
    from ..cache import GenerationSpec, SyntheticCache
    from ..generators import config_from_dict

    recorded = plan.config["generator"]
    spec = GenerationSpec(bench.models, config_from_dict(recorded["method"], recorded["config"]), bench.dtype)
    bench.configs.caches[key] = SyntheticCache(bench.cache_dir, spec, image_format=bench.args.cache_format)


# ---------------------------------------------------------------------------------------------
# 3. warm the cache
# ---------------------------------------------------------------------------------------------
def warm_plans(bench: Benchmark, plans: dict[RunKey, Any]) -> list[dict[str, Any]]:
    """Generate what the cache lacks, one generator kind after the other in the registry's order
    (IP-Adapter, Real Guidance, DA-Fusion, then any registered later). One report per plan."""
    import torch

    from ..cache.warm import warm

    caches, specs, device = bench.configs.caches, bench.configs.specs, bench.device
    warm_reports = []
    for kind in generator_kinds():
        keys = [k for k in plans if method_of(k[2]).generator == kind]
        if not keys:
            continue
        # One generator per kind for all plans, built on the first miss (loading it costs more
        # than warming a small plan).
        holder = _generator_of(specs.get(kind), device)
        for key in keys:
            if key in caches:  # a plan with its own config (DA-Fusion's token set): its own spec and generator
                holder.instance = None
                holder = _generator_of(caches[key].spec, device)
            report = warm(plans[key], caches[key] if key in caches else caches[kind], generator=holder,
                          batch_size=bench.args.gen_batch_size, progress=bench.progress)
            warm_reports.append({"seed": key[0], "shots": key[1], "method": key[2], **report.to_dict()})
            if report.generated:
                log(f"seed {key[0]}, {key[1]}-shot, {key[2]}: {report.summary()}")
        holder.instance = None  # free the pipeline before the next one (or training) needs the memory
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return warm_reports


# ---------------------------------------------------------------------------------------------
# 3b. filter the twins' candidates (--filter SPEC --oversample K; not part of the paper's method)
# ---------------------------------------------------------------------------------------------
def filter_plans(bench: Benchmark, plans: dict[RunKey, Any]) -> None:
    """Replace each filtered twin's plan of K x M candidates by its derived plan of at most M per
    source (``dalda-aug filter``: ``--filter`` specs, all must pass, the first ranks); what the
    filter did goes into ``bench.filter_info`` for the twin's result row."""
    from ..filters import filter_plan

    caches = bench.configs.caches
    for key in [k for k in plans if k[2].endswith(FILTERED)]:
        seed, shots, m = key
        candidates = plans[key]  # saved by make_plans as plans/...-candidates, which the derived plan names
        cache = caches[key] if key in caches else caches[method_of(m).generator]
        report = filter_plan(bench.out / "plans" / f"seed{seed}-{shots}shot-{m}-candidates", cache, list(bench.args.filter), bench.out / "plans" / f"seed{seed}-{shots}shot-{m}",
                             keep=bench.args.variants, device=bench.device, overwrite=True, progress=bench.progress)
        plans[key] = report.plan
        bench.filter_info[key] = {"filters": report.plan.config["filter"]["filters"], "oversample": bench.args.oversample,
                                  "generated": len(candidates), "kept": len(report.plan),
                                  "pass_rate": report.totals["pass_rate"], "shortfall": report.totals["shortfall"],
                                  "sources_without_variants": report.totals["sources_without_variants"]}
        log(f"seed {seed}, {shots}-shot, {m}: kept {len(report.plan)} of {len(candidates)} generated "
            f"(pass rate {report.totals['pass_rate']:.0%})")


# ---------------------------------------------------------------------------------------------
# 4./5. train and evaluate
# ---------------------------------------------------------------------------------------------
def train_and_evaluate(bench: Benchmark, grid: list[RunKey], todo: list[RunKey], done: dict[str, dict[str, Any]],
                       fewshot: dict[tuple[int, int], list[int]], plans: dict[RunKey, Any]) -> list[dict[str, Any]]:
    """Train and evaluate every run of ``todo``; every row (``done`` ones first) in grid order. Each
    finished run is appended to ``runs.jsonl`` and the outputs are rewritten."""
    from torchvision.datasets import ImageFolder
    from tqdm.auto import tqdm

    train_folder = ImageFolder(str(bench.data.train_root))  # no transform: the wrapper applies it
    test_sets: dict[tuple[Any, ...], Any] = {}
    # a row written before the settings were recorded: its identity holds ags_mode and class_names
    rows = [{**_settings(bench, g[2]), **done[bench.run_key(*g)]} for g in grid if bench.run_key(*g) in done]
    bar = tqdm(todo, desc="runs", unit="run", disable=not bench.progress)
    for seed, shots, m in bar:
        bar.set_postfix(seed=seed, shots=shots, method=m, refresh=True)
        row = train_one(bench, seed, shots, m, fewshot[(seed, shots)], plans.get((seed, shots, m)), train_folder,
                        test_sets)
        with bench.runs_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        rows.append(row)
        log(f"seed {seed}, {shots}-shot, {m}: top-1 {row['top1']:.4f}, mean per-class "
             f"{row['mean_per_class']:.4f} (n = {row['n_test']}, {row['train_seconds']:.0f} s training)")
        bench.timing["total"] = time.perf_counter() - bench.started
        write_outputs(bench.out, rows, bench.meta, bench.args.shots)
    bar.close()
    return rows


def _settings(bench: Benchmark, m: str) -> dict[str, Any]:
    """The :data:`~dalda_aug.fewshot.protocol.REFERENCE_SETTINGS` of a run of method ``m``."""
    return row_settings(method_of(m), bench.args.ags_mode, bench.args.class_names, bench.data.pool)


class _Evaluation:
    """The test metrics of one run's model at an epoch (every item, or seeded draws), timed.

    With draws (``--eval-draws``, the reference's 6,400 with replacement) the model runs once per
    distinct drawn item and each item counts as often as it was drawn: the reference evaluates in
    eval mode (``model.eval()``, BatchNorm on its running statistics) with a fixed transform
    (Resize, ToTensor, Normalize), as :func:`~dalda_aug.classify.evaluate` does with either
    recipe's eval transform, so every draw of an item gets the same logits and the accuracy is
    exactly the per-draw loop's. ``forwards`` counts the images the model ran on.
    """

    def __init__(self, bench: Benchmark, model: torch.nn.Module, eval_set: Any, seed: int) -> None:
        self.bench, self.model, self.eval_set, self.seed = bench, model, eval_set, seed
        self.draws = bench.components["eval_draws"]
        self.seconds = 0.0
        self.forwards = 0

    def __call__(self, epoch: int) -> dict[str, Any]:
        import torch
        from torch.utils.data import Subset

        from ..classify import evaluate

        args, draws = self.bench.args, self.draws
        t_eval = time.perf_counter()
        items, counts, expected = self.eval_set, None, len(self.eval_set)
        if draws:
            distinct, counts = drawn_items(self.eval_set, evaluation_draws(len(self.eval_set), draws, self.seed, epoch))
            items, expected = Subset(self.eval_set, distinct), draws
        with torch.random.fork_rng(devices=[]):  # evaluating must not change the training draws
            result = evaluate(self.model, items, batch_size=args.eval_batch_size,
                              num_workers=self.bench.num_workers, device=self.bench.device,
                              autocast_dtype=args.autocast, progress=False, counts=counts)
        self.seconds += time.perf_counter() - t_eval
        self.forwards += result["forwards"]
        if result["n"] != expected:
            raise InputError(f"evaluated {result['n']} test images, expected {expected}")
        if draws:  # the reference's mean: over every class, a class never drawn counting 0
            result["mean_per_class"] = sum(a or 0.0 for a in result["per_class"]) / len(result["per_class"])
        return result


def drawn_items(eval_set: Any, draws: list[int]) -> tuple[list[int], list[int]]:
    """The distinct items of ``draws`` (indices into ``eval_set``, with repeats), ascending, and how
    often each was drawn: what :func:`~dalda_aug.classify.evaluate` takes to run the model once per item."""
    from collections import Counter

    counted = Counter(draws)
    distinct = sorted(counted)
    if distinct and not 0 <= distinct[0] <= distinct[-1] < len(eval_set):
        raise InputError(f"an evaluation draw lies outside the {len(eval_set)} evaluation images")
    return distinct, [counted[i] for i in distinct]


def _eval_set(bench: Benchmark, model: Classifier, seed: int, test_sets: dict[tuple[Any, ...], Any]) -> Any:
    """The evaluation split of ``seed`` with the model's eval transform (built once per transform and seed)."""
    from torch.utils.data import Subset
    from torchvision.datasets import ImageFolder

    from ..classify import eval_transform

    args, spec = bench.args, model.spec
    tf_key = (spec.mean, spec.std, spec.input_size, spec.interpolation, spec.crop_pct, args.image_size, seed)
    if tf_key not in test_sets:
        folder = ImageFolder(str(bench.data.test_root),
                             transform=eval_transform(model, args.image_size, recipe=bench.components["recipe"]))
        eval_idx = bench.data.eval_indices(seed)
        test_sets[tf_key] = folder if eval_idx is None else Subset(folder, eval_idx)
    return test_sets[tf_key]


def train_one(bench: Benchmark, seed: int, shots: int, m: str, idx: list[int], plan: Any, train_folder: Any,
              test_sets: dict[tuple[Any, ...], Any]) -> dict[str, Any]:
    """Train a fresh classifier for one (seed, shots, method) and evaluate it; its result row."""
    from torch.utils.data import Subset
    from torchvision.datasets import ImageFolder

    from ..classify import TrainConfig, build_classifier, train_classifier, train_transform
    from ..dataset import SyntheticAugmentedDataset

    args, components, configs, source = bench.args, bench.components, bench.configs, bench.source
    model = build_classifier(args.backbone, len(source.classes), class_names=source.class_names,
                             mode=args.mode, pretrained=configs.pretrained, clip_model=bench.models.clip_model,
                             seed=seed, device=bench.device,
                             **({"clip_head": components["clip_head"]} if components["clip_head"] else {}),
                             **({"bn_mode": components["bn_mode"]} if components["bn_mode"] else {}))
    spec = model.spec
    train_tf = train_transform(model, args.image_size, recipe=components["recipe"])
    folder_idx = [bench.data.train_indices[i] for i in idx]
    if plan is None:  # real images only
        train_set: Any = Subset(ImageFolder(str(bench.data.train_root), transform=train_tf), folder_idx)
    else:
        cache: Any = configs.caches.get((seed, shots, m), configs.caches.get(method_of(m).generator))
        train_set = SyntheticAugmentedDataset(Subset(train_folder, folder_idx), plan, cache,
                                              p=args.p, transform=train_tf, on_miss="error", seed=seed)
    eval_set = _eval_set(bench, model, seed, test_sets)
    test_metrics = _Evaluation(bench, model, eval_set, seed)

    epoch_metrics: list[dict[str, Any]] = []
    on_epoch_end = ((lambda record: epoch_metrics.append(test_metrics(record["epoch"])))
                    if args.protocol == "reference" else None)
    t0 = time.perf_counter()
    history = train_classifier(model, train_set, TrainConfig(**{**configs.train_config.to_dict(), "seed": seed}),
                               progress=bench.progress, on_epoch_end=on_epoch_end)
    train_seconds = time.perf_counter() - t0 - test_metrics.seconds
    bench.timing["train"] += train_seconds

    protocol_fields: dict[str, Any] = {"protocol": args.protocol}
    if args.protocol == "honest":
        metrics = test_metrics(args.epochs - 1)
    else:  # the run's own best epoch; summarize() picks the epoch of the seed-averaged curve
        curve = [e["mean_per_class"] for e in epoch_metrics]
        run_best = best_epoch(curve)
        metrics = epoch_metrics[run_best]
        protocol_fields.update(best_epoch=run_best, epoch_mean_per_class=curve,
                               epoch_top1=[e["top1"] for e in epoch_metrics])
    bench.timing["evaluate"] += test_metrics.seconds
    return {
        "run_key": bench.run_key(seed, shots, m), "dataset": bench.data.name, "backbone": args.backbone,
        "mode": args.mode, "method": m, "label": method_label(m, bench.bank), "shots": shots, "seed": seed,
        **protocol_fields, **components, **_settings(bench, m), "eval_pool": len(eval_set),
        "top1": metrics["top1"], "mean_per_class": metrics["mean_per_class"], "n_test": metrics["n"],
        "per_class": metrics["per_class"], "per_class_n": metrics["per_class_n"],
        **({"filter": bench.filter_info[(seed, shots, m)]} if (seed, shots, m) in bench.filter_info else {}),
        "n_train_real": len(folder_idx), "n_synthetic": len(plan) if plan is not None else 0,
        "p": args.p if plan is not None else 0.0,
        "plan": None if plan is None else {
            "folder": f"plans/seed{seed}-{shots}shot-{m}", "mean_score": plan.summary["mean_score"],
            "low_share": plan.summary["low_share"], "lambda": plan.summary["lambda"],
        },
        "classifier": {"weights": spec.weights, "optimizer": configs.train_config.optimizer or spec.optimizer,
                       "lr": configs.train_config.lr or spec.lr, "image_size": args.image_size or spec.input_size},
        "final_epoch": history[-1], "train_seconds": train_seconds, "eval_seconds": test_metrics.seconds,
        "eval_forwards": test_metrics.forwards,
    }
