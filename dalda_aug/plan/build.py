"""Building a plan (:func:`build_plan`): reading and hashing the sources, scoring them with CLIP,
drawing each variant's prompt, λ and seed."""

from __future__ import annotations

import os
from collections import Counter
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence, Union

import numpy as np

from ..config import ModelConfig
from ..data import ImageSource, SourceItem, check_scaled_size, image_sha256
from ..errors import InputError
from ..prompts.presets import PHOTO_TEMPLATE
from . import AugmentationPlan
from .ags import Scaling, ags_parameters, lambda_from_uniforms, sample_scales
from .folder import PLAN_FORMAT
from .variant import Variant, derive_seed, seed_from_prefix, seed_prefix

if TYPE_CHECKING:
    from ..prompts import PromptBank
    from .clipscore import CLIPScorer

# A prompt bank, or {class name: [prompts]}.
Prompts = Union["PromptBank", Mapping[str, Sequence[str]]]

__all__ = ["build_plan", "MAX_VARIANTS", "BASE_TEMPLATE", "Processes", "Prompts", "process_share"]

#: The most variants per source image a plan may hold (the paper uses 10; a mistyped -M 1000000000
#: would ask for tens of GiB before anything else happens).
MAX_VARIANTS = 10_000
BASE_TEMPLATE = PHOTO_TEMPLATE
# Source images read (decoded, hashed, resized) and scored at a time: the chunk being scored (its
# pixel tensor, about 77 MB at 224 px) and the one being read (resized RGB images, about 19 MB) are
# held. A multiple of clipscore.SCORE_BLOCK, so only the last block of a plan is padded; any value
# gives the same scores.
_CHUNK = 128
_READ_WORKERS = min(8, os.cpu_count() or 1)  # threads that decode, hash and resize sources


class Processes(Protocol):
    """This process's place among the processes that plan together (``accelerate.PartialState``)."""

    @property
    def process_index(self) -> int: ...

    @property
    def num_processes(self) -> int: ...


def _class_prompts(prompts: Prompts | None, class_name: str, base_name: str | None = None) -> list[str]:
    if prompts is None:
        return [BASE_TEMPLATE.format(base_name if base_name is not None else class_name)]
    if class_name not in prompts:
        raise InputError(f"the prompt bank has no prompts for class {class_name!r}")
    found = [str(p).replace("{name}", base_name if base_name is not None else class_name) for p in prompts[class_name]]
    if not found:
        raise InputError(f"the prompt bank has an empty prompt list for class {class_name!r}")
    return found


_READ_SLICE = 16  # sources one reading task decodes, hashes and prepares


def _read_slice(items: Sequence[SourceItem], scorer: CLIPScorer | None) -> tuple[list[str], list[Any]]:
    """Decode each source, hash its pixels and (with a scorer) prepare it for CLIP, in order; an
    image whose resize for CLIP would be too large is refused (naming it) before it is resized."""
    hashes, prepared = [], []
    edge = scorer.input_edge if scorer is not None else 0
    for item in items:
        img = item.load()
        hashes.append(image_sha256(img))
        if scorer is not None:
            check_scaled_size(img.size, edge, str(getattr(item.load, "path", None) or f"source {item.source!r}"))
            prepared.append(scorer.prepare(img))
    return hashes, prepared


