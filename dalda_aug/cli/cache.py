"""``dalda-aug warm`` and ``dalda-aug cache stats|verify|specs|export``.

Registered into the main parser by :func:`register`; the work is done by
:func:`dalda_aug.cache.warm.warm` and :class:`dalda_aug.cache.SyntheticCache`.

The generation settings (``--models``, ``--steps``, ``--size``, ``--guidance-scale``,
``--scheduler``, ``--dtype``) decide the cache keys. ``warm`` records them in the cache folder,
so the reading commands (``cache stats|export``, ``metrics``, ``inspect``) need none of them;
given, they win over the recorded spec.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ._common import accelerate_cpu, add_threads_argument, check_threads, partial_state, set_threads

if TYPE_CHECKING:
    from ..cache.codecs import ImageCodec
    from ..cache import GenerationSpec, SyntheticCache
    from ..plan import AugmentationPlan

__all__ = ["register", "spec_from_args", "describe_settings", "add_data_root_argument", "add_spec_arguments",
           "spec_given", "cache_for_plan", "default_dtype", "partial_state", "check_device", "check_output_file",
           "check_output_folder"]


# -- argument checks made before any work (one line, exit status 2) -----------------------------
# torch's device types (torch.device accepts these names, optionally with ":N").
_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "xla", "hpu", "ipu", "mtia", "meta", "privateuseone", "vulkan",
                 "ve", "ort", "mkldnn", "opengl", "opencl", "ideep", "hip", "fpga", "maia", "lazy")


def check_device(device: str, option: str = "--device", *, available: bool = True) -> None:
    """``device`` names a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``);
    an :class:`~dalda_aug.errors.InputError` naming ``option`` otherwise. ``available=False`` checks
    the name only, without importing torch (fast: before a hub check that must answer at once)."""
    from ..errors import InputError

    kind, _, index = device.partition(":")
    if kind not in _DEVICE_TYPES or (index and not index.isdigit()) or (_ and not index):
        raise InputError(f"{option} {device!r} is not a torch device (cpu, cuda, cuda:N, mps, ...)")
    if device == "cpu" or not available:  # the common case, said without importing torch
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"{option} {device!r} is not a torch device (cpu, cuda, cuda:N, mps, ...)") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count or (parsed.index is not None and parsed.index >= count):
            raise InputError(f"{option} {device}: this machine has {count} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"{option} {device}: MPS is not available on this machine")
    elif parsed.type not in ("cpu", "cuda", "mps") and not hasattr(torch, parsed.type):
        raise InputError(f"{option} {device}: torch has no {parsed.type!r} backend here")


def _first_existing(path: Path) -> Path:
    while not path.exists() and not path.is_symlink() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(path: str, option: str = "--out") -> None:
    """``path`` is a folder, or can be made one (where it exists it is a folder; the first existing
    folder above it is writable); an :class:`~dalda_aug.errors.InputError` naming ``option`` otherwise."""
    from ..errors import InputError

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"{option} {path} is a file, not a folder; name a folder to write into")
    existing = _first_existing(out.absolute())
    if not existing.is_dir():
        raise InputError(f"{option} {path}: {existing} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: the folder {existing} cannot be written")


def check_output_file(path: str, option: str = "--out") -> None:
    """``path`` can be written as a file: not a folder, in an existing, writable folder; an
    :class:`~dalda_aug.errors.InputError` naming ``option`` otherwise."""
    from ..errors import InputError

    out = Path(path)
    if out.is_dir():
        raise InputError(f"{option} {path} is a folder; name a file to write the report to")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise InputError(f"{option} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: the folder {parent} cannot be written")


def add_spec_arguments(parser: argparse.ArgumentParser, *, plan_required: bool, reading: bool = False) -> None:
    """The options that make up a :class:`~dalda_aug.cache.GenerationSpec`. ``reading``: the
    command reads a warmed cache, so each option defaults to the spec ``warm`` recorded there."""
    parser.add_argument("--plan", required=plan_required, default=None, help="plan folder (dalda-aug plan)")
    if reading:
        recorded = "default: the spec `warm` recorded in the cache for the plan"
        parser.add_argument("--models", default=None,
                            help=f"models JSON (ModelConfig) the images were generated with ({recorded})")
        parser.add_argument("--steps", type=int, default=None, help=f"denoising steps ({recorded})")
        parser.add_argument("--size", type=int, default=None, help=f"image height and width in pixels ({recorded})")
        parser.add_argument("--guidance-scale", type=float, default=None, help=f"classifier-free guidance ({recorded})")
        parser.add_argument("--scheduler", default=None, help=f"ddim or dpmsolver++ ({recorded})")
        parser.add_argument("--dtype", default=None, help=f"float16, bfloat16 or float32 ({recorded})")
        return
    parser.add_argument("--models", default=None,
                        help="models JSON (ModelConfig); default: the models recorded in the plan, with the "
                             "option defaults recorded with them")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps (default 30, or the models file's: 2 for the tiny models)")
    parser.add_argument("--size", type=int, default=None,
                        help="output height and width in pixels (default 512, or the models file's: 64 for the "
                             "tiny models)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default 7.5)")
    parser.add_argument("--scheduler", default=None, help="ddim (default) or dpmsolver++")
    parser.add_argument("--dtype", default=None,
                        help="float16, bfloat16 or float32 (default: float16 when generating on a CUDA device, "
                             "as the reference does; float32 on the CPU)")


def spec_from_args(args: argparse.Namespace, plan: AugmentationPlan | None = None) -> GenerationSpec:
    """:class:`GenerationSpec` from the options of :func:`add_spec_arguments`."""
    from ..cache import GenerationSpec
    from ..config import load_models_arg
    from ..generators.ip_adapter import IPAdapterConfig
    from ..generators.base import GeneratorConfig

    if args.models is not None:
        models = load_models_arg(args.models)
    elif plan is not None and plan.models is not None:
        models = plan.models
    else:
        models = load_models_arg(None)
    changes: dict[str, Any] = {}
    if args.steps is not None:
        changes["num_inference_steps"] = args.steps
    if args.size is not None:
        changes["height"] = changes["width"] = args.size
    if args.guidance_scale is not None:
        changes["guidance_scale"] = args.guidance_scale
    if args.scheduler is not None:
        changes["scheduler"] = args.scheduler
    base: GeneratorConfig = IPAdapterConfig()
    recorded = plan.config.get("generator") if plan is not None else None
    if recorded:  # a plan made for another generator (e.g. DA-Fusion) names its config
        from ..generators.base import config_from_dict

        base = config_from_dict(recorded["method"], recorded.get("config") or {})
    config = dataclasses.replace(base, **changes)
    return GenerationSpec(models, config, args.dtype or default_dtype(getattr(args, "device", None)))


def default_dtype(device: str | None = None) -> str:
    """The generation dtype when ``--dtype`` is not given: ``"float16"`` on a CUDA device (the
    reference code generates in float16), else ``"float32"``. Without ``device``: the device
    ``warm`` would pick (CUDA when available and accelerate is not told ``--cpu``)."""

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() and not accelerate_cpu() else "cpu"
    return "float16" if str(device).startswith("cuda") else "float32"


def spec_given(args: argparse.Namespace) -> bool:
    """Whether any generation option of :func:`add_spec_arguments` was given."""
    return any(getattr(args, name, None) is not None
               for name in ("models", "steps", "size", "guidance_scale", "scheduler", "dtype"))


def cache_for_plan(args: argparse.Namespace, plan: AugmentationPlan) -> SyntheticCache:
    """The cache ``args.cache`` (must exist) bound to the spec of ``plan``'s images: the one the
    options give, else the one ``warm`` recorded in the folder."""
    from ..cache import SyntheticCache, open_cache_dir

    open_cache_dir(args.cache)
    if spec_given(args):
        return SyntheticCache(args.cache, spec_from_args(args, plan))
    cache = SyntheticCache(args.cache)
    return cache.with_spec(cache.resolve_spec(plan))


def _load_plan(path: str | None, data_root: str | None = None) -> AugmentationPlan | None:
    from ..plan import AugmentationPlan

    plan = AugmentationPlan.load(path) if path else None
    if plan is not None and data_root is not None:
        from ..cache.warm import rebase_plan

        plan = rebase_plan(plan, data_root)
    return plan


def add_data_root_argument(parser: argparse.ArgumentParser) -> None:
    """``--data-root DIR``: the plan's image folder, moved (checked by content hashes)."""
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="the plan's image folder if it moved since planning (the plan's sources are found "
                             "there by their relative paths and checked by their content hashes); default: the "
                             "folder the plan records")


