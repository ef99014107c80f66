"""The benchmark's outputs: the summary over seeds, DALDA's paired tests against each baseline,
the paper's Table 2 layout, and the files of a results folder (``results.json``, ``results.csv``,
``table.md``) or of ``--combine`` (``significance.json``, ``significance.md``).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError, MissingFileError
from .methods import FILTERED, SIGNIFICANCE_BASELINE_ORDER, method_of, table_position, unfiltered
from .protocol import (COMPONENT_TEXT, COMPONENTS, NOT_RECORDED, PROTOCOL_TEXT, REFERENCE_SETTINGS, best_epoch,
                       differing_components)

__all__ = [
    "FORMAT",
    "CSV_COLUMNS",
    "PAPER_1SHOT",
    "PAPER_METRIC",
    "DATASET_ALIASES",
    "PAIRED_TEST",
    "PAIRING",
    "METRIC_NAMES",
    "mean_std",
    "protocol_metrics",
    "summarize",
    "paired_tests",
    "filter_tests",
    "render_table",
    "combine",
    "write_outputs",
]

FORMAT = "dalda_aug.fewshot/1"

CSV_COLUMNS = ["dataset", "backbone", "mode", "method", "shots", "seed", "protocol", "best_epoch", "recipe", "bn_mode",
               "clip_head", "eval_draws", "eval_split", "ags_mode", "class_names", "pool", "top1", "top1_std",
               "mean_per_class", "mean_per_class_std", "n_test", "seeds", "n_train_real", "n_synthetic", "p",
               "train_seconds"]

# The paper's 1-shot accuracies of DALDA ("average of 3 trials", all the paper says of them), for
# comparison in table.md; shown next to results of the reference code's metric only (PAPER_METRIC).
PAPER_1SHOT = {
    ("pets", "resnet50"): 0.807, ("pets", "clip"): 0.875,
    ("caltech101", "resnet50"): 0.788, ("caltech101", "clip"): 0.920,
    ("flowers102", "resnet50"): 0.521, ("flowers102", "clip"): 0.819,
}
PAPER_METRIC = ("That they are mean per-class accuracies at the best seed-averaged epoch is inferred from the "
                "reference code (its train_classifier.py records them, its plot.py picks that epoch); the paper "
                "does not say.")
DATASET_ALIASES = {
    "pets": "pets", "oxfordpets": "pets", "oxfordiiitpet": "pets", "oxfordiiitpets": "pets",
    "caltech101": "caltech101", "flowers102": "flowers102", "oxfordflowers102": "flowers102",
}
# Paired test used for DALDA against each baseline. Pairs are seeds within one (dataset, shots)
# cell: cells of one dataset are not independent (the few-shot sets are nested, so a 2-shot set
# holds the 1-shot images and their synthetic variants), so they are never pooled into one test.
PAIRED_TEST = "paired two-sided t-test (scipy.stats.ttest_rel)"
PAIRING = {
    "seeds": "paired over seeds, one test per (dataset, shots)",
    "cells": "paired over (dataset, shots) cells, each the mean over its seeds",
}
METRIC_NAMES = {"top1": "top-1 accuracy", "mean_per_class": "mean per-class accuracy"}


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def protocol_metrics(protocol: str) -> tuple[str, ...]:
    """The metrics a protocol reports: both accuracies (honest) or the mean per-class one (reference)."""
    return ("top1", "mean_per_class") if protocol == "honest" else ("mean_per_class",)


# ---------------------------------------------------------------------------------------------
# summary and paired tests
# ---------------------------------------------------------------------------------------------
def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (backbone, mode, method, shots), in table order.

    ``reference`` rows: the epoch whose seed-averaged mean per-class accuracy is highest is
    picked (``best_epoch``) and every metric is read at that epoch, as the reference's plot.py.
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["backbone"], row["mode"], row["method"], row["shots"]), []).append(row)
    summary = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], table_position(k[2]), k[3])):
        group = sorted(groups[key], key=lambda r: r["seed"])
        summary.append(_summary_row(key, group))
    return summary


def _summary_row(key: tuple[Any, ...], group: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary of one (backbone, mode, method, shots) group of runs, sorted by seed."""
    protocol = group[0].get("protocol", "honest")
    extra: dict[str, Any] = {}
    if protocol == "reference":
        n_epochs = min(len(r["epoch_mean_per_class"]) for r in group)
        mean_curve = [sum(r["epoch_mean_per_class"][e] for r in group) / len(group) for e in range(n_epochs)]
        epoch = best_epoch(mean_curve)
        top1_values = [r["epoch_top1"][epoch] for r in group]
        mpc_values = [r["epoch_mean_per_class"][epoch] for r in group]
        extra = {"best_epoch": epoch, "run_best_epochs": [r["best_epoch"] for r in group]}
    else:
        top1_values = [r["top1"] for r in group]
        mpc_values = [r["mean_per_class"] for r in group]
    top1, top1_std = mean_std(top1_values)
    mpc, mpc_std = mean_std(mpc_values)
    return {
        "dataset": group[0]["dataset"], "backbone": key[0], "mode": key[1], "method": key[2],
        "label": group[0].get("label") or method_of(key[2]).label, "shots": key[3], "seeds": [r["seed"] for r in group],
        "protocol": protocol, **extra,
        **{name: group[0].get(name, COMPONENTS[name][0]) for name in COMPONENTS},
        **{name: group[0].get(name, NOT_RECORDED) for name in REFERENCE_SETTINGS},
        "top1": top1, "top1_std": top1_std, "mean_per_class": mpc, "mean_per_class_std": mpc_std,
        "per_seed": {"top1": top1_values, "mean_per_class": mpc_values},
        "n_test": group[0]["n_test"],
    }


