"""Textual inversion for DA-Fusion: one learned token embedding per class.

:func:`train_textual_inversion` follows DA-Fusion's ``fine_tune.py`` (itself diffusers'
``examples/textual_inversion`` script) with the settings of its launch scripts
(``scripts/fine_tuning/fine_tune_*.sh`` in github.com/brandontrabucco/da-fusion):
placeholder token ``<class_name>`` (spaces as underscores) initialised from the embedding of
"the", 1,000 steps, batch 4, learning rate 5e-4 scaled by the batch size (``--scale_lr``: 2e-3),
constant schedule without warm-up, AdamW (β 0.9 / 0.999, weight decay 1e-2, ε 1e-8), 512 px
images (bicubic resize, no centre crop, horizontal flip p = 0.5), the "object" prompt templates
("a photo of a {}", ...), DDPM noise at timesteps uniform over the training schedule, the
ε-prediction MSE; only the new token's row of the text encoder's embedding matrix is trained
(the others are restored after each step). DA-Fusion trains in fp16 mixed precision with gradient
checkpointing; here the text encoder trains in float32 and the frozen UNet/VAE run in ``dtype``.

The output folder holds one file per class in diffusers' textual-inversion format
(``{token: embedding}``, safetensors), loadable with ``pipe.load_textual_inversion(file, token=...)``,
and ``tokens.json`` (the manifest: class -> token, file, SHA-256, the images it was learned on,
the settings and base model). Learned embeddings are also cached by content (the class's image
hashes, the settings, the base model and seed) under ``$DALDA_AUG_CACHE/textual-inversion``, so
a rerun reuses them without training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .._io import read_json_object, write_atomic
from ..config import ModelConfig
from ..errors import InputError, MissingFileError, require
from .base import check_int, check_real, dtype_name, resolve_torch_dtype
from ..locations import describe_location, parse_location, user_cache_dir
from .loading import call_loader, check_local_folder, quiet_loading

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

    from ..data import ImageSource

__all__ = ["TextualInversionConfig", "TextualInversionTrainer", "TokenSet", "train_textual_inversion",
           "class_token", "OBJECT_TEMPLATES", "TOKENS_FORMAT"]

TOKENS_FORMAT = "dalda_aug.tokens/1"
MANIFEST = "tokens.json"
_CACHE_FORMAT = "dalda_aug.textual_inversion/1"

# The "object" templates of diffusers' textual-inversion example, as DA-Fusion's fine_tune.py uses them.
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)


def class_token(class_name: str) -> str:
    """DA-Fusion's placeholder token of a class: ``<name>`` with spaces as underscores."""
    return f"<{class_name.replace(' ', '_')}>"