# -- warm ---------------------------------------------------------------------------------------
def describe_settings(args: argparse.Namespace, spec: GenerationSpec, device: str) -> str:
    """``size 64 (tiny/models.json), steps 2 (tiny/models.json), dtype float32 (default on the CPU),
    device cpu (accelerate's choice)``: the settings ``warm`` generates with, each with where it
    came from (an option, the models file or the plan's recorded defaults, the plan, the default)."""
    used = getattr(args, "model_defaults", None) or {}
    where = getattr(args, "model_defaults_from", None) or args.models

    def origin(option: str) -> str:
        if option in used:
            return f"defaults of {where}"
        if getattr(args, option.replace("-", "_"), None) is not None:
            return f"--{option}"
        return "default"

    config = spec.config
    size = getattr(config, "height", None)
    steps = getattr(config, "num_inference_steps", None)
    dtype_from = "--dtype" if args.dtype is not None else f"default on {'CUDA' if device.startswith('cuda') else 'the CPU'}"
    device_from = "--device" if args.device is not None else "accelerate's choice"
    threads = f", {args.threads} CPU thread(s) ({origin('threads')})" if getattr(args, "threads", None) else ""
    return (f"size {size} ({origin('size')}), steps {steps} ({origin('steps')}), dtype {spec.dtype} ({dtype_from}), "
            f"device {device} ({device_from}){threads}")


