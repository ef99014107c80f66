"""The paper's few-shot benchmark as a library: ``benchmarks/fewshot.py`` is its command line.

Modules:

* :mod:`~dalda_aug.fewshot.methods`: the registry of methods (:data:`METHODS`, table order), the
  default set, and each method's λ scaling.
* :mod:`~dalda_aug.fewshot.protocol`: the evaluation protocols (``honest``, ``reference``) and
  their components (transforms recipe, BatchNorm mode, CLIP head, evaluation draws and split),
  and the settings a result row records beside them (AGS mode, class names, image pool).
* :mod:`~dalda_aug.fewshot.data`: the training and test images (:func:`load_data`, :class:`Data`),
  the per-class split of one folder and the reference code's few-shot draw and halves.
* :mod:`~dalda_aug.fewshot.settings`: one invocation's resolved settings (:func:`prepare`,
  :class:`Benchmark`) and ``config.json``.
* :mod:`~dalda_aug.fewshot.run`: :func:`run`, the pipeline as named steps (scores, plans, warm,
  train and evaluate).
* :mod:`~dalda_aug.fewshot.report`: the summary over seeds, the paired tests, ``table.md`` and the
  result files, and ``--combine``.

``import dalda_aug.fewshot`` imports neither torch nor the generators; they load on use. The
functions that take ``args`` read an :class:`argparse.Namespace` of ``benchmarks/fewshot.py``'s
parser (its flags, with ``-`` as ``_``).
"""

from __future__ import annotations

from .data import (POOL_KINDS, Data, check_folder_order, dataset_name, load_data, pool_kind, reference_class_order,
                   reference_few_shot_indices, reference_halves, split_per_class)
from .methods import DEFAULT_METHODS, METHODS, SIGNIFICANCE_BASELINE_ORDER, Method, method_scaling, resolve_methods
from .protocol import (BN_BACKBONES, COMPONENT_TEXT, COMPONENTS, EVAL_SPLITS, PROTOCOL_TEXT, PROTOCOLS,
                       REFERENCE_EVAL_DRAWS, REFERENCE_SETTINGS, best_epoch, differing_components, evaluation_draws,
                       resolve_components, row_settings)
from .report import (CSV_COLUMNS, FORMAT, PAIRED_TEST, PAIRING, PAPER_1SHOT, combine, paired_tests, render_table,
                     summarize, write_outputs)
from .run import run
from .settings import Benchmark, prepare, write_prompts

__all__ = [
    "BN_BACKBONES",
    "COMPONENTS",
    "COMPONENT_TEXT",
    "CSV_COLUMNS",
    "DEFAULT_METHODS",
    "EVAL_SPLITS",
    "FORMAT",
    "METHODS",
    "PAIRED_TEST",
    "PAIRING",
    "PAPER_1SHOT",
    "POOL_KINDS",
    "PROTOCOLS",
    "PROTOCOL_TEXT",
    "REFERENCE_EVAL_DRAWS",
    "REFERENCE_SETTINGS",
    "SIGNIFICANCE_BASELINE_ORDER",
    "Benchmark",
    "Data",
    "Method",
    "best_epoch",
    "check_folder_order",
    "combine",
    "dataset_name",
    "differing_components",
    "evaluation_draws",
    "load_data",
    "method_scaling",
    "paired_tests",
    "pool_kind",
    "prepare",
    "reference_class_order",
    "reference_few_shot_indices",
    "reference_halves",
    "render_table",
    "resolve_components",
    "resolve_methods",
    "row_settings",
    "run",
    "split_per_class",
    "summarize",
    "write_outputs",
    "write_prompts",
]
