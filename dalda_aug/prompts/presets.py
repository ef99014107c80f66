"""Dataset presets for prompt writing: the paper's dataset descriptions (its Table 5) and the
class names the reference code shows the LLM.

``dalda-aug prompts --preset NAME`` and ``benchmarks/fewshot.py --preset NAME`` use them. The
descriptions follow the DALDA paper's Table 5, verbatim, including its spelling. Where the
reference code's LLM prompt files (kkyuhun94/dalda
``prompt_for_LLM/llm_prompt_1_user_{pets,caltech,flowers}.txt``, the ``<dataset description>``
section) differ, the paper's wording is kept: Pets and Flowers-102 read the same in both; for
Caltech-101 Table 5 writes "Caltech-101 dataset is pictures ..." where the reference's file
writes "Caltech101 dataset is pictures ...".

For Caltech-101 the reference's LLM prompt lists three classes under other names than its
dataset class list (and the dataset's folders): ``bass`` is shown as "bass fish", ``faces`` as
"face" and ``faces easy`` as "closed-up face"; the answers are filed back under the dataset's
names. :attr:`DatasetPreset.llm_class_names` holds that mapping. Pets and Flowers-102 show the
LLM the dataset's own names.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Mapping

from ..errors import InputError

__all__ = ["DatasetPreset", "PRESETS", "get_preset", "PHOTO_TEMPLATE", "DA_FUSION_STRENGTHS"]

# "a photo of a {class}": the text of CLIPScore's zero-shot classifier (the paper and CLIP's own
# template), DALDA's base prompt, DA-Fusion's prompt (with the learned token as the name) and the
# template backend's default. Written once here; every module that needs it imports it.
PHOTO_TEMPLATE = "a photo of a {}"

# The four img2img strengths DA-Fusion composes with equal probability (its launch scripts; see
# dalda_aug.generators.da_fusion), which the scaling "da-fusion-strength" draws from by default
# (dalda_aug.plan.ags). Here, below both (with the photo template they share), so the command line reads it without importing NumPy.
DA_FUSION_STRENGTHS: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)


@dataclass(frozen=True)
class DatasetPreset:
    """What ``--preset`` supplies for one of the paper's datasets."""

    # Preset name, as given on the command line.
    name: str
    # The paper's description of the dataset (Table 5), verbatim (see the module docstring for
    # where the reference code's prompt file differs).
    description: str
    # Class name (as read from the folders, compared ignoring case and "_"/"-"/spaces) ->
    # the name the reference code gives the LLM, where the two differ.
    llm_class_names: Mapping[str, str] = field(default_factory=dict)

    def llm_name(self, class_name: str) -> str:
        """The name to show the LLM for ``class_name`` (``class_name`` itself when unchanged)."""
        return self.llm_class_names.get(_key(class_name), class_name)

    def llm_names(self, class_names: list[str]) -> dict[str, str]:
        """``{class name: LLM name}`` for the classes of ``class_names`` that are shown renamed."""
        return {n: self.llm_name(n) for n in class_names if self.llm_name(n) != n}


def _key(name: str) -> str:
    return " ".join(re.split(r"[\s_\-]+", unicodedata.normalize("NFKC", name).casefold().strip()))


PRESETS: dict[str, DatasetPreset] = {
    "pets": DatasetPreset(
        name="pets",
        description=(
            "We have created a 37 category pet dataset with roughly 200 images for each class. "
            "The images have a large variations in scale, pose and lighting."
        ),
    ),
    "caltech101": DatasetPreset(
        name="caltech101",
        description=(
            "Caltech-101 dataset is pictures of objects belonging to 101 categories. About 40 to 800 "
            "images per category. Most categories have about 50 images. The size of each image is "
            "roughly 300 x 200 pixels. We have carefully clicked outlines of each object in these pictures."
        ),
        # The reference's dataset list (semantic_aug/datasets/caltech101.py) has 'bass', 'faces',
        # 'faces easy' where its LLM prompt file has 'bass fish', 'face', 'closed-up face'.
        llm_class_names={"bass": "bass fish", "faces": "face", "faces easy": "closed-up face"},
    ),
    "flowers102": DatasetPreset(
        name="flowers102",
        description=(
            "We have created a 102 category dataset, consisting of 102 flower categories. The flowers "
            "chosen to be flower commonly occuring in the United Kingdom. Each class consists of "
            "between 40 and 258 images."
        ),
    ),
}


def get_preset(name: str) -> DatasetPreset:
    """The preset called ``name`` (``pets``, ``caltech101`` or ``flowers102``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