def _run_warm(args: argparse.Namespace) -> int:

    from ..cache import SyntheticCache, default_shard_name
    from ..errors import InputError
    from ..cache.warm import check_dtype_on_device, warm

    quality = _quality(args.quality, args.format)  # before the plan is read
    check_threads(args.threads)
    plan = _load_plan(args.plan, args.data_root)
    spec = spec_from_args(args, plan)
    state = partial_state(args.device)
    rank, world = state.process_index, state.num_processes
    shard = args.shard or default_shard_name(rank)
    if args.shard and world > 1:
        shard = f"{args.shard}-{rank}"
    device = args.device or str(state.device)
    check_dtype_on_device(spec.dtype, device, f"--dtype {args.dtype or 'float16'}")  # before anything is written
    cache = SyntheticCache(args.cache, spec, image_format=args.format, shard=shard, quality=quality)
    # Say which share this process takes: e.g. `accelerate launch --cpu --num_processes 2`
    # starts ONE process (accelerate needs MPI for several CPU processes), silently otherwise.
    note = ""
    if world == 1 and accelerate_cpu():
        note = ("; `accelerate launch --cpu` starts one process: for N CPU processes use "
                "`accelerate launch --multi_gpu --num_processes N` on a machine without GPUs")
    print(f"dalda-aug warm: {describe_settings(args, spec, device)}; process rank {rank} of world size {world}, "
          f"cache shard shard-{cache.shard}{note}", flush=True)
    from ..cache.warm import WarmInterrupted

    set_threads(args.threads)
    try:
        report = warm(
            plan,
            cache,
            device=device,
            batch_size=args.batch_size,
            process_index=rank,
            num_processes=world,
            verify=args.verify,
            progress=not args.no_progress,
        )
    except WarmInterrupted as stop:
        print(f"dalda-aug warm: interrupted: {stop.kept} images kept ({stop.stored} written by this run, "
              f"{stop.assigned - stop.kept} still missing); rerun the same command to continue", file=sys.stderr,
              flush=True)
        return 130
    except KeyboardInterrupt:
        print("dalda-aug warm: interrupted before any image was generated; the cache is as it was: rerun the "
              "same command to continue", file=sys.stderr, flush=True)
        return 130
    print(f"dalda-aug warm: {report.summary()}", flush=True)
    if args.report:
        path = args.report.replace("{rank}", str(rank))
        from .._io import write_atomic

        try:
            write_atomic(path, json.dumps(report.to_dict(), indent=2))
        except OSError as exc:
            raise InputError(f"cannot write the report {path}: {exc.strerror or exc}") from None
    if world > 1:
        state.wait_for_everyone()
        if state.is_main_process:
            stats = cache.stats(plan)["plan"]
            print(f"dalda-aug warm: all {world} processes done; the cache holds {stats['cached']}/{stats['images']} "
                  f"images of the plan ({stats['coverage']:.1%})", flush=True)
    return 0


# -- cache stats | verify | export -----------------------------------------------------------
def _cache_for_reading(args: argparse.Namespace, plan: AugmentationPlan | None = None) -> SyntheticCache:
    from ..cache import SyntheticCache, open_cache_dir

    if plan is not None:
        return cache_for_plan(args, plan)
    open_cache_dir(args.cache)
    return SyntheticCache(args.cache)