def _read_and_score(items: Sequence[SourceItem], class_names: Sequence[str], scorer: CLIPScorer | None,
                    progress: bool = False, workers: int | None = None) -> tuple[list[str], np.ndarray | None]:
    """Content hashes of ``items`` and, with a scorer, their CLIPScores (else ``None``).

    Sources are read ``_CHUNK`` at a time by ``workers`` threads (``_READ_WORKERS`` by default),
    each task decoding, hashing and preparing ``_READ_SLICE`` sources (PIL decoding and resizing,
    hashlib and torch release the GIL), while the scorer runs on the previous chunk; results keep
    the order of ``items`` and the first unreadable item raises, as in a plain loop. The scores are
    those :meth:`~dalda_aug.plan.clipscore.CLIPScorer.score` gives each image alone: they do not depend on
    the chunk, the order, the number of threads or the other items.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    from tqdm.auto import tqdm

    items = list(items)
    workers = _READ_WORKERS if workers is None else int(workers)
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers!r}")
    hashes: list[str] = []
    chunks: list[np.ndarray] = []
    if scorer is not None and items:
        scorer.load()  # before the threads use its transform
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dalda-read")

    def submit(start: int) -> list[Future[tuple[list[str], list[Any]]]]:
        stop = min(start + _CHUNK, len(items))
        return [pool.submit(_read_slice, items[i : min(i + _READ_SLICE, stop)], scorer)
                for i in range(start, stop, _READ_SLICE)]

    try:
        with tqdm(total=len(items), desc="reading and scoring sources", unit="img", disable=not progress) as bar:
            pending = submit(0)
            for start in range(0, len(items), _CHUNK):
                done = [f.result() for f in pending]
                pending = submit(start + _CHUNK)
                prepared: list[Any] = []
                for part_hashes, part_prepared in done:
                    hashes.extend(part_hashes)
                    prepared.extend(part_prepared)
                if scorer is not None:
                    labels = [item.label for item in items[start : start + len(prepared)]]
                    chunks.append(scorer.score(scorer.pixels(prepared), labels, class_names, progress=False))
                bar.update(min(_CHUNK, len(items) - start))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if scorer is None:
        return hashes, None
    return hashes, np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float64)


def process_share(processes: Processes | None) -> tuple[int, int]:
    """(rank, world size) of an accelerate-like ``processes`` (``process_index``/``num_processes``),
    (0, 1) for ``None``; an index outside ``[0, num_processes)`` is an :class:`InputError`. The
    planning and filtering processes share the work by it."""
    if processes is None:
        return 0, 1
    rank, world = int(processes.process_index), int(processes.num_processes)
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"processes: process_index {rank} is not in [0, num_processes={world})")
    return rank, world


def _gather_shares(hashes: list[str], scores: np.ndarray | None, world: int) -> tuple[list[str], np.ndarray | None]:
    """Every process's (hashes, scores), concatenated in process order, on every process.

    Over torch.distributed on a CPU gloo group (a new one when the default group is NCCL); the
    float64 scores travel exactly. Only this library's own processes exchange these objects.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != world:
        raise InputError(f"processes says {world} processes, but torch.distributed is not initialized for them "
                         "(build it with accelerate.PartialState() under `accelerate launch` or `torchrun`)")
    # new_group is typed to return a marker for non-members; every process is a member here
    group: Any = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    share = (hashes, None if scores is None else [float(x) for x in scores])
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, share, group=group)
    if group is not None:
        dist.destroy_process_group(group)
    all_hashes = [sha for part_hashes, _ in gathered for sha in part_hashes]
    if scores is None:
        return all_hashes, None
    return all_hashes, np.array([x for _, part in gathered for x in part], dtype=np.float64)


def _variant_seeds(seed: int, source_sha256: str, variants: int) -> list[int]:
    """``[derive_seed(seed, source_sha256, k) for k in range(variants)]``, the common prefix hashed once."""
    prefix = seed_prefix(seed, source_sha256)
    return [seed_from_prefix(prefix, k) for k in range(variants)]


_LAMBDA_BLOCK = 1 << 16  # λ drawn by inversion this many at a time (bounds the temporaries' memory)


