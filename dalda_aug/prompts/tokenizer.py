"""The CLIP tokenizer that counts prompt tokens as Stable Diffusion 1.x does:
:func:`load_clip_tokenizer`, and the cache folder where the default one is built once."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

from ..errors import DaldaError, InputError, MissingFileError, ModelLoadError, require
from ..locations import user_cache_dir

__all__ = ["load_clip_tokenizer", "write_clip_tokenizer"]


def _cache_dir() -> Path:
    return user_cache_dir()


def load_clip_tokenizer(path: str | os.PathLike[str] | None = None, *, revision: str | None = None) -> Any:
    """A transformers ``CLIPTokenizer`` to count prompt tokens as Stable Diffusion 1.x does.

    ``path`` is a tokenizer folder, a Stable Diffusion pipeline folder or hub id (its
    ``tokenizer/`` is used), or ``None``: the real CLIP BPE built offline from open_clip's
    bundled vocabulary (:func:`write_clip_tokenizer`), cached under
    ``$DALDA_AUG_CACHE`` (default ``~/.cache/dalda_aug``).
    """
    transformers = require("transformers", "llm")
    if path is None:
        folder = _cache_dir() / "clip-tokenizer"
        if not (folder / "tokenizer_config.json").is_file():
            import shutil

            tmp = folder.with_name(f".clip-tokenizer.tmp-{os.getpid()}")
            try:
                write_clip_tokenizer(tmp)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise InputError(
                    f"cannot write the CLIP tokenizer into the cache folder {folder.parent}: {exc.strerror or exc}; "
                    "set DALDA_AUG_CACHE (or XDG_CACHE_HOME) to a writable folder, or pass --tokenizer"
                ) from None
            shutil.rmtree(folder, ignore_errors=True)  # an unfinished earlier copy
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
        path = folder
    from ..locations import parse_location  # the one "hub id or local path" rule

    location = parse_location(path)
    local = location.path
    try:
        if location.is_local and local.is_dir():
            if (local / "tokenizer").is_dir() and not (local / "tokenizer_config.json").is_file():
                local = local / "tokenizer"
            return transformers.CLIPTokenizer.from_pretrained(str(local))
        if location.is_local and local.exists():
            raise InputError(f"tokenizer path {path} is a file; give the tokenizer's folder")
        if location.is_local:
            raise MissingFileError(f"tokenizer folder not found: {path}")
        return transformers.CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer", revision=revision)
    except (OSError, ValueError) as exc:
        if isinstance(exc, DaldaError):
            raise
        raise ModelLoadError(
            f"could not load a CLIP tokenizer from {str(path)!r} ({exc}); pass a tokenizer folder"
        ) from exc


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-character table of CLIP's byte-level BPE (GPT-2 style).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def write_clip_tokenizer(directory: str | os.PathLike[str]) -> Path:
    """Write the real CLIP BPE tokenizer (``vocab.json``, ``merges.txt``) built offline.

    The merges come from open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz`` (the same file
    OpenAI's CLIP uses), so token counts match the tokenizer of Stable Diffusion 1.x.
    """
    import open_clip

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    transformers = require("transformers", "generate")
    tokenizer = transformers.CLIPTokenizer(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    tokenizer.save_pretrained(directory)
    return directory
