"""One planned image (:class:`Variant`), the seed rule (:func:`derive_seed`) and the sequence view
that makes variants from a plan's columns on access."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from ..errors import InputError
from .columns import PlanColumns

__all__ = ["Variant", "SourceView", "derive_seed", "seed_prefix", "seed_from_prefix"]


def seed_prefix(seed: int, source_sha256: str) -> Any:
    """The hash state every seed of one (plan seed, source) pair starts from (see :func:`derive_seed`)."""
    return hashlib.sha256(f"{int(seed)}:{source_sha256}:".encode())


def seed_from_prefix(prefix: Any, variant: int, purpose: str = "generation") -> int:
    """The seed rule: a 63-bit seed from a :func:`seed_prefix` state, the variant index and the purpose."""
    h = prefix.copy()
    h.update(f"{int(variant)}:{purpose}".encode())
    return int.from_bytes(h.digest()[:8], "big") >> 1


def derive_seed(seed: int, source_sha256: str, variant: int, purpose: str = "generation") -> int:
    """A 63-bit seed from (plan seed, source content hash, variant index, purpose)."""
    return seed_from_prefix(seed_prefix(seed, source_sha256), variant, purpose)


@dataclass(frozen=True)
class Variant:
    """One planned synthetic image (``lam`` is λ, stored as ``"lambda"`` in JSON)."""

    source: str | int
    label: int
    class_name: str
    score: float
    variant: int
    prompt: str
    lam: float
    seed: int
    source_sha256: str
    # img2img strength of a DA-Fusion variant (then equal to ``lam``, which carries it into the
    # request and the cache key); None for the other methods.
    strength: float | None = None

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "source": self.source,
            "label": self.label,
            "class_name": self.class_name,
            "score": self.score,
            "variant": self.variant,
            "prompt": self.prompt,
            "lambda": self.lam,
            "seed": self.seed,
            "source_sha256": self.source_sha256,
        }
        if self.strength is not None:
            row["strength"] = self.strength
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any], where: str = "plan") -> "Variant":
        if not isinstance(row, dict):
            raise InputError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        for name, kinds in (("source", (str, int)), ("class_name", str), ("prompt", str), ("source_sha256", str)):
            if name in row and (not isinstance(row[name], kinds) or isinstance(row[name], bool)):
                raise InputError(f"{where}: field {name!r} must be a {'string or integer' if name == 'source' else 'string'}, "
                                 f"got {type(row[name]).__name__}")
        for name in ("label", "score", "variant", "lambda", "seed", "strength"):
            if isinstance(row.get(name), (dict, list)):
                raise InputError(f"{where}: field {name!r} must be a number, got {type(row[name]).__name__}")
        try:
            return cls(
                source=row["source"],
                label=int(row["label"]),
                class_name=str(row["class_name"]),
                score=float(row["score"]),
                variant=int(row["variant"]),
                prompt=str(row["prompt"]),
                lam=float(row["lambda"]),
                seed=int(row["seed"]),
                source_sha256=str(row["source_sha256"]),
                strength=float(row["strength"]) if row.get("strength") is not None else None,
            )
        except KeyError as exc:
            raise InputError(f"{where}: row is missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise InputError(f"{where}: bad value in row: {exc}") from None


class _Variants(Sequence[Variant]):
    """The plan's variants, made from its columns on access (no object kept per variant)."""

    def __init__(self, columns: PlanColumns) -> None:
        self._columns = columns

    def __len__(self) -> int:
        return len(self._columns)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"variant {index} is out of range for a plan of {len(self)} variants")
        return Variant(*self._columns.fields(i))

    def __iter__(self) -> Iterator[Variant]:
        return (Variant(*self._columns.fields(i)) for i in range(len(self)))


class SourceView:
    """A plan read per source (sources numbered in plan order), what a dataset needs of it:
    :meth:`n_variants`, :meth:`source_hash` and :meth:`variant`, each read from the columns."""

    def __init__(self, columns: PlanColumns) -> None:
        self.columns = columns

    def n_variants(self, s: int) -> int:
        return self.columns.n_variants(s)

    def source_hash(self, s: int) -> str:
        return self.columns.source_hash(s)

    def variant(self, s: int, k: int) -> Variant:
        """Variant ``k`` (in variant order) of source number ``s``."""
        return Variant(*self.columns.fields(int(self.columns.rows_of(s)[k])))