def _draw_lambdas(hashes: Sequence[str], scores: np.ndarray, shots: Sequence[int], variants: int, seed: int,
                  scaling: Scaling) -> np.ndarray:
    """The ``(sources, variants)`` λ of a plan: row ``i`` is
    ``sample_scales(np.full(variants, scores[i]), shots[i], rng_i, scaling)`` with ``rng_i`` seeded by
    ``derive_seed(seed, hashes[i], 0, scaling.seed_purpose)`` (``"lambda"``; ``"strength"`` for
    DA-Fusion's strengths), exactly.

    AGS's truncated normal (:func:`~dalda_aug.plan.ags.lambda_from_uniforms`) inverts scipy's
    ``truncnorm`` CDF, whose call costs
    about a millisecond whatever its size: there each source's uniforms are drawn from its own
    generator as ``sample_lambda`` draws them, and the inversion, an elementwise function, runs over
    many sources at once. The other strategies call :func:`~dalda_aug.plan.ags.sample_scales` per source.
    """
    n_sources = len(hashes)
    rngs = (np.random.default_rng(derive_seed(seed, sha, 0, scaling.seed_purpose)) for sha in hashes)
    if scaling.strategy != "ags" or scaling.ags.mode != "truncnorm":
        out = np.empty((n_sources, variants), dtype=np.float64)
        for i, rng in enumerate(rngs):
            out[i] = sample_scales(np.full(variants, scores[i]), shots[i], rng, scaling)
        return out
    # what sample_lambda draws, per source: u = rng.random(variants) after ags_parameters (no draw)
    uniforms = np.empty((n_sources, variants), dtype=np.float64)
    for i, rng in enumerate(rngs):
        uniforms[i] = rng.random(variants)
    u = uniforms.reshape(-1)
    row_scores = np.repeat(np.asarray(scores, dtype=np.float64), variants)
    row_shots = np.repeat(np.asarray(shots, dtype=np.int64), variants)
    out = np.empty(u.shape, dtype=np.float64)
    for start in range(0, u.size, _LAMBDA_BLOCK):
        part = slice(start, start + _LAMBDA_BLOCK)
        out[part] = lambda_from_uniforms(u[part], *ags_parameters(row_scores[part], row_shots[part], scaling.ags))
    return out.reshape(n_sources, variants)