@dataclass(frozen=True)
class TextualInversionConfig:
    """Textual-inversion settings (DA-Fusion's by default; see the module docstring)."""

    # Optimisation steps per class (DA-Fusion: --max_train_steps=1000).
    steps: int = 1000
    # Images per step (DA-Fusion: --train_batch_size=4).
    batch_size: int = 4
    # Base learning rate (DA-Fusion: 5e-4), multiplied by batch_size when scale_lr (--scale_lr).
    learning_rate: float = 5e-4
    scale_lr: bool = True
    # AdamW settings (diffusers' script defaults, which DA-Fusion keeps).
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    # Training image size (DA-Fusion: --resolution=512), bicubic resize without centre crop.
    resolution: int = 512
    # Probability of a horizontal flip per training image (diffusers' script: 0.5).
    flip_p: float = 0.5
    # Word whose embedding initialises each class token (DA-Fusion: "the").
    initializer_token: str = "the"

    def __post_init__(self) -> None:
        owner = "TextualInversionConfig"
        for name, minimum in (("steps", 1), ("batch_size", 1), ("resolution", 8)):
            object.__setattr__(self, name, check_int(owner, name, getattr(self, name), minimum))
        object.__setattr__(self, "learning_rate", check_real(owner, "learning_rate", self.learning_rate, 0.0, 1.0,
                                                             low_open=True))
        for name in ("adam_beta1", "adam_beta2", "weight_decay", "flip_p"):
            object.__setattr__(self, name, check_real(owner, name, getattr(self, name), 0.0, 1.0))
        object.__setattr__(self, "adam_epsilon", check_real(owner, "adam_epsilon", self.adam_epsilon, 0.0, 1.0,
                                                            low_open=True))
        if not isinstance(self.scale_lr, bool):
            raise InputError(f"{owner}.scale_lr must be True or False, got {self.scale_lr!r}")
        if not isinstance(self.initializer_token, str) or not self.initializer_token.strip():
            raise InputError(f"{owner}.initializer_token must be a word, got {self.initializer_token!r}")

    @property
    def effective_learning_rate(self) -> float:
        return self.learning_rate * (self.batch_size if self.scale_lr else 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# the token folder
# --------------------------------------------------------------------------------------------
def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class TokenSet:
    """A folder of learned class tokens: ``tokens.json`` plus one diffusers textual-inversion file per class."""

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        self.folder = folder
        self.manifest = manifest

    @classmethod
    def load(cls, location: str | os.PathLike[str]) -> "TokenSet":
        folder = parse_location(location).path
        path = folder / MANIFEST
        if not path.is_file():
            raise MissingFileError(f"token folder {folder}: {MANIFEST} not found (write it with `dalda-aug "
                                   "textual-inversion`)")
        data = read_json_object(path, "token manifest")
        if data.get("format") != TOKENS_FORMAT or not isinstance(data.get("classes"), dict) or not data["classes"]:
            raise InputError(f"{path}: not a {TOKENS_FORMAT} manifest with at least one class")
        return cls(folder, data)

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["classes"])

    def token_of(self, class_name: str) -> str:
        entry = self.manifest["classes"].get(class_name)
        if entry is None:
            raise InputError(f"the tokens in {self.folder} have no token for class {class_name!r}")
        return str(entry["token"])

    def file_of(self, class_name: str) -> Path:
        self.token_of(class_name)
        return self.folder / str(self.manifest["classes"][class_name]["file"])

    @property
    def digest(self) -> str:
        """Hash of every class's token and file content hash (what changes generated pixels)."""
        items = sorted((name, e["token"], e["sha256"]) for name, e in self.manifest["classes"].items())
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]

    def verify(self) -> None:
        """Fail, naming the file, when a token file is missing or differs from the manifest."""
        for name in self.class_names:
            path = self.file_of(name)
            if not path.is_file():
                raise MissingFileError(f"token file of class {name!r} not found: {path}")
            if _file_sha256(path) != self.manifest["classes"][name]["sha256"]:
                raise InputError(f"{path} changed since {self.folder / MANIFEST} was written; train the tokens again")


# File names of a token folder stay well under the usual 255-byte limit, leaving room for the
# temporary name written first (".NAME.tmp-PID").
_MAX_STEM_BYTES = 200


def _token_file_name(token: str) -> str:
    """The file holding ``token``'s embedding: ``<name>`` -> ``name.safetensors``, made safe and
    short enough for any filesystem. A name that needed a change (a separator, a leading dot,
    more than 200 bytes) gets a suffix of its own hash, so two tokens never share a file; the
    class name itself is kept in ``tokens.json``."""
    from ..data import class_folder_name

    stem = class_folder_name(token.strip("<>"))
    if len(stem.encode("utf-8", "surrogatepass")) > _MAX_STEM_BYTES:
        short = stem.encode("utf-8", "surrogatepass")[: _MAX_STEM_BYTES - 17].decode("utf-8", "ignore")
        stem = f"{short}-{hashlib.sha256(token.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"
    return f"{stem}.safetensors"