def paired_tests(summary: list[dict[str, Any]], metrics: Sequence[str], pairing: str = "seeds") -> list[dict[str, Any]]:
    """DALDA against each baseline: mean difference and the p-value of a paired t-test.

    ``pairing="seeds"`` (a results folder): one test per (backbone, mode, dataset, shots),
    pairing the seeds both methods ran there. Shot settings are not pooled: the few-shot sets of
    one seed are nested, so the 1-shot and 2-shot results share images and are not independent.
    ``pairing="cells"`` (``--combine``): one test per (backbone, mode), pairing the (dataset,
    shots) cells both methods ran, each cell's value the mean over its seeds. Values are those
    the table reports (for ``reference``, at the selected epoch). The p-value is None when there
    are fewer than 2 pairs or all differences are equal.
    """
    out = []
    for backbone, mode in sorted({(s["backbone"], s["mode"]) for s in summary}):
        cells = [s for s in summary if s["backbone"] == backbone and s["mode"] == mode]
        dalda = {(s["dataset"], s["shots"]): s for s in cells if s["method"] == "dalda"}
        if not dalda:
            continue
        for base in [m for m in SIGNIFICANCE_BASELINE_ORDER if any(s["method"] == m for s in cells)]:
            other = {(s["dataset"], s["shots"]): s for s in cells if s["method"] == base}
            keys = sorted(set(dalda) & set(other), key=str)
            groups = [[key] for key in keys] if pairing == "seeds" else ([keys] if keys else [])
            for group in groups:
                for metric in metrics:
                    a, b, where = _pairs(dalda, other, group, metric, pairing)
                    if not a:
                        continue
                    diffs = [x - y for x, y in zip(a, b)]
                    cell = {"dataset": group[0][0], "shots": group[0][1]} if pairing == "seeds" else {}
                    out.append({
                        "backbone": backbone, "mode": mode, **cell, "method": "dalda", "baseline": base,
                        "metric": metric, "test": PAIRED_TEST, "pairing": PAIRING[pairing], "n_pairs": len(diffs),
                        "mean_difference": sum(diffs) / len(diffs), "p_value": _p_value(a, b, diffs), "pairs": where,
                    })
    return out