def build_plan(
    source: ImageSource | str | os.PathLike[str],
    *,
    variants: int = 10,
    seed: int = 0,
    n_shot: int | None = None,
    scaling: Scaling = Scaling(),
    prompts: Prompts | None = None,
    models: ModelConfig | None = None,
    scorer: CLIPScorer | None = None,
    scores: Sequence[float] | None = None,
    progress: bool | None = None,
    base_prompt_names: str = "readable",
    processes: Processes | None = None,
) -> AugmentationPlan:
    """Plan ``variants`` synthetic images per real image.

    Args:
        source: an image folder path or an :class:`~dalda_aug.data.ImageSource`
            (``ImageSource.from_dataset(ds)`` wraps any dataset of ``(PIL image, label)``).
        variants: M, images to generate per source image.
        seed: the plan seed; every λ, prompt order and generation seed derives from it.
        n_shot: if given, keep ``n_shot`` images per class with a seeded split (nested in n);
            σ of AGS uses it. Otherwise all images are used and n is each class's image count.
        scaling: λ strategy (:class:`~dalda_aug.plan.ags.Scaling`); under ``"da-fusion-strength"``
            each drawn value is the row's img2img ``strength`` as well as its λ.
        prompts: a :class:`~dalda_aug.prompts.PromptBank` (or ``{class name: [prompts]}``);
            ``None`` uses "a photo of a {class}". Variant k gets prompt k of its class in a
            per-image seeded order (cycling if the class has fewer than M prompts).
        models: where the CLIP model lives (``ModelConfig()`` by default); recorded in the plan.
        scorer: a :class:`~dalda_aug.plan.clipscore.CLIPScorer` (built from ``models`` if omitted).
        scores: precomputed CLIPScores, one per source image (skips the scorer).
        base_prompt_names: the class name written into the base prompt (and into a prompt
            bank's ``{name}`` placeholders): ``"readable"`` ("a photo of a american bulldog",
            the paper's text) or ``"folder"`` (the folder name as is, "a photo of a
            american_bulldog", as the reference code writes it). CLIPScores always use the
            readable names.
        processes: an ``accelerate.PartialState`` (or anything with ``process_index`` and
            ``num_processes``) when several processes plan together (``accelerate launch``,
            ``torchrun``): every process must call ``build_plan`` with the same arguments; each
            reads and scores its share of the sources, the shares are gathered over
            ``torch.distributed`` (a CPU gloo group) and every process returns the whole plan,
            the same as one process makes. Save it from the main process only.
    """
    if base_prompt_names not in ("readable", "folder"):
        raise InputError(f"base_prompt_names must be 'readable' or 'folder', got {base_prompt_names!r}")
    if int(variants) != variants or not 1 <= variants <= MAX_VARIANTS:
        raise InputError(f"variants must be an integer in [1, {MAX_VARIANTS}], got {variants!r}")
    if int(seed) != seed or seed < 0:
        raise InputError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(scaling, Scaling):
        raise InputError(f"scaling must be a Scaling, got {type(scaling).__name__}")
    if not isinstance(source, ImageSource):
        source = ImageSource.from_folder(source)
    if n_shot is not None:
        source = source.few_shot(n_shot, seed)
    if len(source) == 0:
        raise InputError("no source images to plan for")
    models = models or ModelConfig()
    class_names = source.class_names
    for name in set(class_names):
        _class_prompts(prompts, name)  # fail early on a missing class

    labels = [item.label for item in source.items]
    if scores is not None:
        scores_arr = np.asarray(scores, dtype=np.float64)
        if scores_arr.shape != (len(labels),):
            raise InputError(f"got {scores_arr.size} scores for {len(labels)} source images")
        score_kind = "given"
    elif scorer is None:
        from .clipscore import CLIPScorer

        scorer = CLIPScorer.from_models(models)
    # Each process (one without `processes`) reads, hashes and scores its contiguous share of the
    # sources; the shares are gathered in process order. A score does not depend on which images
    # share its forward pass (clipscore.SCORE_BLOCK), so any split gives the one-process plan.
    rank, world = process_share(processes)
    lo, hi = rank * len(labels) // world, (rank + 1) * len(labels) // world
    show = (progress if progress is not None else len(labels) > _CHUNK) and rank == 0
    hashes, read_scores = _read_and_score(source.items[lo:hi], class_names, scorer if scores is None else None,
                                          progress=show)
    if world > 1:
        hashes, read_scores = _gather_shares(hashes, read_scores, world)
    if scores is None:
        assert read_scores is not None  # a scorer was given or built above
        scores_arr = read_scores
        score_kind = getattr(scorer, "kind", "softmax")
    if len(source.classes) == 1 and score_kind == "softmax" and scaling.strategy == "ags":
        import logging

        logging.getLogger(__name__).warning(
            "%s holds one class (%s): a softmax CLIPScore over one class is always 1, so AGS draws every λ from "
            "its High range whatever the image; add classes, or score with kind 'cosine' (--score-kind cosine)",
            source.root or "the source", source.classes[0])
    bad = np.flatnonzero(~np.isfinite(scores_arr) | (scores_arr < 0) | (scores_arr > 1))
    if bad.size and scaling.strategy == "ags":
        i = int(bad[0])
        raise InputError(f"score {float(scores_arr[i])!r} of {source.items[i].source!r} lies outside [0, 1]")

    per_class = Counter(labels)
    shots = [n_shot if n_shot is not None else per_class[label] for label in labels]
    lams = _draw_lambdas(hashes, scores_arr, shots, int(variants), seed, scaling)
    strength = scaling.draws_strength
    options_of: dict[int, list[str]] = {}  # each class's prompts, built once
    rows: list[Variant] = []
    for item, sha, score, source_lams in zip(source.items, hashes, scores_arr, lams):
        label = item.label
        options = options_of.get(label)
        if options is None:
            options = options_of[label] = _class_prompts(
                prompts, class_names[label], source.classes[label] if base_prompt_names == "folder" else None)
        name = class_names[label]
        # a permutation of one prompt is [0]: the seeded order is drawn only where there is a choice
        order = (np.random.default_rng(derive_seed(seed, sha, 0, "prompts")).permutation(len(options)).tolist()
                 if len(options) > 1 else [0])
        rounded = round(float(score), 8)
        for k, (lam, variant_seed) in enumerate(zip(source_lams.tolist(), _variant_seeds(seed, sha, int(variants)))):
            # a strength is one of the given values, kept as given (a drawn λ is rounded)
            rows.append(Variant(item.source, label, name, rounded, k, options[order[k % len(options)]],
                                lam if strength else round(lam, 8), variant_seed, sha, lam if strength else None))
    provenance = dict(getattr(prompts, "provenance", None) or {"backend": "unknown"}) if prompts is not None else None
    config = {
        "format": PLAN_FORMAT,
        "seed": int(seed),
        "n_shot": n_shot,
        "variants_per_image": int(variants),
        "scaling": scaling.to_dict(),
        "score_kind": score_kind,
        "models": models.to_dict(),
        "data_root": source.root,
        "classes": source.classes,
        "class_names": class_names,
        "prompts": provenance if prompts is not None else {"backend": "template", "template": BASE_TEMPLATE,
                                                           "class_names": base_prompt_names},
    }
    return AugmentationPlan(rows, config)