def _writable_folder(folder: Path, what: str, fix: str) -> Path:
    """``folder``, created if needed, or an :class:`InputError` saying it cannot be (before any training)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"cannot write the {what} {folder}: {exc.strerror or exc}; {fix}") from None
    return folder


def _save_embedding(path: Path, token: str, vector: "torch.Tensor") -> None:
    from safetensors.torch import save

    write_atomic(path, save({token: vector.detach().to("cpu", dtype=vector.dtype).contiguous()}))


def _load_embedding(path: Path) -> "torch.Tensor":
    from safetensors.torch import load_file

    values = list(load_file(str(path)).values())
    if len(values) != 1:
        raise InputError(f"{path}: expected one token embedding, found {len(values)}")
    return values[0]


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
class TextualInversionTrainer:
    """The models and one training step of textual inversion (one class token at a time).

    Loads the base pipeline's tokenizer, text encoder (float32, trained), VAE and UNet (frozen,
    in ``dtype``) and its noise schedule as a ``DDPMScheduler``.
    """

    def __init__(self, models: ModelConfig, config: TextualInversionConfig | None = None, *, device: Any = "cpu",
                 dtype: Any = None) -> None:
        torch = require("torch", "generate")
        diffusers = require("diffusers", "generate")
        transformers = require("transformers", "generate")
        self.config = config if config is not None else TextualInversionConfig()
        self.device = torch.device(device)
        self.dtype = resolve_torch_dtype(dtype)
        check_local_folder(models.base, "ModelConfig.base", "Stable Diffusion pipeline", "model_index.json")
        base, rev = parse_location(models.base).value, models.base_revision
        where = describe_location(models.base, None, rev)

        def part(what: str, cls: Any, subfolder: str, **kwargs: Any) -> Any:
            return call_loader(f"the base model's {what}", f"{subfolder}/ in {where}", cls.from_pretrained, base,
                               subfolder=subfolder, revision=rev, **kwargs)

        self.tokenizer = part("tokenizer", transformers.CLIPTokenizer, "tokenizer")
        self.text_encoder = part("text encoder", transformers.CLIPTextModel, "text_encoder").to(self.device)
        self.vae = part("VAE", diffusers.AutoencoderKL, "vae", dtype=self.dtype).to(self.device)
        self.unet = part("UNet", diffusers.UNet2DConditionModel, "unet", dtype=self.dtype).to(self.device)
        self.noise_scheduler = part("noise schedule", diffusers.DDPMScheduler, "scheduler")
        for module in (self.text_encoder, self.vae, self.unet):
            module.requires_grad_(False)
            module.eval()
        self._embeddings = self.text_encoder.get_input_embeddings()
        self._original: Any = None
        self._token_id: int | None = None
        self._optimizer: Any = None

    def add_token(self, token: str) -> int:
        """Add ``token`` (initialised from the initializer word) and make it the trained one."""
        import torch

        ids = self.tokenizer.encode(self.config.initializer_token, add_special_tokens=False)
        if len(ids) != 1:
            raise InputError(f"initializer_token {self.config.initializer_token!r} is {len(ids)} tokens, not one")
        if self.tokenizer.add_tokens(token) == 0:
            raise InputError(f"the tokenizer already has the token {token!r}")
        with quiet_loading():  # transformers' mean_resizing notice: the new row is set just below
            self.text_encoder.resize_token_embeddings(len(self.tokenizer))
        self._embeddings = self.text_encoder.get_input_embeddings()
        token_id = int(self.tokenizer.convert_tokens_to_ids(token))
        with torch.no_grad():
            self._embeddings.weight[token_id] = self._embeddings.weight[ids[0]]
        self._embeddings.weight.requires_grad_(True)
        self._original = self._embeddings.weight.detach().clone()
        self._token_id = token_id
        c = self.config
        self._optimizer = torch.optim.AdamW([self._embeddings.weight], lr=c.effective_learning_rate,
                                            betas=(c.adam_beta1, c.adam_beta2), weight_decay=c.weight_decay,
                                            eps=c.adam_epsilon)
        return token_id

    def embedding(self) -> "torch.Tensor":
        """The current embedding of the trained token (a float32 copy)."""
        if self._token_id is None:
            raise InputError("add_token() first")
        weight: torch.Tensor = self._embeddings.weight[self._token_id].detach().float().clone()
        return weight

    def pixels(self, image: "Image.Image") -> "torch.Tensor":
        """(3, R, R) tensor in [-1, 1]: the image resized to the training resolution (bicubic)."""
        import numpy as np
        import torch
        from PIL import Image

        r = self.config.resolution
        array = np.asarray(image.convert("RGB").resize((r, r), Image.Resampling.BICUBIC), dtype=np.float32)
        return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1)

    def loss(self, pixels: "torch.Tensor", prompts: Sequence[str], generator: "torch.Generator") -> "torch.Tensor":
        """The textual-inversion loss of a batch (noise, timesteps and VAE sample from ``generator``)."""
        import torch
        import torch.nn.functional as F

        from diffusers.utils.torch_utils import randn_tensor

        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
            latents = dist.mean + dist.std * randn_tensor(dist.mean.shape, generator=generator,
                                                          device=self.device, dtype=dist.mean.dtype)
            latents = latents * self.vae.config.scaling_factor
        noise = randn_tensor(latents.shape, generator=generator, device=self.device, dtype=latents.dtype)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        states = self.text_encoder(ids.to(self.device))[0].to(self.dtype)
        prediction = self.unet(noisy, timesteps, states).sample
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise InputError(f"unsupported prediction type {kind!r} of the base model's scheduler")
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")

    def step(self, pixels: "torch.Tensor", prompts: Sequence[str], generator: "torch.Generator") -> float:
        """One optimisation step; only the trained token's row changes. Returns the loss."""
        import torch

        if self._token_id is None:
            raise InputError("add_token() first")
        self.text_encoder.train()
        loss = self.loss(pixels, prompts, generator)
        loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
        self._optimizer.step()
        self._optimizer.zero_grad()
        self.text_encoder.eval()
        with torch.no_grad():
            keep = torch.arange(self._embeddings.weight.shape[0], device=self.device) != self._token_id
            self._embeddings.weight[keep] = self._original[keep]
        return float(loss.detach())

    def train(self, token: str, images: Sequence["Image.Image"], seed: int, *, progress: bool = False) -> "torch.Tensor":
        """Learn ``token`` on ``images`` for ``config.steps`` steps; returns its embedding."""
        import numpy as np
        import torch
        from tqdm.auto import tqdm

        if not images:
            raise InputError(f"no images to learn {token!r} from")
        self.add_token(token)
        c = self.config
        rng = np.random.default_rng(seed)
        generator = torch.Generator("cpu").manual_seed(seed)
        base = torch.stack([self.pixels(image) for image in images])
        order: list[int] = []
        for _ in tqdm(range(c.steps), desc=f"textual inversion {token}", unit="step", disable=not progress):
            while len(order) < c.batch_size:  # shuffled passes over the images, like a shuffled DataLoader
                order.extend(int(i) for i in rng.permutation(len(images)))
            batch, order = order[: c.batch_size], order[c.batch_size :]
            pixels = base[batch].clone()
            flips = rng.random(len(batch)) < c.flip_p
            if flips.any():
                pixels[torch.from_numpy(flips)] = pixels[torch.from_numpy(flips)].flip(-1)
            prompts = [OBJECT_TEMPLATES[int(rng.integers(len(OBJECT_TEMPLATES)))].format(token) for _ in batch]
            self.step(pixels, prompts, generator)
        return self.embedding()


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return user_cache_dir("textual-inversion")