def filter_tests(summary: list[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Each method against its filtered twin (``fewshot.py --filter``): per (backbone, mode,
    dataset, shots), the mean difference (filtered − unfiltered) and the p-value of a paired
    t-test over the seeds both ran."""
    out = []
    for backbone, mode in sorted({(s["backbone"], s["mode"]) for s in summary}):
        cells = [s for s in summary if s["backbone"] == backbone and s["mode"] == mode]
        for twin in sorted({s["method"] for s in cells if s["method"].endswith(FILTERED)}, key=table_position):
            mine = {(s["dataset"], s["shots"]): s for s in cells if s["method"] == twin}
            other = {(s["dataset"], s["shots"]): s for s in cells if s["method"] == unfiltered(twin)}
            for key in sorted(set(mine) & set(other), key=str):
                for metric in metrics:
                    a, b, where = _pairs(mine, other, [key], metric, "seeds")
                    if not a:
                        continue
                    diffs = [x - y for x, y in zip(a, b)]
                    out.append({"backbone": backbone, "mode": mode, "dataset": key[0], "shots": key[1],
                                "method": twin, "baseline": unfiltered(twin), "metric": metric, "test": PAIRED_TEST,
                                "pairing": PAIRING["seeds"], "n_pairs": len(diffs),
                                "mean_difference": sum(diffs) / len(diffs), "p_value": _p_value(a, b, diffs),
                                "pairs": where})
    return out


def _pairs(dalda: dict[Any, dict[str, Any]], other: dict[Any, dict[str, Any]], group: list[Any], metric: str,
           pairing: str) -> tuple[list[float], list[float], list[dict[str, Any]]]:
    """DALDA's and the baseline's paired values over the (dataset, shots) cells of ``group``, and where
    each pair comes from: one pair per common seed (``"seeds"``) or per cell, seeds averaged (``"cells"``)."""
    a: list[float] = []
    b: list[float] = []
    where: list[dict[str, Any]] = []
    for key in group:
        seeds_a = dict(zip(dalda[key]["seeds"], dalda[key]["per_seed"][metric]))
        seeds_b = dict(zip(other[key]["seeds"], other[key]["per_seed"][metric]))
        common = sorted(set(seeds_a) & set(seeds_b))
        if not common:
            continue
        if pairing == "seeds":
            a += [seeds_a[seed] for seed in common]
            b += [seeds_b[seed] for seed in common]
            where += [{"dataset": key[0], "shots": key[1], "seed": seed} for seed in common]
        else:
            a.append(_mean([seeds_a[seed] for seed in common]))
            b.append(_mean([seeds_b[seed] for seed in common]))
            where.append({"dataset": key[0], "shots": key[1], "seeds": common})
    return a, b, where


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _p_value(a: list[float], b: list[float], diffs: list[float]) -> float | None:
    """The paired t-test's p-value; None for fewer than 2 pairs, equal differences or NaN."""
    from scipy import stats

    if len(diffs) >= 2 and max(diffs) != min(diffs):
        p = float(stats.ttest_rel(a, b).pvalue)
        return None if math.isnan(p) else p
    return None


def _significance_line(first: str, test: dict[str, Any]) -> str:
    """One row of a significance table: ``first`` (shots, or backbone and mode), baseline, metric, pairs,
    mean difference and p-value."""
    p = "–" if test["p_value"] is None else f"{test['p_value']:.3g}"
    return (f"| {first} | {method_of(test['baseline']).label} | {METRIC_NAMES[test['metric']]} "
            f"| {test['n_pairs']} | {test['mean_difference']:+.3f} | {p} |")


# ---------------------------------------------------------------------------------------------
# table.md
# ---------------------------------------------------------------------------------------------
def _cell(mean: float, std: float | None) -> str:
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def render_table(summary: list[dict[str, Any]], dataset: str, backbone: str, mode: str, shots: list[int],
                 significance: list[dict[str, Any]] | None = None, paper_key: str | None = None,
                 filter_significance: list[dict[str, Any]] | None = None) -> str:
    """The paper's Table 2 layout: rows = methods, columns = shots × the protocol's metrics."""
    rows = [s for s in summary if s["backbone"] == backbone and s["mode"] == mode]
    protocol = rows[0]["protocol"] if rows else "honest"
    first = rows[0] if rows else {"protocol": protocol, "backbone": backbone, "mode": mode}
    differ = _differing(rows or [first])
    lines = _table_heading(rows, first, dataset, backbone, mode, differ)
    lines += _table_body(rows, shots, protocol)
    lines += _paper_note(dataset, backbone, shots, protocol, differ, paper_key)
    tests = [t for t in (significance or []) if t["backbone"] == backbone and t["mode"] == mode]
    if tests:
        lines += ["", f"DALDA against each baseline: mean difference (DALDA − baseline) and p-value of a "
                      f"{PAIRED_TEST}, {PAIRING['seeds']} (shot settings share their nested few-shot images, "
                      "so they are not pooled).", "",
                  "| Shots | Baseline | Metric | Pairs | Mean difference | p-value |", "|---:|---|---|---:|---:|---:|"]
        lines += [_significance_line(str(t.get("shots", "–")), t) for t in tests]
    twins = [t for t in (filter_significance or []) if t["backbone"] == backbone and t["mode"] == mode]
    if twins:
        lines += ["", f"Each method against its filtered twin (same synthetic budget): mean difference (filtered − "
                      f"unfiltered) and p-value of a {PAIRED_TEST}, {PAIRING['seeds']}.", "",
                  "| Shots | Method | Metric | Pairs | Mean difference | p-value |", "|---:|---|---|---:|---:|---:|"]
        lines += [_significance_line(str(t["shots"]), t) for t in twins]
    return "\n".join(lines) + "\n"


def _differing(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What differs from the reference code in any of ``rows`` (the components and settings, in the
    order of :data:`COMPONENT_TEXT`), with the value of the first row where it differs."""
    found: dict[str, Any] = {}
    for row in rows:
        for name in differing_components(row):
            found.setdefault(name, row.get("protocol", "honest") if name == "protocol" else
                             row.get(name, COMPONENTS[name][0] if name in COMPONENTS else NOT_RECORDED))
    return {name: found[name] for name in COMPONENT_TEXT if name in found}


def _settings_text(rows: list[dict[str, Any]]) -> str:
    """Each setting of :data:`REFERENCE_SETTINGS`, as the rows it applies to hold it ("–": none)."""
    parts = []
    for name in REFERENCE_SETTINGS:
        values = list(dict.fromkeys(str(r.get(name, NOT_RECORDED)) for r in rows if r.get(name, "") is not None))
        parts.append(f"{name} {' / '.join(values) if values else '–'}")
    return ", ".join(parts)


def _table_heading(rows: list[dict[str, Any]], first: dict[str, Any], dataset: str, backbone: str, mode: str,
                   differ: dict[str, Any]) -> list[str]:
    """The title, the protocol and metric, and the components and settings of the evaluation."""
    seeds = sorted({seed for s in rows for seed in s["seeds"]})
    n_test = rows[0]["n_test"] if rows else 0
    protocol = first["protocol"]
    what = "linear probe" if mode == "linear" else "fine-tuned"
    metric_text = " and ".join(METRIC_NAMES[f] for f in protocol_metrics(protocol))
    values = {name: first.get(name, COMPONENTS[name][0]) for name in COMPONENTS}
    shown = ", ".join(f"{name} {values[name]}" for name in COMPONENTS
                      if not (name == "bn_mode" and values[name] is None) and not (name == "clip_head" and
                                                                                  values[name] is None))
    evaluated = f"{n_test} draws with replacement from" if values.get("eval_draws") else f"n = {n_test},"
    return [
        f"# Few-shot accuracy: {dataset}, {backbone} ({what})",
        "",
        f"Protocol: **{protocol}** — {PROTOCOL_TEXT[protocol]}. Metric: {metric_text} on the test split "
        f"({evaluated} {values['eval_split']} split); mean ± sample std over seeds {', '.join(map(str, seeds))}. "
        "Best per column in bold.",
        "",
        f"Components: {shown}. Settings: {_settings_text(rows or [first])}. " + (
            "Every component and setting is the reference code's: its metric." if not differ else
            "Not the reference code's metric (not the same metric as the paper's); it differs in " + "; ".join(
                f"{COMPONENT_TEXT[c]}: {value}" for c, value in differ.items()) + "."),
        "",
    ]


def _table_body(rows: list[dict[str, Any]], shots: list[int], protocol: str) -> list[str]:
    """The table itself: one row per method, the best value of each column in bold."""
    methods = sorted({s["method"] for s in rows}, key=table_position)
    by_key = {(s["method"], s["shots"]): s for s in rows}
    fields = protocol_metrics(protocol)
    header = ["Method"]
    for n in shots:
        header += [f"{n}-shot top-1", f"{n}-shot mean/class"] if protocol == "honest" else \
            [f"{n}-shot mean/class", f"{n}-shot best epoch"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    best: dict[tuple[int, str], Any] = {}
    for n in shots:
        for field in fields:
            values = [by_key[(m, n)][field] for m in methods if (m, n) in by_key]
            best[(n, field)] = max(values) if values else None
    for m in methods:
        cells = [next((s["label"] for s in rows if s["method"] == m and s.get("label")), method_of(m).label)]
        for n in shots:
            s = by_key.get((m, n))
            for field in fields:
                if s is None:
                    cells.append("–")
                    continue
                text = _cell(s[field], s[f"{field}_std"])
                cells.append(f"**{text}**" if round(s[field], 3) == round(best[(n, field)], 3) else text)
            if protocol == "reference":
                cells.append("–" if s is None else str(s["best_epoch"]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _paper_note(dataset: str, backbone: str, shots: list[int], protocol: str, differ: dict[str, Any],
                paper_key: str | None) -> list[str]:
    """The paper's 1-shot number when the results are its metric, else why it is not shown."""
    key = paper_key or DATASET_ALIASES.get("".join(ch for ch in dataset.lower() if ch.isalnum()))
    paper = PAPER_1SHOT.get((key, backbone)) if key else None
    if paper is None or 1 not in shots:
        return []
    if not differ:
        return ["", f"Paper (DALDA, {key}, 1-shot, {backbone}, \"average of 3 trials\"): {paper:.3f}. {PAPER_METRIC} "
                    "Every component and setting here is the reference code's, so this is the same metric."]
    names = "; ".join(f"{COMPONENT_TEXT[c]}: {value}" for c, value in differ.items())
    return ["", f"The paper's numbers (DALDA, {key}, 1-shot, {backbone}) are taken to be the reference code's "
                f"metric; these results differ from it in {names}, so they are not the same metric and "
                "the paper's number is not shown. To compare, run `--protocol reference --ags-mode clip "
                "--class-names folder` without other overrides on the pools of `prepare_datasets.py --split "
                "reference`."]


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def _read_results(folder: Path) -> tuple[str, list[dict[str, Any]]]:
    """The protocol and the per-seed summary of ``folder/results.json``."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise MissingFileError(f"no results.json in {folder}")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not a results file: {exc}") from None
    rows = result.get("summary") if isinstance(result, dict) else None
    if not isinstance(rows, list) or any("per_seed" not in r for r in rows):
        raise InputError(f"{path} has no per-seed summary (written by an older fewshot.py?); rerun it")
    return result.get("protocol", "honest"), rows


def combine(folders: Sequence[Path], out: Path) -> int:
    """``--combine``: one paired test per baseline over the results of several runs (datasets)."""
    summary: list[dict[str, Any]] = []
    protocols: dict[str, list[str]] = {}
    for folder in folders:
        folder_protocol, rows = _read_results(folder)
        protocols.setdefault(folder_protocol, []).append(str(folder))
        summary += rows
    if len(protocols) > 1:
        raise InputError(f"the results mix protocols ({protocols}); combine runs of one protocol")
    protocol = next(iter(protocols))
    tests = paired_tests(summary, protocol_metrics(protocol), pairing="cells")
    if not tests:
        raise InputError("no DALDA result with a baseline to compare in " + ", ".join(map(str, folders)))
    out.mkdir(parents=True, exist_ok=True)
    datasets = sorted({s["dataset"] for s in summary})
    (out / "significance.json").write_text(json.dumps(
        {"format": FORMAT, "protocol": protocol, "test": PAIRED_TEST, "pairing": PAIRING["cells"],
         "sources": [str(f) for f in folders],
         "datasets": datasets, "significance": tests}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = [f"# DALDA against each baseline: {', '.join(datasets)}", "",
             f"Protocol: **{protocol}** — {PROTOCOL_TEXT[protocol]}. Mean difference (DALDA − baseline) and "
             f"p-value of a {PAIRED_TEST}, {PAIRING['cells']} (seeds averaged first: the shot settings of "
             "one dataset share nested few-shot images, so seeds are not pooled across them).", "",
             "| Backbone | Baseline | Metric | Pairs | Mean difference | p-value |", "|---|---|---|---:|---:|---:|"]
    lines += [_significance_line(f"{t['backbone']} ({t['mode']})", t) for t in tests]
    (out / "significance.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


def write_outputs(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any], shots: list[int]) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv`` and ``table.md`` of ``rows`` (finished runs) into ``out``."""
    summary = summarize(rows)
    protocol = summary[0]["protocol"] if summary else "honest"
    metrics = protocol_metrics(protocol)
    significance = paired_tests(summary, metrics)
    twins = filter_tests(summary, metrics)
    result = {"format": FORMAT, **meta, "protocol": protocol,
              "metrics": [METRIC_NAMES[m] for m in metrics], "runs": rows, "summary": summary,
              "significance": significance, **({"filter_significance": twins} if twins else {})}
    paths = {"json": out / "results.json", "csv": out / "results.csv", "table": out / "table.md"}
    paths["json"].write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _write_csv(paths["csv"], rows, summary)
    tables = [render_table(summary, meta["dataset"], b, m, shots, significance, meta.get("paper_key"), twins)
              for b, m in sorted({(s["backbone"], s["mode"]) for s in summary})]
    paths["table"].write_text("\n".join(tables), encoding="utf-8")
    return paths


def _write_csv(path: Path, rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> None:
    """One line per run (table order), then one per summary row (``seed`` = ``mean``)."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in sorted(rows, key=lambda r: (r["backbone"], table_position(r["method"]), r["shots"], r["seed"])):
            writer.writerow({"protocol": "honest", **row, "seeds": 1})
        for s in summary:
            writer.writerow({**s, "seed": "mean", "seeds": len(s["seeds"]),
                             "top1_std": "" if s["top1_std"] is None else s["top1_std"],
                             "mean_per_class_std": "" if s["mean_per_class_std"] is None else s["mean_per_class_std"]})
