"""Probe sentences and their tokenisation with the model's own tokenizer.

A probe is a sentence or a sentence pair. It is tokenised once, when the logger starts; every
logging event then reuses the same token ids, masks and segment ids (`EncodedProbe`).
"""

from __future__ import annotations

import json
import re
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Word-piece markers that tokenizers prepend or append; stripped before a punctuation check.
_MARKERS = ("##", "Ġ", "▁", "Ċ", "</w>", "@@")


@dataclass(frozen=True)
class Probe:
    """One probe: a sentence, or a sentence pair (`pair` is sentence B)."""

    text: str
    pair: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        for label, value in (("text", self.text), ("pair", self.pair)):
            if value is None and label == "pair":
                continue
            if not isinstance(value, str):
                raise TypeError(f"probe {label} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise ValueError(
                    f"probe {label} is empty ({self.name or self.text!r}); give each probe some text"
                )


ProbeLike = Probe | str | tuple | list | dict

DEFAULT_PROBES = (
    Probe("The cat sat on the mat.", "The cat was very happy.", name="cat_pair"),
    Probe("I like strawberries and blueberries, but not raspberries.", name="berries"),
    Probe("She bought a new car yesterday.", "The car is red and fast.", name="car_pair"),
    Probe("When the rain stopped, the children ran outside to play.", name="rain"),
    Probe("The bank approved the loan.", "He sat on the bank of the river.", name="bank_pair"),
    Probe("Heads focus on words, punctuation (commas; colons) and separators!", name="punct"),
    Probe("Where is the station?", "The station is next to the old library.", name="station"),
    Probe("The quick brown fox jumps over the lazy dog.", name="fox"),
)


def _to_probe(item: ProbeLike) -> Probe:
    if isinstance(item, Probe):
        return item
    if isinstance(item, str):
        return Probe(item)
    if isinstance(item, (tuple, list)) and 1 <= len(item) <= 2:
        return Probe(*item)
    if isinstance(item, dict):
        unknown = set(item) - {"text", "pair", "name"}
        if unknown or "text" not in item:
            raise ValueError(f"a probe dict needs 'text' (and optional 'pair', 'name'); got {item}")
        return Probe(**item)
    raise TypeError(
        f"cannot make a probe from {item!r}: use a string, a (sentence_a, sentence_b) tuple, "
        "a dict with 'text'/'pair'/'name', or attnlog.Probe"
    )


def _slug(text: str, words: int = 3) -> str:
    parts = re.findall(r"\w+", text.lower())[:words]
    return "_".join(parts) or "probe"


class ProbeSet(Sequence[Probe]):
    """An ordered set of probes with unique names."""

    def __init__(self, probes: Iterable[ProbeLike]):
        if isinstance(probes, (str, Probe)):
            probes = [probes]
        items = [_to_probe(p) for p in probes]
        if not items:
            raise ValueError(
                "the probe set is empty; pass at least one sentence (or None for the defaults)"
            )
        named, seen = [], set()
        for i, p in enumerate(items):
            base = p.name or f"p{i}_{_slug(p.text)}"
            name, k = base, 1
            while name in seen:
                k += 1
                name = f"{base}_{k}"
            seen.add(name)
            named.append(Probe(p.text, p.pair, name))
        self._probes = tuple(named)

    @classmethod
    def default(cls) -> ProbeSet:
        """Eight English probes that exercise the patterns: pairs with repeated words,
        punctuation, words split into several word pieces."""
        return cls(DEFAULT_PROBES)

    @classmethod
    def from_file(cls, path: str | Path) -> ProbeSet:
        """`.txt`: one probe a line, a tab separates a pair; `.jsonl`: {"text", "pair", "name"}."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"probe file {path} does not exist")
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if path.suffix == ".jsonl":
            items: list[ProbeLike] = []
            for n, line in enumerate(lines, 1):
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as ex:
                    raise ValueError(f"{path}:{n}: not valid JSON ({ex.msg})") from ex
            return cls(items)
        return cls(tuple(ln.split("\t", 1)) if "\t" in ln else ln for ln in lines)

    @classmethod
    def coerce(cls, probes: ProbeSet | Iterable[ProbeLike] | str | Path | None) -> ProbeSet:
        """Accept what users pass: None (defaults), a ProbeSet, a file path, or probe values."""
        if probes is None:
            return cls.default()
        if isinstance(probes, ProbeSet):
            return probes
        if isinstance(probes, Path) or (
            isinstance(probes, str)
            and probes.endswith((".txt", ".jsonl"))
            and Path(probes).is_file()
        ):
            return cls.from_file(probes)
        return cls(probes)

    def __getitem__(self, index):  # type: ignore[override]
        return self._probes[index]

    def __len__(self) -> int:
        return len(self._probes)

    def __iter__(self) -> Iterator[Probe]:
        return iter(self._probes)

    def __repr__(self) -> str:
        return f"ProbeSet({[p.name for p in self._probes]})"

    def encode(
        self, tokenizer: Any, *, max_length: int | None = None, on_long: str = "truncate"
    ) -> list[EncodedProbe]:
        """Tokenise every probe once with the model's tokenizer (see `encode_probe`)."""
        return [encode_probe(p, tokenizer, max_length=max_length, on_long=on_long) for p in self]