def train_textual_inversion(
    data: "str | os.PathLike[str] | ImageSource",
    out: str | os.PathLike[str],
    *,
    models: ModelConfig | None = None,
    shots: int | None = None,
    seed: int = 0,
    config: TextualInversionConfig | None = None,
    device: Any = "cpu",
    dtype: Any = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> "TokenSet":
    """Learn one DA-Fusion token per class on its few-shot images and write them to ``out``.

    Args:
        data: an image folder (``ROOT/<class>/<image>``) or an :class:`~dalda_aug.data.ImageSource`.
        out: the token folder to write (``tokens.json`` + one ``.safetensors`` per class).
        models: where the base Stable Diffusion model lives (the paper's by default).
        shots: keep this many images per class with the same seeded split as ``dalda-aug plan
            --shots N --seed S`` (all images when ``None``).
        seed: the split seed and the training seed (each class trains from its own seed derived
            from it and the class's images, so classes do not depend on each other).
        config: :class:`TextualInversionConfig` (DA-Fusion's settings by default).
        device, dtype: where the frozen UNet and VAE run and in which dtype.
        cache_dir: content-addressed store of learned embeddings (default
            ``$DALDA_AUG_CACHE/textual-inversion``); a class whose images, settings, base model
            and seed are unchanged is not trained again.

    Returns the :class:`TokenSet` of ``out``; ``pipe.load_textual_inversion(str(tokens.file_of(c)),
    token=tokens.token_of(c))`` loads a class's token into a stock diffusers pipeline.
    """
    from ..data import ImageSource, image_sha256
    from ..plan import derive_seed

    models = models if models is not None else ModelConfig()
    config = config if config is not None else TextualInversionConfig()
    if not isinstance(config, TextualInversionConfig):
        raise InputError(f"config must be a TextualInversionConfig, got {type(config).__name__}")
    source = data if isinstance(data, ImageSource) else ImageSource.from_folder(data)
    if shots is not None:
        source = source.few_shot(check_int("train_textual_inversion", "shots", shots, 1), seed)
    if len(source) == 0:
        raise InputError("no images to learn tokens from")
    names = source.class_names
    per_class: dict[str, list[Any]] = {}
    for item in source.items:
        per_class.setdefault(names[item.label], []).append(item)
    out_dir = _writable_folder(Path(out), "token folder", "give --out a writable folder")
    store = _writable_folder(_cache_root(cache_dir), "textual-inversion cache",
                             "set DALDA_AUG_CACHE (or XDG_CACHE_HOME) to a writable folder, or pass cache_dir")
    trainer: TextualInversionTrainer | None = None
    classes: dict[str, Any] = {}
    for name, items in per_class.items():
        images = [item.load() for item in items]
        hashes = [image_sha256(image) for image in images]
        token = class_token(name)
        key_blob = {"format": _CACHE_FORMAT, "base": models.base, "base_revision": models.base_revision,
                    "settings": config.to_dict(), "token": token, "images": sorted(hashes), "seed": int(seed),
                    "dtype": dtype_name(dtype)}
        key = hashlib.sha256(json.dumps(key_blob, sort_keys=True).encode()).hexdigest()
        cached = store / f"{key}.safetensors"
        if not cached.is_file():
            if trainer is None:
                trainer = TextualInversionTrainer(models, config, device=device, dtype=dtype)
            class_seed = derive_seed(seed, hashlib.sha256("".join(sorted(hashes)).encode()).hexdigest(), 0,
                                     "textual-inversion")
            vector = trainer.train(token, images, class_seed, progress=progress)
            _save_embedding(cached, token, vector)
        vector = _load_embedding(cached)
        filename = _token_file_name(token)
        target = out_dir / filename
        _save_embedding(target, token, vector)
        classes[name] = {"token": token, "file": filename, "sha256": _file_sha256(target),
                         "images": [str(item.source) for item in items], "image_sha256": hashes, "cache_key": key}
    manifest = {"format": TOKENS_FORMAT, "base": models.base, "base_revision": models.base_revision,
                "seed": int(seed), "shots": shots, "dtype": dtype_name(dtype), "settings": config.to_dict(),
                "classes": classes}
    write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return TokenSet.load(out_dir)
