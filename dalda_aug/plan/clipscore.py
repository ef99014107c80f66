"""CLIPScore as DALDA uses it: CLIP's zero-shot probability of an image's own class.

For class prompts "a photo of a {class}" over *every* class of the dataset, the score of an
image is ``softmax(100 · cos(image, texts))[own class]`` — a probability in [0, 1]; the
reference code computes this. Two other readings:

* ``kind="cosine"``: the paper's wording taken literally ("the cosine similarity between the
  image and text embeddings"): the raw cosine of the image and its own class text, clipped at
  0, ``max(cos, 0)``, in [0, 1], which is the scale AGS's α = 0.3 and μ formula read.
* ``kind="hessel"``: the CLIPScore of Hessel et al., ``2.5 · max(cos, 0)``, in [0, 2.5]; it
  exceeds 1 once cos > 0.4, so it cannot feed AGS (whose scores must lie in [0, 1]) and is
  for analysis only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence, Union

import numpy as np
import numpy.typing as npt

from ..errors import InputError, ModelLoadError, require
from ..prompts.presets import PHOTO_TEMPLATE

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ..config import ModelConfig

# A torch device or its name ("cpu", "cuda:1").
Device = Union[str, "torch.device"]

__all__ = ["CLIPScorer", "load_open_clip", "SCORE_BLOCK"]

LOGIT_SCALE = 100.0  # CLIP ViT-B/16 (OpenAI) learned logit scale, as DALDA uses it
HESSEL_W = 2.5
KINDS = ("softmax", "cosine", "hessel")
# Images per forward pass in :meth:`CLIPScorer.score`. float32 CPU/GPU kernels may round
# differently for different batch shapes (it happens on Intel Xeons and AMD EPYCs alike: an image
# scored in a batch of 16 and in a batch of 5 differs in its last bits), so a score, and through it
# a plan's λ and cache keys, would depend on how many other images shared its forward pass. Every
# forward pass of :meth:`CLIPScorer.score` therefore has one fixed shape: SCORE_BLOCK images, the
# last block of a call padded with all-zero pixel tensors whose outputs are discarded; the cosines
# and the softmax are computed on the whole padded block too. With one shape the kernels, and so
# each row's arithmetic, are the same whichever block, position or neighbours an image gets: a
# score is a function of the image, the class list, the model (and the machine) alone. The same
# image then gets the same score, bit for bit on one machine, in a 1-shot and a 16-shot plan,
# whatever the reading chunk, the batch size, the order or the number of processes, so their
# variants share cache entries. tests/test_scoring_blocks.py checks this with torch.equal.
SCORE_BLOCK = 16


def load_open_clip(model_name: str, pretrained: str | None, device: Device = "cpu") -> tuple[Any, Any, Any]:
    """Load an open_clip model, its eval transform and tokenizer.

    ``model_name`` is a registered open_clip name (``"ViT-B-16"``) or a path to a model-config
    JSON file (registered with ``open_clip.add_model_config``). ``pretrained`` is a tag
    (``"openai"``) or a checkpoint file.
    """
    require("open_clip", "generate", package="open_clip_torch")
    import open_clip

    from ..locations import parse_location  # the one "hub id or local path" rule

    name = model_name
    model_location = parse_location(model_name)
    if model_location.is_local:
        cfg_path = model_location.path
        if not cfg_path.is_file():
            raise ModelLoadError(f"open_clip model config not found: {cfg_path}")
        open_clip.add_model_config(cfg_path)
        name = cfg_path.stem
    if pretrained and parse_location(pretrained).is_local:
        pretrained = parse_location(pretrained).value
        if not Path(pretrained).is_file():
            raise ModelLoadError(f"open_clip checkpoint not found: {pretrained} (for model {model_name!r})")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    except (RuntimeError, OSError, ValueError) as exc:
        text = str(exc)
        loading = ("Unknown model", "not found", "download", "Hub", "checkpoint", "state_dict")
        if isinstance(exc, RuntimeError) and not any(s.lower() in text.lower() for s in loading):
            raise  # a genuine runtime failure, not a loading problem
        raise ModelLoadError(
            f"cannot load open_clip model {model_name!r} with pretrained={pretrained!r}: {text.strip().rstrip('.')}. "
            "Offline? Pass --models models.json naming a local checkpoint (its clip_pretrained field) "
            "and set HF_HUB_OFFLINE=1"
        ) from exc
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    return model, preprocess, tokenizer


class CLIPScorer:
    """Scores how well CLIP recognises each image as its own class.

    Args:
        model_name: open_clip model name or model-config JSON path (``ModelConfig.clip_model``).
        pretrained: open_clip pretrained tag or checkpoint path (``ModelConfig.clip_pretrained``).
        device: torch device for the model (CPU by default).
        template: class prompt; ``{}`` is replaced by the class name.
        kind: ``"softmax"`` (DALDA's zero-shot probability, as the reference code), ``"cosine"``
            (``max(cos, 0)``, the paper's wording) or ``"hessel"`` (``2.5 · max(cos, 0)``,
            Hessel et al.; above 1 for cos > 0.4, so not for AGS).
        batch_size: images per forward pass in :meth:`image_features`. :meth:`score` always works
            in forward passes of exactly :data:`SCORE_BLOCK` images (the last one padded), so a
            score never depends on the batch size, the reading chunk size or the other images of
            the call.

    The model is loaded on first use; text features are computed once per class list.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        pretrained: str | None = "openai",
        device: Device = "cpu",
        template: str = PHOTO_TEMPLATE,
        kind: Literal["softmax", "cosine", "hessel"] = "softmax",
        batch_size: int = 64,
    ) -> None:
        if "{}" not in template:
            raise InputError(f"template must contain '{{}}' for the class name, got {template!r}")
        if kind not in KINDS:
            raise InputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if int(batch_size) < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size!r}")
        self.model_name = model_name
        self.pretrained = pretrained
        self.device = device
        self.template = template
        self.kind = kind
        self.batch_size = int(batch_size)
        self._model: Any = None
        self._preprocess: Any = None
        self._tokenizer: Any = None
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}
        # the eval transform split where it turns a PIL image into a tensor (see prepare/pixels)
        self._split: tuple[list[Any], list[Any]] | None = None
        self._batch_checked = False  # pixels() compared a batch with the transform image by image
        self._batch_ok = True  # ... and found them equal (or has not compared yet)

    @classmethod
    def from_models(cls, models: ModelConfig, **kwargs: Any) -> "CLIPScorer":
        """Build from a :class:`~dalda_aug.config.ModelConfig`."""
        return cls(models.clip_model, models.clip_pretrained, **kwargs)

    def __repr__(self) -> str:
        return (f"CLIPScorer(model_name={self.model_name!r}, pretrained={self.pretrained!r}, "
                f"device={self.device!r}, kind={self.kind!r}, template={self.template!r})")

    def _load(self) -> Any:
        if self._model is None:
            self._model, self._preprocess, self._tokenizer = load_open_clip(
                self.model_name, self.pretrained, self.device
            )
            self._split = _split_transform(self._preprocess)
        return self._model

    def text_features(self, class_names: Sequence[str]) -> torch.Tensor:
        """L2-normalised text features of the class prompts (cached per class list)."""
        import torch

        key = tuple(class_names)
        if key not in self._text_cache:
            if not key:
                raise InputError("class_names is empty")
            model = self._load()
            tokens = self._tokenizer([self.template.format(c) for c in key]).to(self.device)
            with torch.inference_mode():
                feats = model.encode_text(tokens).float()
            self._text_cache[key] = feats / feats.norm(dim=-1, keepdim=True)
        return self._text_cache[key]

    def image_features(self, images: Sequence[Image.Image], progress: bool | None = None) -> torch.Tensor:
        """L2-normalised image features, in batches (``images`` are PIL images)."""
        import torch
        from tqdm.auto import tqdm

        out: list[torch.Tensor] = []
        show = progress if progress is not None else len(images) > 4 * self.batch_size
        starts = range(0, len(images), self.batch_size)
        for start in tqdm(starts, desc="CLIPScore", unit="batch", disable=not show):
            out.append(self._encode(images[start : start + self.batch_size]))
        return torch.cat(out) if out else torch.empty(0)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The model's eval transform of one PIL image: a ``(3, H, W)`` float tensor on the CPU.

        Thread-safe once the model is loaded (:meth:`load` first): a pure function of the image,
        so sources can be decoded and preprocessed in a thread pool and passed to :meth:`score`.
        """
        self.load()
        pixels: torch.Tensor = self._preprocess(image)
        return pixels

    @property
    def input_edge(self) -> int:
        """The model's input size in pixels (its eval transform resizes an image's shorter side to
        it): what :func:`~dalda_aug.data.check_scaled_size` checks a source against before it is
        resized."""
        self.load()
        size = getattr(getattr(self._model, "visual", None), "image_size", 224)
        return int(max(size)) if isinstance(size, (tuple, list)) else int(size)

    def prepare(self, image: Image.Image) -> Any:
        """The part of :meth:`preprocess` done image by image (thread-safe once loaded, as
        :meth:`preprocess`): with open_clip's usual transform ``Compose([Resize, CenterCrop, convert,
        ToTensor, Normalize])``, the resized and cropped RGB PIL image; :meth:`pixels` converts many
        at once. With any other transform, the whole :meth:`preprocess` tensor."""
        self.load()
        if self._split is None:
            return self.preprocess(image)
        for transform in self._split[0]:
            image = transform(image)
        return image

    def pixels(self, prepared: Sequence[Any]) -> torch.Tensor:
        """The ``(N, 3, H, W)`` pixel batch of images :meth:`prepare` made, row ``i`` equal
        (``torch.equal``) to :meth:`preprocess` of image ``i``.

        Same-size RGB images are turned into one uint8 array and converted and normalised as one
        tensor: ``ToTensor`` (a cast and a division by 255) and ``Normalize`` (a subtraction and a
        division per channel) are elementwise, so each pixel gets the same float32 operations as in
        ``preprocess``, without a dozen small tensor operations per image. Anything else goes through
        the transform image by image.
        """
        import torch

        self.load()
        if not len(prepared):
            raise InputError("no images to convert")
        if self._split is None:  # prepare() made whole preprocess tensors
            return torch.stack([x if isinstance(x, torch.Tensor) else self.preprocess(x) for x in prepared])
        tensor_stage = self._split[1]
        first = prepared[0]
        if not (self._batch_ok and all(not isinstance(x, torch.Tensor) and getattr(x, "mode", None) == "RGB"
                                       and x.size == first.size for x in prepared)):
            return torch.stack([x if isinstance(x, torch.Tensor) else _apply(tensor_stage, x) for x in prepared])
        # torchvision's to_tensor of an RGB image: uint8 HWC -> CHW, cast to the default float
        # dtype, divided by 255; here for the whole batch, then the tensor stage (Normalize) on it
        array = np.stack([np.asarray(x, dtype=np.uint8) for x in prepared])
        batch: torch.Tensor = torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
        batch = _apply(tensor_stage[1:], batch.to(dtype=torch.get_default_dtype()).div(255))  # [0]: ToTensor
        if not self._batch_checked:  # once: the batch's first row is what the transform makes of it
            self._batch_checked = True
            if not torch.equal(batch[0], _apply(tensor_stage, first)):  # never seen: then image by image
                import warnings

                self._batch_ok = False
                warnings.warn(f"{self!r}: converting images as one batch differs from its transform image by "
                              "image here; converting them one by one (slower, same scores); please report this",
                              RuntimeWarning, stacklevel=2)
                return self.pixels(prepared)
        return batch

    def load(self) -> "CLIPScorer":
        """Load the model, its transform and tokenizer now (otherwise on first use)."""
        self._load()
        return self

    def _encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised features of one forward pass over ``images``."""
        import torch

        return self._forward(torch.stack([self.preprocess(img) for img in images]))

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features of one forward pass over a batch of preprocessed pixels."""
        import torch

        model = self._load()
        with torch.inference_mode():
            feats = model.encode_image(pixels.to(self.device)).float()
        normed: torch.Tensor = feats / feats.norm(dim=-1, keepdim=True)
        return normed

    def score(self, images: Sequence[Image.Image | torch.Tensor] | torch.Tensor,
              labels: Sequence[int] | npt.NDArray[np.integer[Any]],
              class_names: Sequence[str], progress: bool | None = None) -> npt.NDArray[np.float64]:
        """One score per image: see the module docstring. ``labels`` index ``class_names``.

        ``images`` are PIL images or tensors :meth:`preprocess` made (they may be mixed), or an
        ``(N, 3, H, W)`` batch of them (:meth:`pixels`). Each
        forward pass holds exactly :data:`SCORE_BLOCK` images, the last padded with zeros, so an
        image's score does not depend on the other images of the call or on its position.
        """
        import torch

        batch = images if isinstance(images, torch.Tensor) else None
        if batch is not None and batch.ndim != 4:
            raise InputError(f"a pixel batch must be (N, 3, H, W), got shape {tuple(batch.shape)}")
        listed = list(images) if batch is None else []
        if batch is None:
            images = listed
        label_ids = np.asarray(labels, dtype=np.int64)
        if len(images) != len(label_ids):
            raise InputError(f"{len(images)} images but {len(label_ids)} labels")
        if label_ids.size and (label_ids.min() < 0 or label_ids.max() >= len(class_names)):
            raise InputError(f"labels must lie in [0, {len(class_names)}), got {label_ids.min()}..{label_ids.max()}")
        if not len(images):
            return np.zeros(0, dtype=np.float64)
        text = self.text_features(class_names)
        out: list[npt.NDArray[np.float64]] = []
        for start, real, img in self._blocks(images, listed, batch, progress):
            ids = np.zeros(SCORE_BLOCK, dtype=np.int64)
            ids[:real] = label_ids[start : start + real]
            # Everything below runs on the whole (SCORE_BLOCK, ...) block, so no shape depends on
            # how many real images the block holds; the rows are sliced at the very end.
            cos = img @ text.T  # (SCORE_BLOCK, C)
            idx = torch.as_tensor(ids, device=cos.device)
            if self.kind in ("cosine", "hessel"):
                own = cos.gather(1, idx[:, None])[:, 0].clamp(min=0)
                result = own if self.kind == "cosine" else HESSEL_W * own
            else:
                probs = (LOGIT_SCALE * cos).softmax(dim=-1)
                result = probs.gather(1, idx[:, None])[:, 0]
            out.append(result.double().cpu().numpy()[:real])
        return np.concatenate(out)

    def class_probabilities(self, images: Sequence[Image.Image | torch.Tensor] | torch.Tensor,
                            class_names: Sequence[str], progress: bool | None = None) -> npt.NDArray[np.float64]:
        """``(N, C)``: each image's zero-shot probabilities over ``class_names``
        (``softmax(100 · cos(image, texts))``, the ``"softmax"`` score of every class at once), in the
        forward passes of :meth:`score` (:data:`SCORE_BLOCK` images, the last block padded), so a
        row's column of its own class is what :meth:`score` gives that image with ``kind="softmax"``."""
        import torch

        batch, listed = self._as_batch(images)
        if not (len(listed) if batch is None else len(batch)):
            return np.zeros((0, len(class_names)), dtype=np.float64)
        text = self.text_features(class_names)
        out = [(LOGIT_SCALE * (img @ text.T)).softmax(dim=-1).double().cpu().numpy()[:real]
               for _, real, img in self._blocks(listed if batch is None else batch, listed, batch, progress)]
        return np.concatenate(out)

    def embed(self, images: Sequence[Image.Image | torch.Tensor] | torch.Tensor,
              progress: bool | None = None) -> npt.NDArray[np.float32]:
        """``(N, D)`` L2-normalised image features in the forward passes of :meth:`score` (one fixed
        shape: an image's features do not depend on the other images of the call)."""
        batch, listed = self._as_batch(images)
        parts = [img.cpu().numpy()[:real] for _, real, img in
                 self._blocks(listed if batch is None else batch, listed, batch, progress)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)

    @staticmethod
    def _as_batch(images: Any) -> tuple[Any, list[Any]]:
        import torch

        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise InputError(f"a pixel batch must be (N, 3, H, W), got shape {tuple(images.shape)}")
            return images, []
        return None, list(images)

    def _blocks(self, images: Any, listed: list[Any], batch: Any, progress: bool | None
                ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, real images, features of the padded block)`` per :data:`SCORE_BLOCK` images."""
        import torch
        from tqdm.auto import tqdm

        show = progress if progress is not None else len(images) > 4 * self.batch_size
        starts = range(0, len(images), SCORE_BLOCK)
        for start in tqdm(starts, desc="CLIPScore", unit="block", disable=not show):
            if batch is not None:
                # a fresh tensor, as torch.stack gives below: no view into a larger batch (whose
                # offset could change the kernels' alignment)
                pixels = batch[start : start + SCORE_BLOCK].clone(memory_format=torch.contiguous_format)
            else:
                pixels = torch.stack([x if isinstance(x, torch.Tensor) else self.preprocess(x)
                                      for x in listed[start : start + SCORE_BLOCK]])
            real = len(pixels)
            if real < SCORE_BLOCK:  # pad to the one shape; the padding's outputs are dropped by the caller
                pixels = torch.cat([pixels, pixels.new_zeros((SCORE_BLOCK - real, *pixels.shape[1:]))])
            yield start, real, self._forward(pixels)


def _split_transform(transform: Any) -> tuple[list[Any], list[Any]] | None:
    """``(PIL stage, tensor stage)`` of a ``Compose`` whose tensor stage is torchvision's ``ToTensor``
    (open_clip's ``MaybeToTensor`` is one) followed by ``Normalize`` transforms only, or None for
    any other transform (then :meth:`CLIPScorer.pixels` runs it image by image)."""
    from torchvision import transforms as tv

    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, tv.Compose) or not isinstance(steps, list):
        return None
    to_tensor: tuple[type, ...] = (tv.ToTensor,)
    try:
        from open_clip.transform import MaybeToTensor  # ToTensor that passes tensors through

        to_tensor += (MaybeToTensor,)
    except ImportError:  # an open_clip without it
        pass
    at = next((i for i, t in enumerate(steps) if type(t) in to_tensor), None)
    if at is None or not all(type(t) is tv.Normalize for t in steps[at + 1 :]):
        return None
    return list(steps[:at]), list(steps[at:])


def _apply(transforms: Sequence[Any], x: Any) -> Any:
    for transform in transforms:
        x = transform(x)
    return x
