"""The generator family: every way dalda_aug turns a plan variant into an image.

========================  ===========================================================
module                    what it holds
========================  ===========================================================
``loading``               :func:`parse_location` (the one "hub id or local path" rule),
                          loader error policy, schedulers, VAE loaders
``base``                  :class:`GenerationRequest`, :class:`GeneratorConfig` (the shared
                          sampling fields; fields declare whether they change pixels),
                          :class:`Generator` (what every generator shares), fingerprints,
                          dtypes, the registry
``attention``             per-sample-λ attention processors (module-level classes)
``step_cache``            DeepCache-style step caching
``ip_adapter``            DALDA: :class:`IPAdapterConfig`, :class:`IPAdapterGenerator`
``img2img``               what Real Guidance and DA-Fusion share
``real_guidance``         :class:`RealGuidanceConfig`, :class:`RealGuidanceGenerator`
``da_fusion``             :class:`DAFusionConfig`, :class:`DAFusionGenerator`
``textual_inversion``     :func:`train_textual_inversion` (DA-Fusion's class tokens)
========================  ===========================================================

The registry: :data:`~dalda_aug.generators.base.BUILTIN_GENERATORS` is the one table of the
built-in generators (``METHOD -> (config class, generator class)``, as "module:Class" strings),
each imported the first time its method is asked for. A new generator: a config dataclass
derived from :class:`GeneratorConfig` with its own ``METHOD`` and fields using
:func:`pixel_field` / :func:`speed_field` (``FIELD_DEFAULTS`` changes the shared fields'
defaults), a generator class derived from :class:`Generator` with ``load``/``generate``, and one
``register_generator(MyConfig, "my_package.module:MyGenerator")`` call (the generator's module is
imported on first use); :func:`config_class_for`, :func:`registered_configs`,
``GenerationSpec.make_generator`` and the few-shot benchmark's methods find it by name.
``tests/test_generators_contract.py`` runs the family contract on it once it is added to that
file's list. Names are imported on first use: ``import dalda_aug.generators`` is light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {
    "ModelLocation": "loading",
    "parse_location": "loading",
    "is_local_location": "loading",
    "describe_location": "loading",
    "check_local_folder": "loading",
    "call_loader": "loading",
    "ddim_scheduler_config": "loading",
    "make_scheduler": "loading",
    "load_vae": "loading",
    "load_tiny_vae": "loading",
    "hub_endpoint": "loading",
    "hub_reachable": "loading",
    "hub_files": "loading",
    "missing_from_hub_cache": "loading",
    "check_hub": "loading",
    "require_hub_models": "loading",
    "GenerationRequest": "base",
    "GeneratorConfig": "base",
    "Generator": "base",
    "pixel_field": "base",
    "speed_field": "base",
    "field_changes_pixels": "base",
    "generation_fingerprint": "base",
    "dtype_name": "base",
    "resolve_torch_dtype": "base",
    "image_key": "base",
    "check_requests": "base",
    "register_generator": "base",
    "BUILTIN_GENERATORS": "base",
    "config_class_for": "base",
    "generator_class_for": "base",
    "registered_configs": "base",
    "config_from_dict": "base",
    "ScaleAwareAttnProcessor": "attention",
    "PerSampleIPAdapterAttnProcessor": "attention",
    "install_per_sample_processors": "attention",
    "check_step_caching_unet": "step_cache",
    "unet_step": "step_cache",
    "IPAdapterConfig": "ip_adapter",
    "IPAdapterGenerator": "ip_adapter",
    "SCHEDULERS": "ip_adapter",
    "estimate_sample_bytes": "ip_adapter",
    "load_reference_pipeline": "ip_adapter",
    "reference_generate": "ip_adapter",
    "Img2ImgConfig": "img2img",
    "Img2ImgGenerator": "img2img",
    "RealGuidanceConfig": "real_guidance",
    "RealGuidanceGenerator": "real_guidance",
    "DAFusionConfig": "da_fusion",
    "DAFusionGenerator": "da_fusion",
    "DA_FUSION_STRENGTHS": "da_fusion",
    "draw_strengths": "da_fusion",
    "build_da_fusion_plan": "da_fusion",
    "train_textual_inversion": "textual_inversion",
    "TextualInversionConfig": "textual_inversion",
    "TokenSet": "textual_inversion",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # pragma: no cover
    # `X as X`: explicit re-exports, so `from dalda_aug.generators import X` type-checks under --strict.
    from .attention import (
        PerSampleIPAdapterAttnProcessor as PerSampleIPAdapterAttnProcessor,
        ScaleAwareAttnProcessor as ScaleAwareAttnProcessor,
        install_per_sample_processors as install_per_sample_processors,
    )
    from .base import (
        BUILTIN_GENERATORS as BUILTIN_GENERATORS, config_class_for as config_class_for,
        GenerationRequest as GenerationRequest, Generator as Generator, GeneratorConfig as GeneratorConfig,
        check_requests as check_requests, config_from_dict as config_from_dict, dtype_name as dtype_name,
        field_changes_pixels as field_changes_pixels, generation_fingerprint as generation_fingerprint,
        generator_class_for as generator_class_for, image_key as image_key, pixel_field as pixel_field,
        register_generator as register_generator, registered_configs as registered_configs,
        resolve_torch_dtype as resolve_torch_dtype, speed_field as speed_field,
    )
    from .da_fusion import (
        DA_FUSION_STRENGTHS as DA_FUSION_STRENGTHS, DAFusionConfig as DAFusionConfig,
        DAFusionGenerator as DAFusionGenerator, build_da_fusion_plan as build_da_fusion_plan,
        draw_strengths as draw_strengths,
    )
    from .img2img import Img2ImgConfig as Img2ImgConfig, Img2ImgGenerator as Img2ImgGenerator
    from .ip_adapter import (
        SCHEDULERS as SCHEDULERS, IPAdapterConfig as IPAdapterConfig, IPAdapterGenerator as IPAdapterGenerator,
        estimate_sample_bytes as estimate_sample_bytes, load_reference_pipeline as load_reference_pipeline,
        reference_generate as reference_generate,
    )
    from .loading import (
        ModelLocation as ModelLocation, call_loader as call_loader, check_local_folder as check_local_folder,
        ddim_scheduler_config as ddim_scheduler_config, describe_location as describe_location,
        is_local_location as is_local_location, load_tiny_vae as load_tiny_vae, load_vae as load_vae,
        make_scheduler as make_scheduler, parse_location as parse_location,
        check_hub as check_hub, hub_endpoint as hub_endpoint, hub_files as hub_files,
        hub_reachable as hub_reachable, missing_from_hub_cache as missing_from_hub_cache,
        require_hub_models as require_hub_models,
    )
    from .real_guidance import (
        RealGuidanceConfig as RealGuidanceConfig, RealGuidanceGenerator as RealGuidanceGenerator,
    )
    from .step_cache import check_step_caching_unet as check_step_caching_unet, unet_step as unet_step
    from .textual_inversion import (
        TextualInversionConfig as TextualInversionConfig, TokenSet as TokenSet,
        train_textual_inversion as train_textual_inversion,
    )