@dataclass
class EncodedProbe:
    """A tokenised probe. All arrays are `[n]`, without padding."""

    name: str
    input_ids: np.ndarray  # int64
    tokens: list[str]
    special: np.ndarray  # bool
    punct: np.ndarray  # bool
    segment: np.ndarray  # int64, 0 = sentence A, 1 = sentence B
    word_ids: np.ndarray | None  # int64, -1 where the tokenizer gives none; None without word ids
    token_type_ids: np.ndarray | None
    is_pair: bool
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


def bare_token(token: str) -> str:
    """The token's text without word-piece markers (`##`, `Ġ`, `▁`, …) and spaces."""
    for marker in _MARKERS:
        token = token.replace(marker, "")
    return token.strip()


def is_punctuation(token: str) -> bool:
    """True when the token, without word-piece markers, is all punctuation (CJK full-width too)."""
    token = bare_token(token)
    return bool(token) and all(unicodedata.category(c).startswith("P") for c in token)


def model_max_length(tokenizer: Any, config: Any = None) -> int | None:
    """The longest input both the tokenizer and the model's position table accept."""
    limits = []
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and tok_max < 1_000_000:
        limits.append(tok_max)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None) if config is not None else None
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    return min(limits) if limits else None


def encode_probe(
    probe: Probe, tokenizer: Any, *, max_length: int | None = None, on_long: str = "truncate"
) -> EncodedProbe:
    """Tokenise one probe: token strings, special/punctuation masks, segments, word ids.

    Args:
        max_length: longest allowed input in tokens; longer probes are truncated with a
            warning (`on_long="truncate"`) or rejected (`on_long="error"`).
    """
    if on_long not in ("truncate", "error"):
        raise ValueError(f"on_long must be 'truncate' or 'error', got {on_long!r}")
    kwargs: dict[str, Any] = {"return_special_tokens_mask": True}
    full = tokenizer(probe.text, probe.pair, **kwargs)
    n_full = len(full["input_ids"])
    truncated = bool(max_length and n_full > max_length)
    if truncated:
        message = (
            f"probe {probe.name!r} has {n_full} tokens, more than the model's maximum of "
            f"{max_length}"
        )
        if on_long == "error":
            raise ValueError(message + "; shorten it or pass on_long='truncate'")
        warnings.warn(message + "; it is truncated", stacklevel=3)
        full = tokenizer(
            probe.text, probe.pair, truncation="longest_first", max_length=max_length, **kwargs
        )
    ids = np.asarray(full["input_ids"], dtype=np.int64)
    if ids.size == 0:
        raise ValueError(f"probe {probe.name!r} tokenises to nothing; give it some text")
    tokens = list(tokenizer.convert_ids_to_tokens(ids.tolist()))
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    special = np.asarray(full.get("special_tokens_mask", [0] * len(ids)), dtype=bool)
    special |= np.isin(ids, list(special_ids)) if special_ids else False
    punct = np.asarray([is_punctuation(t) for t in tokens], dtype=bool) & ~special
    token_type_ids = full.get("token_type_ids")
    token_type_ids = None if token_type_ids is None else np.asarray(token_type_ids, dtype=np.int64)
    segment = _segments(full, special, token_type_ids, probe.pair is not None)
    word_ids = None
    if getattr(full, "is_fast", False):
        words = full.word_ids()
        word_ids = np.asarray([-1 if w is None else w for w in words], dtype=np.int64)
        if probe.pair is not None:  # word ids restart at 0 in sentence B: keep them distinct
            offset = word_ids[segment == 0].max(initial=-1) + 1
            word_ids = np.where((segment == 1) & (word_ids >= 0), word_ids + offset, word_ids)
        word_ids[special] = -1
    return EncodedProbe(
        name=probe.name or _slug(probe.text),
        input_ids=ids,
        tokens=tokens,
        special=special,
        punct=punct,
        segment=segment,
        word_ids=word_ids,
        token_type_ids=token_type_ids,
        is_pair=probe.pair is not None,
        truncated=truncated,
    )


def _segments(encoding: Any, special: np.ndarray, token_type_ids, is_pair: bool) -> np.ndarray:
    """Sentence ids: the tokenizer's sequence ids where it has them; a special token belongs to
    the sentence before it ([SEP] closes sentence A)."""
    n = len(special)
    if not is_pair:
        return np.zeros(n, dtype=np.int64)
    seq = encoding.sequence_ids() if getattr(encoding, "is_fast", False) else None
    if seq is not None:
        out, current = np.zeros(n, dtype=np.int64), 0
        for i, s in enumerate(seq):
            current = s if s is not None else current
            out[i] = current
        return out
    if token_type_ids is not None and token_type_ids.any():
        return token_type_ids.copy()
    # Slow tokenizer without token types: sentence B starts after the first inner special token.
    inner = np.flatnonzero(special[1:]) + 1
    out = np.zeros(n, dtype=np.int64)
    if inner.size:
        out[inner[0] + 1 :] = 1
    return out