def _run_stats(args: argparse.Namespace) -> int:
    from ..cache.disks import human_bytes

    plan = _load_plan(args.plan)
    cache = _cache_for_reading(args, plan)
    stats = cache.stats(plan)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"cache {stats['directory']}: {stats['entries']} images, {human_bytes(stats['bytes'])} on disk, "
          f"{len(stats['shards'])} shard(s), {stats['corrupt_removed']} corrupt entries removed so far")
    if stats["bad"]:
        print(f"  {stats['bad']} damaged entries not counted (they fail their checksums): `dalda-aug cache verify "
              "--remove` removes them, `dalda-aug warm` regenerates them")
    for shard in stats["shards"]:
        print(f"  shard {shard['name']}: {shard['entries']} images, {human_bytes(shard['bytes'])}")
    if plan is not None:
        p = stats["plan"]
        print(f"plan {args.plan}: {p['cached']}/{p['images']} images cached ({p['coverage']:.1%}), "
              f"{p['missing']} missing (generation fingerprint {p['fingerprint']})")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    cache = _cache_for_reading(args)
    report = cache.verify(remove=args.remove, progress=not args.no_progress)
    for bad in report["bad"]:
        print(f"bad entry {bad['key']} in shard {bad['shard']}: {bad['error']}")
    action = f", removed {report['removed']}" if args.remove else ""
    if report["unchecked_metadata"]:
        action += (f"; {report['unchecked_metadata']} older entries have no metadata checksum (their label and "
                   "class are not verified)")
    print(f"verified {report['checked']} entries: {report['ok']} ok, {len(report['bad'])} bad{action}")
    return 1 if report["bad"] and not args.remove else 0


def _run_export(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..cache.export import check_export_format, export

    check_export_format(args.export_as)  # before the plan and the cache are read
    try:
        shard_size = None if args.shard_size is None else int(args.shard_size)
    except ValueError:
        raise InputError(f"--shard-size {args.shard_size}: not a whole number of samples") from None
    plan = _load_plan(args.plan)
    cache = _cache_for_reading(args, plan)
    result = export(cache, args.out, args.export_as, plan, shard_size=shard_size, progress=not args.no_progress)
    extra = f" ({result['missing']} images of the plan are not cached)" if result["missing"] else ""
    if result.get("corrupt"):
        extra += f"; {result['corrupt']} corrupt entries skipped"
    if args.export_as == "imagefolder":
        print(f"exported {result['exported']} images to {result['out']} (+ samples.csv){extra}")
    else:
        print(f"exported {result['exported']} images to {result['out']} as {args.export_as}: {result['shards']} "
              f"shard(s), {result['written']} written, {result['skipped']} already complete "
              f"(+ {result['manifest']}){extra}")
    return 0


def _run_specs(args: argparse.Namespace) -> int:
    from ..cache import SyntheticCache, open_cache_dir

    open_cache_dir(args.cache)
    cache = SyntheticCache(args.cache)
    if args.forget:  # acts on the records it names only: another record, even a corrupt one, is not read
        removed = cache.forget_spec(args.forget)
        entries = cache.entries_of_spec(args.forget)
        kept = f"; its {entries} entries stay in the cache" if entries else ""
        print(f"forgot spec {args.forget}: removed {len(removed)} record(s) from {cache.directory / 'specs'}{kept}")
        return 0
    plan = _load_plan(args.plan)
    rows = cache.spec_summary(plan)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"cache {cache.directory}: no generation spec recorded")
        return 0
    print(f"cache {cache.directory}: {len(rows)} recorded generation spec(s)")
    for row in rows:
        held = f"{row['entries']} entries"
        if plan is not None:
            held += f", {row['plan_cached']}/{row['plan_images']} images of plan {args.plan}"
        plans = ", ".join(row["plans"]) or "none"
        print(f"  {row['fingerprint']}: {row['description']}; {held}; recorded for plan(s) {plans}")
    return 0


def _describe_formats(codecs: Iterable[ImageCodec], default: str) -> str:
    """``lz4 (default; fastest to read in training), png, webp (smallest), or raw (uncompressed)``:
    each image format of the registry with its note."""
    names = []
    for codec in codecs:
        notes = (["default"] if codec.name == default else []) + ([codec.note] if codec.note else [])
        names.append(f"{codec.name} ({'; '.join(notes)})" if notes else codec.name)
    return ", ".join(names[:-1]) + ", or " + names[-1] if len(names) > 1 else "".join(names)


