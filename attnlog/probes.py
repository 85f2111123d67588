"""Probe sentences and their tokenisation with the model's own tokenizer.

A probe is a sentence, a sentence pair, or a fixed list of token ids (`Probe(ids=...)`, used as
given: ids are never decoded to text and re-encoded, which would not give them back for random
tokens). It is tokenised once, when the logger starts; every logging event then reuses the same
token ids, masks and segment ids (`EncodedProbe`). `induction_probe` builds the repeated
random-token probe that the `induction` score needs.
"""

from __future__ import annotations

import json
import re
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_PROBES",
    "EncodedProbe",
    "Probe",
    "ProbeSet",
    "bare_token",
    "encode_probe",
    "builtin_induction_probe",
    "induction_probe",
    "is_punctuation",
    "model_max_length",
]

# Word-piece markers that tokenizers prepend or append; stripped before a punctuation check.
_MARKERS = ("##", "Ġ", "▁", "Ċ", "</w>", "@@")


# Probe names end up in file names, TensorBoard tags and MLflow keys (`layout.safe_name`).
MAX_NAME_LENGTH = 100
MAX_NAME_BYTES = 240  # UTF-8, a folder name: file systems allow 255 bytes


@dataclass(frozen=True)
class Probe:
    """One probe: a sentence, a sentence pair (`pair` is sentence B), or token ids.

    `ids` are fed to the model exactly as given (no special tokens added); `text` is then only a
    description (default: "<n token ids>").
    """

    text: str | None = None
    pair: str | None = None
    name: str | None = None
    ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.name is not None:
            _check_name(self.name)
        if self.ids is not None:
            object.__setattr__(self, "ids", _check_ids(self.ids, self.name))
            if self.pair is not None:
                raise ValueError(f"probe {self.name!r}: a token-id probe cannot have a pair")
            if self.text is None:
                object.__setattr__(self, "text", f"<{len(self.ids)} token ids>")
        for label, value in (("text", self.text), ("pair", self.pair)):
            if value is None and label == "pair":
                continue
            if not isinstance(value, str):
                raise TypeError(f"probe {label} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise ValueError(
                    f"probe {label} is empty ({self.name or self.text!r}); give each probe some text"
                )


