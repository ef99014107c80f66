"""Loading a plan's source images: the one loader (:class:`SourceImages`) that ``warm``, ``inspect``,
the contact sheets and the filters use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data import check_scaled_size, image_sha256, load_image, source_path, to_rgb
from ..errors import InputError

__all__ = ["SourceImages"]


class SourceImages:
    """Loads a plan's source images: ``images[source]`` when ``images`` is given (a dataset of
    ``(image, label)`` or a mapping), else the file ``data_root/source`` (a path leaving the root
    is refused). The last image is kept, so the variants of one source load it once.

    Args:
        plan: the :class:`~dalda_aug.plan.AugmentationPlan` (its ``data_root``).
        images: the images of a plan made from an in-memory dataset.
        verify: check each image against the plan's content hash (:meth:`__call__` of a variant);
            ``False`` loads by source only.
        max_edge: refuse an image whose resize to this shorter side would be too large, before
            it is resized (``None``: no such check).
        hint: what to do with a source that is a dataset index (said in the error).
    """

    def __init__(self, plan: Any, images: Any = None, *, verify: bool = True, max_edge: int | None = None,
                 hint: str = "pass images= (the dataset the plan was made from)") -> None:
        self.root = Path(plan.data_root) if plan.data_root else None
        self.images = images
        self.verify = verify
        self.max_edge = max_edge
        self.hint = hint
        self._last: tuple[Any, Any] | None = None
        self._checked: tuple[Any, str] | None = None  # (source, content hash) of the last image verified

    def load(self, source: Any) -> Any:
        """The RGB image of plan source ``source`` (not checked against the plan)."""
        if self._last is not None and self._last[0] == source:
            return self._last[1]
        if self.images is not None:
            item = self.images[source]
            image = to_rgb(item[0] if isinstance(item, (tuple, list)) else item, f"source {source!r}")
            what = f"source {source!r}"
        elif self.root is not None and isinstance(source, str):
            path = source_path(self.root, source)  # refuses paths leaving the root
            image, what = load_image(path), str(path)
        else:
            raise InputError(f"plan source {source!r} is a dataset index: {self.hint}")
        if self.max_edge is not None:
            check_scaled_size(image.size, self.max_edge, what)
        self._last, self._checked = (source, image), None
        return image

    def __call__(self, variant: Any) -> Any:
        """The source image of a plan variant, checked against its content hash when ``verify``."""
        image = self.load(variant.source)
        if not self.verify or self._checked == (variant.source, variant.source_sha256):
            return image  # the variants of one source hash it once
        if image_sha256(image) != variant.source_sha256:
            self._last = None
            raise InputError(f"source image {variant.source!r} differs from the one the plan was made from "
                             "(content hash changed); re-plan")
        self._checked = (variant.source, variant.source_sha256)
        return image
