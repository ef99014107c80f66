"""What a :class:`~dalda_aug.dataset.SyntheticAugmentedDataset` does when the variant it drew is not
in the cache: its ``on_miss`` policies, one small class each (:data:`MISS_POLICIES`).

``"generate"``  generate it now, in this process, with the dataset's ``generator`` (an
                :class:`~dalda_aug.generators.ip_adapter.IPAdapterGenerator` or a zero-argument factory,
                built lazily in each worker process), then cache it;
``"wait"``      ask the attached :class:`~dalda_aug.dataset.pool.GeneratorPool` and wait for it
                (``wait_timeout``); a crashed pool raises instead of hanging;
``"real"``      return the real item now, and ask the pool (if attached) to generate it;
``"error"``     raise :class:`~dalda_aug.errors.CacheMissError`."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from ..errors import CacheMissError, InputError

__all__ = ["MissPolicy", "MISS_POLICIES"]


class MissPolicy:
    """One ``on_miss`` policy: :meth:`handle` gives the image for item ``index`` whose drawn
    ``variant`` (cache key ``key``) is missing, or None to serve the real item."""

    name = ""

    def handle(self, ds: Any, index: int, variant: Any, key: str) -> Any:
        raise NotImplementedError


class ErrorOnMiss(MissPolicy):
    """``on_miss="error"``: :class:`~dalda_aug.errors.CacheMissError`."""

    name = "error"

    def handle(self, ds: Any, index: int, variant: Any, key: str) -> Any:
        raise CacheMissError(
            f"variant {variant.variant} of {variant.source!r} (key {key}) is not in {ds.cache.directory}; "
            "warm the cache first (dalda-aug warm) or use on_miss='generate'/'wait'/'real'"
        )


class RealOnMiss(MissPolicy):
    """``on_miss="real"``: the real item (warned once where construction counted every variant
    cached); a pool, when attached, generates the variant in the background."""

    name = "real"

    def handle(self, ds: Any, index: int, variant: Any, key: str) -> Any:
        if ds._all_cached:  # counted cached at construction (from a coverage record, perhaps)
            ds._all_cached = False
            warnings.warn(
                f"variant {variant.variant} of {variant.source!r} (key {key}) is not usable in "
                f"{ds.cache.directory} although construction counted every planned variant cached (a value "
                "file removed or damaged since, outside the library?): it and any other such item is served "
                "real (on_miss='real'); `dalda-aug cache stats --plan` recounts, `dalda-aug warm` regenerates",
                UserWarning, stacklevel=4)
        if ds._pool is not None:
            ds._pool.submit(key, variant, ds._source_image(index, variant))
        return None


class WaitOnMiss(MissPolicy):
    """``on_miss="wait"``: the pool generates it now; wait for it (``wait_timeout``)."""

    name = "wait"

    def handle(self, ds: Any, index: int, variant: Any, key: str) -> Any:
        if ds._pool is None:
            raise InputError("on_miss='wait' needs a generator pool: pass pool= or call attach_pool()")
        ds._pool.submit(key, variant, ds._source_image(index, variant), force=True)
        return ds._pool.wait(key, ds.cache, timeout=ds.wait_timeout).image


class GenerateOnMiss(MissPolicy):
    """``on_miss="generate"``: generate it now, in this process (said once per process), then cache it."""

    name = "generate"

    def handle(self, ds: Any, index: int, variant: Any, key: str) -> Any:
        from ..generators.base import GenerationRequest

        source = ds._source_image(index, variant)
        if getattr(ds, "_said_generating", None) != os.getpid():  # once per process
            ds._said_generating = os.getpid()
            self.say_generating(ds, variant)
        generator = ds._get_generator()
        image = generator.generate([GenerationRequest.from_variant(variant, source)], batch_size=1)[0]
        ds.cache.put(variant, image)
        return image

    @staticmethod
    def say_generating(ds: Any, variant: Any) -> None:
        """The one warning of a process that starts generating misses inside ``__getitem__``
        (``on_miss="generate"``): which process, how many variants are missing, the faster way."""
        worker = torch.utils.data.get_worker_info()
        process = (f"DataLoader worker {worker.id} (pid {os.getpid()})" if worker is not None
                   else f"the main process (pid {os.getpid()})")
        if ds.cached_variants is not None:
            missing = f"{ds.planned_variants - ds.cached_variants} of the {ds.planned_variants} planned variants"
        else:
            missing = "the planned variants"
        warnings.warn(
            f"on_miss='generate': generating variant {variant.variant} of {variant.source!r} inside __getitem__ in "
            f"{process}, one image at a time; {missing} are missing from the cache {ds.cache.directory}, and each "
            "one drawn is generated this way. `dalda-aug warm --plan PLAN --cache CACHE` generates them faster, "
            "batched and ahead of training (on every GPU with accelerate launch).",
            UserWarning, stacklevel=5)


#: ``on_miss`` value -> its policy.
MISS_POLICIES: dict[str, MissPolicy] = {policy.name: policy for policy in (
    GenerateOnMiss(), WaitOnMiss(), RealOnMiss(), ErrorOnMiss())}