def _check_name(name: Any) -> None:
    if not isinstance(name, str):
        raise TypeError(f"probe name must be a string, got {type(name).__name__} {name!r}")
    if not re.search(r"[^\W_]", name):
        raise ValueError(
            f"probe name {name!r} has no letter or digit; name probes with words "
            "(they become file and tag names)"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(
            f"probe name {name[:20]!r}... is {len(name)} characters; use at most "
            f"{MAX_NAME_LENGTH} (it becomes file and tag names)"
        )
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise ValueError(
            f"probe name {name[:20]!r}... is {size} bytes in UTF-8; use at most {MAX_NAME_BYTES} "
            f"(it becomes a folder name), e.g. {MAX_NAME_BYTES // 3} Chinese characters"
        )


def _check_ids(ids: Any, name: str | None) -> tuple[int, ...]:
    values = np.asarray(ids)
    if values.ndim != 1 or values.size == 0 or values.dtype.kind not in "iu":
        raise ValueError(
            f"probe {name!r}: ids must be a non-empty sequence of integer token ids, got {ids!r}"
        )
    if (values < 0).any():
        raise ValueError(f"probe {name!r}: token ids must be >= 0")
    return tuple(int(v) for v in values)


def _sink_key(name: str) -> str:
    """What the sinks make of a probe name (layout.safe_name), ignoring case as some file
    systems do: two probes must never share it."""
    return safe_probe_name(name).casefold()


def safe_probe_name(name: str) -> str:
    """`name` as it appears in file names and tags (`layout.safe_name`): letters and digits of
    any script stay, unsafe characters become `_`."""
    from attnlog.layout import safe_name

    return safe_name(name)


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
        unknown = set(item) - {"text", "pair", "name", "ids"}
        if unknown or ("text" not in item and "ids" not in item):
            raise ValueError(
                f"a probe dict needs 'text' or 'ids' (and optional 'pair', 'name'); got {item}"
            )
        return Probe(**item)
    raise TypeError(
        f"cannot make a probe from {item!r}: use a string, a (sentence_a, sentence_b) tuple, "
        "a dict with 'text'/'pair'/'name', or attnlog.Probe"
    )


def _slug(text: str, words: int = 3, chars: int = 24) -> str:
    parts = re.findall(r"\w+", text.lower())[:words]
    return "_".join(parts)[:chars].rstrip("_") or "probe"


class ProbeSet(Sequence[Probe]):
    """An ordered set of probes with unique, path-safe names.

    Given names are made safe for file names, tags and keys (`safe_probe_name`: "x y" becomes
    "x_y"); two given names that the sinks would then write alike (`layout.safe_name`, ignoring
    case as some file systems do) are an error. Probes without a name get
    `p<i>_<first words>`, made unique.
    """

    def __init__(self, probes: Iterable[ProbeLike]):
        if isinstance(probes, (str, Probe)):
            probes = [probes]
        items = [_to_probe(p) for p in probes]
        if not items:
            raise ValueError(
                "the probe set is empty; pass at least one sentence (or None for the defaults)"
            )
        given: dict[str, str] = {}  # the name as sinks write it -> the name the user gave
        for p in items:
            if p.name is None:
                continue
            key = _sink_key(safe_probe_name(p.name))
            if key in given:
                raise ValueError(
                    f"probe names {given[key]!r} and {p.name!r} are the same once made safe for "
                    f"file names, tags and keys ({key!r}); rename one"
                )
            given[key] = p.name
        named, seen = [], set(given)
        for i, p in enumerate(items):
            if p.name is not None:
                named.append(replace(p, name=safe_probe_name(p.name)))
                continue
            base = safe_probe_name(f"p{i}_{_slug(p.text)}" if p.ids is None else f"p{i}_ids")
            name, k = base, 1
            while _sink_key(name) in seen:
                k += 1
                name = f"{base}_{k}"
            seen.add(_sink_key(name))
            named.append(replace(p, name=name))
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
        if not lines:
            raise ValueError(f"probe file {path} holds no probe; write one probe a line")
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
            isinstance(probes, str) and probes.strip().endswith((".txt", ".jsonl"))
        ):
            path = Path(probes.strip() if isinstance(probes, str) else probes)
            if not path.is_file():
                raise FileNotFoundError(
                    f"probe file {str(path)!r} does not exist (a string ending in .txt or .jsonl "
                    "is read as a probe file); fix the path, or pass a sentence as [text]"
                )
            return cls.from_file(path)
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
    if probe.ids is not None:
        return _encode_ids(probe, tokenizer, max_length=max_length, on_long=on_long)
    kwargs: dict[str, Any] = {"return_special_tokens_mask": True}
    full = tokenizer(probe.text, probe.pair, **kwargs)
    truncated = _too_long(probe, len(full["input_ids"]), max_length, on_long)
    if truncated:
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
    return EncodedProbe(
        name=probe.name or _slug(probe.text),
        input_ids=ids,
        tokens=tokens,
        special=special,
        punct=punct,
        segment=segment,
        word_ids=_word_ids(full, segment, special),
        token_type_ids=token_type_ids,
        is_pair=probe.pair is not None,
        truncated=truncated,
    )


def _word_ids(encoding: Any, segment: np.ndarray, special: np.ndarray) -> np.ndarray | None:
    """Word of each token (-1 for special tokens); None from a slow tokenizer."""
    if not getattr(encoding, "is_fast", False):
        return None
    words = encoding.word_ids()
    word_ids = np.asarray([-1 if w is None else w for w in words], dtype=np.int64)
    if segment.any():  # word ids restart at 0 in sentence B: keep them distinct
        offset = word_ids[segment == 0].max(initial=-1) + 1
        word_ids = np.where((segment == 1) & (word_ids >= 0), word_ids + offset, word_ids)
    word_ids[special] = -1
    return word_ids


def _too_long(probe: Probe, n: int, max_length: int | None, on_long: str) -> bool:
    """Whether an `n`-token probe must be truncated (warned), or raise with on_long="error"."""
    if not (max_length and n > max_length):
        return False
    message = f"probe {probe.name!r} has {n} tokens, more than the model's maximum of {max_length}"
    if on_long == "error":
        raise ValueError(message + "; shorten it or pass on_long='truncate'")
    warnings.warn(message + "; it is truncated", stacklevel=4)
    return True