def _quality(text: str | None, image_format: str) -> int | None:
    """``--quality``: None, or an integer in 1..100 for a lossy ``--format``, else an
    :class:`~dalda_aug.errors.InputError` (one line, exit status 2)."""
    from ..cache.codecs import check_quality
    from ..errors import InputError

    if text is None:
        return None
    try:
        number: Any = int(text)
    except ValueError:
        number = text  # refused by the range check below, as it was given
    value = check_quality(number, what="--quality")  # the range: one line naming the option
    try:
        return check_quality(value, image_format)  # a quality the format takes
    except InputError as exc:
        raise InputError(f"--quality {value}: {exc} (--format {image_format})") from None


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser(
        "warm",
        help="generate every image of a plan that is not cached yet (resumable, multi-GPU with accelerate)",
        description="Generate the plan's images missing from the cache. Runs alone or under `accelerate launch` "
                    "(each process takes a disjoint share of the keys and writes its own cache shard "
                    "CACHE/shard-<host>-<rank>). Resumable: rerun after an interruption to finish.",
    )
    add_spec_arguments(p, plan_required=True)
    p.add_argument("--cache", required=True, help="cache folder")
    add_data_root_argument(p)
    p.add_argument("--batch-size", type=int, default=None, help="images per generator call (default: automatic)")
    p.add_argument("--device", default=None, help="torch device (default: accelerate's device for this process)")
    from ..cache.codecs import CODECS, DEFAULT_IMAGE_FORMAT, DEFAULT_QUALITY, image_formats

    p.add_argument("--format", choices=image_formats(), default=DEFAULT_IMAGE_FORMAT,
                   help=f"image encoding of new entries: {_describe_formats(CODECS.values(), DEFAULT_IMAGE_FORMAT)}")
    p.add_argument("--quality", default=None,
                   help=f"1-100, lossy encodings only: jpeg (default {DEFAULT_QUALITY}), webp (lossless without it); "
                        "stored in each entry's header")
    p.add_argument("--shard", default=None,
                   help=f"cache shard name (default <host>-<rank>, e.g. {socket.gethostname()}-0)")
    add_threads_argument(p)
    p.add_argument("--verify", action="store_true",
                   help="first decode this process's cached entries, regenerate bad ones")
    p.add_argument("--report", default=None, help="write this process's summary as JSON ({rank} is replaced)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_warm)

    p = subparsers.add_parser(
        "cache",
        help="inspect a synthetic-image cache: stats, verify, specs, export",
        description="Inspect a synthetic-image cache folder.",
    )
    sub = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)

    s = sub.add_parser("stats", help="entries, bytes, shards and the share of a plan covered")
    s.add_argument("--cache", required=True, help="cache folder")
    add_spec_arguments(s, plan_required=False, reading=True)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_run_stats)

    s = sub.add_parser("verify", help="decode every entry; report (or --remove) bad ones")
    s.add_argument("--cache", required=True, help="cache folder")
    s.add_argument("--remove", action="store_true", help="delete bad entries (they are regenerated on next use)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_run_verify)

    s = sub.add_parser("specs", help="list the generation specs recorded in the cache (or --forget one)",
                       description="List each generation spec recorded in CACHE/specs/ with how many entries it "
                                   "holds (and, with --plan, how many of the plan's images), or forget one: "
                                   "--forget FINGERPRINT deletes its records (its entries stay).")
    s.add_argument("--cache", required=True, help="cache folder")
    s.add_argument("--plan", default=None, help="plan folder: also count each spec's images of this plan")
    s.add_argument("--forget", default=None, metavar="FINGERPRINT",
                   help="delete the records of the spec with this fingerprint (16 hex digits)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_run_specs)

    s = sub.add_parser("export", help="write cached images as an image folder, WebDataset shards or Parquet files")
    s.add_argument("--cache", required=True, help="cache folder")
    s.add_argument("--out", required=True,
                   help="output folder (outside the cache; new, empty or an earlier export of the format): "
                        "OUT/<class>/<key>.png + OUT/samples.csv, or OUT/shard-000000.tar|parquet..., with "
                        "a manifest in OUT/.dalda-export/ or OUT/.manifest-imagefolder.json")
    from ..cache.export import DEFAULT_EXPORT_FORMAT, EXPORT_FORMATS

    s.add_argument("--as", dest="export_as", default=DEFAULT_EXPORT_FORMAT, metavar="FORMAT",
                   help=f"{' | '.join(EXPORT_FORMATS)} (default {DEFAULT_EXPORT_FORMAT}); webdataset: tar shards "
                        "of <key>.png, .cls, .json; parquet: Hugging Face Image and ClassLabel features; sharded "
                        "exports resume where a killed run stopped")
    s.add_argument("--shard-size", default=None, metavar="N",
                   help="samples per tar shard / rows per Parquet file (default 1000; webdataset and parquet)")
    add_spec_arguments(s, plan_required=False, reading=True)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_run_export)

