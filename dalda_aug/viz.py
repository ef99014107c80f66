"""Pictures of a plan: the CLIPScore histogram (paper Fig. 4), the λ distribution, and contact
sheets of real images next to their generated variants.

matplotlib is imported on use (``pip install 'dalda-aug[viz]'``) with the non-interactive Agg
backend, so the plots work on headless machines.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, Union

import numpy as np
import numpy.typing as npt

from .errors import InputError, require

if TYPE_CHECKING:
    from PIL import Image, ImageDraw, ImageFont

    from .cache import SyntheticCache
    from .plan import AugmentationPlan

    Font = Union[ImageFont.FreeTypeFont, ImageFont.ImageFont]

__all__ = ["plot_score_histogram", "plot_lambda_distribution", "contact_sheet", "contact_sheet_size",
           "plan_contact_sheet", "filter_contact_sheet"]


def _pyplot() -> Any:
    matplotlib = require("matplotlib", "viz")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | os.PathLike[str]) -> Path:
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _source_scores(plan: AugmentationPlan) -> npt.NDArray[np.float64]:
    return np.array([vs[0].score for vs in plan.by_source().values()], dtype=np.float64)


def plot_score_histogram(plans: Mapping[str, AugmentationPlan], path: str | os.PathLike[str], alpha: float | None = None,
                         bins: int = 20) -> Path:
    """Histogram of the source images' CLIPScores, one panel per dataset, α marked.

    ``plans`` maps a dataset name to its :class:`~dalda_aug.plan.AugmentationPlan`.
    """
    if not plans:
        raise InputError("no plan to plot")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(plans), figsize=(4.2 * len(plans), 3.4), squeeze=False)
    for ax, (name, plan) in zip(axes[0], plans.items()):
        scores = _source_scores(plan)
        a = alpha if alpha is not None else plan.summary.get("alpha", 0.3)
        ax.hist(scores, bins=bins, range=(0, 1), color="#4C72B0", edgecolor="white")
        ax.axvline(a, color="#C44E52", linestyle="--", label=f"α = {a:g}")
        low = float(np.mean(scores <= a)) if scores.size else 0.0
        ax.set_title(f"{name}: mean {scores.mean():.2f}, Low {low:.0%}" if scores.size else name)
        ax.set_xlabel("CLIPScore (zero-shot probability of own class)")
        ax.set_ylabel("source images")
        ax.legend(loc="upper left")
    return _save(plt, fig, path)


def plot_lambda_distribution(plan: AugmentationPlan, path: str | os.PathLike[str], bins: int = 40) -> Path:
    """Histogram of the planned λ, split into Low (score ≤ α) and High sources."""
    plt = _pyplot()
    a = float(plan.summary.get("alpha", 0.3))
    low = np.array([v.lam for v in plan if v.score <= a])
    high = np.array([v.lam for v in plan if v.score > a])
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    top = max(1.0, float(max(low.max(initial=0), high.max(initial=0))))
    if low.size:
        ax.hist(low, bins=bins, range=(0, top), alpha=0.75, color="#C44E52", label=f"Low (score ≤ {a:g}), n={low.size}")
    if high.size:
        ax.hist(high, bins=bins, range=(0, top), alpha=0.75, color="#4C72B0", label=f"High, n={high.size}")
    ax.set_xlabel("λ (IP-Adapter scale)")
    ax.set_ylabel("variants")
    ax.set_title(f"λ per variant — {plan.config.get('scaling', {}).get('strategy', '?')}")
    ax.legend()
    return _save(plt, fig, path)


# Contact-sheet layout (pixels).
_GAP = 8
_TITLE = 30
_CAPTION = 58
_FONT_SIZE = 12




def _font_file() -> str | None:
    """A TrueType font with Greek letters (for "λ"): DejaVu Sans from matplotlib or the system."""
    import importlib.util

    candidates = []
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf")
    candidates.append(Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"))
    return next((str(c) for c in candidates if c.is_file()), None)


def _font(size: int = _FONT_SIZE) -> Font:
    from PIL import ImageFont

    path = _font_file()
    if path is not None:
        try:
            return ImageFont.truetype(path, size)
        except OSError:  # pragma: no cover - no FreeType support
            pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _lambda_label() -> str:
    return "λ" if _font_file() is not None else "lambda"


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels, at most ``max_lines`` lines (ellipsis if cut)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            while draw.textlength(word, font=font) > width and len(word) > 1:  # a very long word
                cut = len(word)
                while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and draw.textlength(last + "…", font=font) > width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines


def contact_sheet_size(rows: int, columns: int, tile: int) -> tuple[int, int]:
    """Pixel size ``(width, height)`` of a contact sheet with that grid."""
    width = columns * tile + (columns + 1) * _GAP
    height = _TITLE + rows * (tile + _CAPTION) + (rows + 1) * _GAP
    return width, height


def contact_sheet(rows: Sequence[tuple[Image.Image, str, Sequence[tuple[Image.Image, str]]]], tile: int = 256,
                  title: str = "") -> Image.Image:
    """One row per source: ``(original image, caption, [(variant image, caption), ...])``.

    Images are fitted into ``tile`` x ``tile`` squares (aspect ratio kept) above their
    captions; rows with fewer variants leave blank cells. Returns a PIL RGB image of
    :func:`contact_sheet_size`.
    """
    from PIL import Image, ImageDraw, ImageOps

    if not rows:
        raise InputError("a contact sheet needs at least one row")
    columns = 1 + max(len(r[2]) for r in rows)
    sheet = Image.new("RGB", contact_sheet_size(len(rows), columns, tile), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font()
    title_font = _font(16)
    for line in _wrap(draw, title, title_font, sheet.width - 2 * _GAP, 1):  # one line, "…" if cut
        draw.text((_GAP, 8), line, fill="black", font=title_font)
    line_height = _FONT_SIZE + 3
    for r, (original, caption, variants) in enumerate(rows):
        y = _TITLE + _GAP + r * (tile + _CAPTION + _GAP)
        cells = [(original, caption)] + list(variants)
        for c, (image, text) in enumerate(cells):
            x = _GAP + c * (tile + _GAP)
            fitted = ImageOps.pad(image.convert("RGB"), (tile, tile), method=Image.Resampling.BICUBIC,
                                  color=(235, 235, 235))
            sheet.paste(fitted, (x, y))
            for k, line in enumerate(_wrap(draw, text, font, tile, _CAPTION // line_height)):
                draw.text((x, y + tile + 2 + k * line_height), line, fill="black", font=font)
    return sheet


def plan_contact_sheet(plan: AugmentationPlan, cache: SyntheticCache, *, classes: Sequence[str] | None = None,
                       per_class: int | None = None, tile: int = 256, title: str = "",
                       load_source: Callable[[str], Image.Image] | None = None) -> Image.Image:
    """A contact sheet of a plan: per source image, the original and its cached variants.

    Each variant is captioned with its λ and prompt; a variant missing from ``cache`` gets a
    grey "not generated" tile. ``classes`` (readable names) and ``per_class`` (source images
    per class) select the rows; ``load_source`` loads a plan source (default: the image file
    under the plan's data root).
    """
    from PIL import Image

    from .plan.sources import SourceImages

    if load_source is None:
        if not plan.data_root:
            raise InputError("the plan has no data_root; pass load_source to load its source images")
        load_source = SourceImages(plan, verify=False).load
    known = set(plan.class_names)
    unknown = sorted(set(classes or ()) - known)
    if unknown:
        raise InputError(f"unknown class name(s) {unknown}; the plan's classes are {sorted(known)}")
    rows: list[tuple[Image.Image, str, list[tuple[Image.Image, str]]]] = []
    shown: dict[str, int] = {}
    lam = _lambda_label()
    for source, variants in plan.by_source().items():
        name = variants[0].class_name
        if classes is not None and name not in classes:
            continue
        if per_class is not None and shown.get(name, 0) >= per_class:
            continue
        shown[name] = shown.get(name, 0) + 1
        cells: list[tuple[Image.Image, str]] = []
        for v in variants:
            entry = cache.get(v)
            image = entry.image if entry is not None else Image.new("RGB", (tile, tile), (200, 200, 200))
            note = "" if entry is not None else " (not generated)"
            cells.append((image, f"{lam}={v.lam:.2f}{note} · {v.prompt}"))
        rows.append((load_source(source), f"original: {name} (CLIPScore {variants[0].score:.2f})", cells))
    return contact_sheet(rows, tile=tile, title=title)


def filter_contact_sheet(parent: AugmentationPlan, cache: SyntheticCache, kept_rows: Any,
                         scores: Any, passed: Any, *, specs: Sequence[str] = (), classes: Sequence[str] | None = None,
                         per_class: int | None = 2, tile: int = 128,
                         load_source: Callable[[str], Image.Image] | None = None) -> Image.Image:
    """What a filter kept and rejected, side by side: per source (``per_class`` sources of each
    class), the original, then its kept variants, then its rejected ones, each captioned with
    "kept"/"rejected" and its score under every filter (``scores``/``passed``: parent rows x
    filters, ``kept_rows``: the parent rows kept; as :func:`dalda_aug.filters.read_filter_record`
    gives them)."""
    from PIL import Image

    from .plan.sources import SourceImages

    if load_source is None:
        if not parent.data_root:
            raise InputError("the plan has no data_root; pass load_source to load its source images")
        load_source = SourceImages(parent, verify=False).load
    kept = set(int(r) for r in kept_rows)
    names = list(specs) or [f"filter {j + 1}" for j in range(np.shape(scores)[1])]
    cols = parent.columns
    rows: list[tuple[Image.Image, str, list[tuple[Image.Image, str]]]] = []
    shown: dict[str, int] = {}
    for s in range(cols.n_sources):
        parent_rows = [int(r) for r in cols.rows_of(s)]
        first = parent.variants[parent_rows[0]]
        if (classes is not None and first.class_name not in classes) or \
                (per_class is not None and shown.get(first.class_name, 0) >= per_class):
            continue
        shown[first.class_name] = shown.get(first.class_name, 0) + 1
        ordered = [r for r in parent_rows if r in kept] + [r for r in parent_rows if r not in kept]
        cells: list[tuple[Image.Image, str]] = []
        for r in ordered:
            entry = cache.get(parent.variants[r])
            image = entry.image if entry is not None else Image.new("RGB", (tile, tile), (200, 200, 200))
            marks = ", ".join(f"{n} {float(scores[r, j]):.2f}{'' if passed[r, j] else ' (fails)'}"
                              for j, n in enumerate(names))
            cells.append((image, f"{'KEPT' if r in kept else 'rejected'} · {marks}"))
        n_kept = sum(r in kept for r in parent_rows)
        rows.append((load_source(str(first.source)), f"{first.class_name}: {n_kept} kept of {len(parent_rows)}", cells))
    return contact_sheet(rows, tile=tile, title="kept (left) and rejected (right) variants per source")
