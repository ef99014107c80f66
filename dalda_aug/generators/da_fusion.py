"""DA-Fusion (Trabucco et al., "Effective Data Augmentation With Diffusion Models", ICLR 2024).

Each class gets a token learned by textual inversion on its few-shot images
(:func:`~dalda_aug.generators.textual_inversion.train_textual_inversion`); each synthetic image
is Stable Diffusion img2img from a real image with the prompt "a photo of a <class token>" at a
strength drawn per image. DA-Fusion's experiments (``scripts/*/launch_textual_inversion=1.0-0.75-0.5-0.25_*.sh``
in github.com/brandontrabucco/da-fusion) compose four textual-inversion augmentations of
strengths 1.0, 0.75, 0.5 and 0.25 "in parallel" with probabilities 0.25 each
(``semantic_aug/augmentations/compose.py``: ``ComposeParallel`` picks one per generated image),
i.e. each image's strength is drawn uniformly from those four: :data:`DA_FUSION_STRENGTHS`,
:func:`draw_strengths`. A plan draws them while planning, as the λ strategy
``Scaling("da-fusion-strength", strengths=...)`` of :mod:`dalda_aug.plan.ags`. The pipeline settings
are those of :class:`~dalda_aug.generators.img2img.Img2ImgConfig`
(DA-Fusion's: the base model's scheduler at 50 steps, its own VAE, guidance 7.5, 512x512
canvas, output resized back to the source size).

In a plan, a variant's strength travels as its ``lambda`` (and the row's ``strength``); the
generator reads it from :attr:`GenerationRequest.scale`, so a request's strength is part of its
cache key like λ is for DALDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from ..errors import InputError
from ..prompts.presets import DA_FUSION_STRENGTHS, PHOTO_TEMPLATE
from .base import GenerationRequest, pixel_field
from .img2img import Img2ImgConfig, Img2ImgGenerator
from .loading import call_loader

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["DAFusionConfig", "DAFusionGenerator", "DA_FUSION_STRENGTHS", "draw_strengths", "DA_FUSION_PROMPT",
           "build_da_fusion_plan"]

# DA-Fusion's prompt ("--prompt 'a photo of a {name}'") with the class token as the name.
DA_FUSION_PROMPT = PHOTO_TEMPLATE


def draw_strengths(n: int, rng: "np.random.Generator", strengths: Sequence[float] = DA_FUSION_STRENGTHS) -> "np.ndarray":
    """``n`` strengths drawn uniformly (with replacement) from ``strengths``, as DA-Fusion draws them
    (:func:`~dalda_aug.plan.ags.sample_strengths`; :data:`DA_FUSION_STRENGTHS` are DA-Fusion's four,
    the strengths it composes with equal probability in its launch scripts)."""
    from ..plan.ags import sample_strengths

    return sample_strengths(n, rng, strengths)


def _tokens_digest(location: str | None) -> str | None:
    """Content digest of a token folder (from its manifest), for the fingerprint."""
    if location is None:
        return None
    from .textual_inversion import TokenSet

    return TokenSet.load(location).digest


@dataclass(frozen=True)
class DAFusionConfig(Img2ImgConfig):
    """DA-Fusion's generation settings: img2img (DA-Fusion's pipeline settings) with learned class tokens.

    ``tokens`` is the folder :func:`~dalda_aug.generators.textual_inversion.train_textual_inversion`
    wrote; the fingerprint covers its content (the manifest's digest of the token files), not
    its path, so moving the folder keeps cache keys and retraining changes them.
    """

    METHOD: ClassVar[str] = "da_fusion"

    # Folder of learned class tokens (train_textual_inversion's output, with tokens.json).
    tokens: str | None = pixel_field(None, digest=_tokens_digest)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokens is not None:
            if not isinstance(self.tokens, (str, os.PathLike)) or not str(self.tokens).strip():
                raise InputError(f"DAFusionConfig.tokens must be a token folder, got {self.tokens!r}")
            object.__setattr__(self, "tokens", os.fspath(self.tokens))


class DAFusionGenerator(Img2ImgGenerator):
    """Batched DA-Fusion img2img: each request's ``scale`` is its strength in (0, 1].

    The class tokens of ``config.tokens`` are loaded into the pipeline with diffusers'
    ``load_textual_inversion`` (one file per class, diffusers' format), so prompts such as
    "a photo of a <golden_retriever>" use them. Requests of different strengths share each UNet call
    (see :mod:`dalda_aug.generators.img2img`).
    """

    config_class: ClassVar[type[Img2ImgConfig]] = DAFusionConfig
    config: DAFusionConfig

    def __init__(self, models: Any, config: DAFusionConfig | None = None, device: Any = "cpu",
                 dtype: Any = None) -> None:
        if config is None or getattr(config, "tokens", None) is None:
            raise InputError("DAFusionGenerator needs DAFusionConfig(tokens=FOLDER): the class tokens written by "
                             "train_textual_inversion / `dalda-aug textual-inversion`")
        super().__init__(models, config, device, dtype)

    def strength_of(self, request: GenerationRequest) -> float:
        s = request.scale
        if not 0.0 < s <= 1.0:
            raise InputError(f"a DA-Fusion request's scale is its img2img strength and must lie in (0, 1], got {s!r}")
        return s

    def _after_load(self, pipe: Any) -> None:
        from .textual_inversion import TokenSet

        tokens = TokenSet.load(self.config.tokens or "")
        tokens.verify()
        files = [str(tokens.file_of(name)) for name in tokens.class_names]
        names = [tokens.token_of(name) for name in tokens.class_names]
        call_loader(
            "the DA-Fusion class tokens",
            f"diffusers textual-inversion files in {tokens.folder} matching the text encoder of the base model",
            pipe.load_textual_inversion,
            files,
            token=names,
        )


def build_da_fusion_plan(
    source: Any,
    tokens: str | os.PathLike[str],
    *,
    variants: int = 10,
    seed: int = 0,
    n_shot: int | None = None,
    strengths: Sequence[float] = DA_FUSION_STRENGTHS,
    models: Any = None,
    scorer: Any = None,
    scores: Sequence[float] | None = None,
    config: DAFusionConfig | None = None,
    progress: bool | None = None,
) -> Any:
    """A DA-Fusion :class:`~dalda_aug.plan.AugmentationPlan`: M variants per source image, each with
    the prompt "a photo of a <class token>" and a strength drawn uniformly from ``strengths``.

    It is :func:`~dalda_aug.plan.build_plan` (same few-shot split, seeds and CLIP scores, which only
    describe the sources here) with the scaling ``Scaling("da-fusion-strength", strengths=strengths)``:
    each row's ``strength`` (also its ``lambda``) is drawn while planning, from a generator seeded by
    (plan seed, source content hash, "strength"). The plan records the DA-Fusion generation config
    (``plan.config["generator"]``), so ``dalda-aug warm`` builds the right generator.
    """
    import dataclasses
    from pathlib import Path

    from ..data import ImageSource
    from ..plan.ags import Scaling
    from ..plan.build import build_plan
    from .textual_inversion import TokenSet

    scaling = Scaling("da-fusion-strength", strengths=tuple(strengths))  # checks the strengths before any work
    token_set = TokenSet.load(tokens)
    folder = str(Path(token_set.folder).resolve())
    if not isinstance(source, ImageSource):
        source = ImageSource.from_folder(source)
    missing = sorted(set(source.class_names) - set(token_set.class_names))
    if missing:
        raise InputError(f"the tokens in {folder} have no token for class(es) {missing[:5]}; "
                         "train them on the same data (dalda-aug textual-inversion)")
    prompts = {name: [DA_FUSION_PROMPT.format(token_set.token_of(name))] for name in set(source.class_names)}
    plan = build_plan(source, variants=variants, seed=seed, n_shot=n_shot, scaling=scaling,
                      prompts=prompts, models=models, scorer=scorer, scores=scores, progress=progress)
    gen_config = dataclasses.replace(config, tokens=folder) if config is not None else DAFusionConfig(tokens=folder)
    plan_config = dict(plan.config)
    plan_config["method"] = "da-fusion"
    plan_config["prompts"] = {"backend": "da-fusion", "template": DA_FUSION_PROMPT, "tokens": folder,
                              "tokens_digest": token_set.digest}
    plan_config["generator"] = {"method": DAFusionConfig.METHOD, "config": gen_config.to_dict()}
    return type(plan)([], plan_config, plan.summary, columns=plan.columns)