def _encode_ids(
    probe: Probe, tokenizer: Any, *, max_length: int | None, on_long: str
) -> EncodedProbe:
    """A token-id probe, as given: one sentence, no word ids (there is no text to align)."""
    ids = np.asarray(probe.ids, dtype=np.int64)
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    if size is not None and int(ids.max()) >= size:
        raise ValueError(
            f"probe {probe.name!r} has token id {int(ids.max())} but the tokenizer has only "
            f"{size} tokens; build it with this model's tokenizer"
        )
    truncated = _too_long(probe, len(ids), max_length, on_long)
    if truncated:
        ids = ids[:max_length]
    tokens = list(tokenizer.convert_ids_to_tokens(ids.tolist()))
    special = np.isin(ids, sorted(getattr(tokenizer, "all_special_ids", []) or []))
    punct = np.asarray([is_punctuation(t) for t in tokens], dtype=bool) & ~special
    return EncodedProbe(
        name=probe.name or "ids",
        input_ids=ids,
        tokens=tokens,
        special=special,
        punct=punct,
        segment=np.zeros(len(ids), dtype=np.int64),
        word_ids=None,
        token_type_ids=None,
        is_pair=False,
        truncated=truncated,
    )


#: Tokens in one copy of the built-in induction probe.
INDUCTION_LENGTH = 20
#: Fewer ordinary tokens than this: no built-in induction probe (2 or 3 say little).
MIN_INDUCTION_LENGTH = 4


def induction_probe(
    tokenizer: Any, length: int = INDUCTION_LENGTH, seed: int = 0, name: str = "induction"
) -> Probe:
    """[BOS] + `length` random ordinary token ids, repeated twice: the `induction` score's probe.

    The ids are drawn without replacement (so only the second copy repeats tokens) by numpy's
    `Generator` with a fixed seed from the tokenizer's sorted ordinary vocabulary (no special,
    added or bracketed tokens such as `[unused7]`): the same tokenizer gives the same probe in
    every run, at every step.

    Args:
        tokenizer: the model's tokenizer (needs `get_vocab`).
        length: T, the tokens in one copy; the probe has 2T (+1 with a BOS) tokens.
        seed: the generator's seed.
        name: the probe's name.
    """
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an integer >= 2, got {length!r}")
    ordinary = ordinary_token_ids(tokenizer)
    if ordinary.size < length:
        raise ValueError(
            f"the tokenizer has {ordinary.size} ordinary tokens, fewer than length={length}"
        )
    chosen = np.random.default_rng(seed).choice(ordinary, size=length, replace=False)
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = ([bos] if bos is not None else []) + chosen.tolist() * 2
    return Probe(text=f"{length} random tokens, repeated (seed {seed})", name=name, ids=ids)


def ordinary_token_ids(tokenizer: Any) -> np.ndarray:
    """Sorted ids of the vocabulary's ordinary tokens: not special, not added, not bracketed
    (`[unused7]`, `<extra_id_0>` are special in all but name)."""
    vocab = tokenizer.get_vocab()
    added = getattr(tokenizer, "get_added_vocab", dict)()
    skip = set(getattr(tokenizer, "all_special_ids", []) or []) | set(added.values())
    skip |= {i for t, i in vocab.items() if re.fullmatch(r"\[.+\]|<.+>", t)}
    return np.asarray(sorted(set(vocab.values()) - skip), dtype=np.int64)


def builtin_induction_probe(tokenizer: Any) -> Probe | None:
    """The induction probe a causal model gets unasked, so it never fails construction: a small
    vocabulary (characters, DNA, amino acids) gets a shorter one, a tiny one none, with a warning."""
    available = int(ordinary_token_ids(tokenizer).size)
    if available >= INDUCTION_LENGTH:
        return induction_probe(tokenizer)
    short = available >= MIN_INDUCTION_LENGTH
    outcome = (
        f"repeats {available} random tokens instead of {INDUCTION_LENGTH}"
        if short
        else "is left out, so the induction score is undefined (pass a probe that repeats a "
        "sequence of tokens to score induction heads)"
    )
    warnings.warn(
        f"the tokenizer has {available} ordinary tokens: the built-in induction probe {outcome}",
        stacklevel=3,
    )
    return induction_probe(tokenizer, length=available) if short else None


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
