"""What one logging event captured: per probe, tokens, masks and attention.

A `Snapshot` lives on the training device during the probe pass, then `to_host()` turns it into
small CPU copies that the writer scores (probes kept whole; pooled probes are scored in the
pass), renders and hands to the sinks. `save` writes the archive format other tools read back
(`attnlog.load` reads it): one `.npz` per step, plain numpy arrays plus one JSON string, so no
attnlog import is needed to read it.

A probe longer than the capture's full-attention limit (256 tokens by default) keeps its attention
pooled by blocks of tokens instead: `attention` is then `[L, H, m, m]` with `m` <= 256, `spans`
`[m, 2]` gives each block's token range `[start, end)` and `labels` its text; `tokens` stays the
full token list. Pooled rows still sum to 1 (mean over a block's query rows, sum over its keys).
Archive versions: 1 (full attention only), 2 (adds `spans` and `labels`) and 3 (`queries` and
`keys` as int8, see `_quantise_vectors`); all load, each into the same arrays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from attnlog.files import open_regular  # a FIFO in a run folder must not hang a reader

__all__ = ["FORMAT_VERSION", "ProbeAttention", "Snapshot", "load_scores", "to_numpy"]

FORMAT_VERSION = 3

# Array-valued fields of ProbeAttention, in archive order. `None` means "not captured".
_ARRAY_FIELDS = (
    "attention",  # [L, H, n, n]     self-attention (the encoder's, for encoder-decoders)
    "queries",  # [L, H, n, d]        query vectors, post-rotary, per head
    "keys",  # [L, H, n, d]           key vectors, grouped-query keys expanded per head
    "decoder_attention",  # [L, H, m, m]
    "cross_attention",  # [L, H, m, n]
    "special",  # [n] bool            [CLS]/[SEP]/BOS/EOS/added special tokens
    "punct",  # [n] bool              punctuation, full-width CJK included
    "segment",  # [n] int             sentence A = 0, sentence B = 1
    "word_ids",  # [n] int            word index from the tokenizer, -1 where unknown
    "token_ids",  # [n] int
    "spans",  # [m, 2] int           token range [start, end) of each pooled block (version 2)
)

# Stored as `p<i>/<field>_q8` int8 [L, H, n, d] + `p<i>/<field>_scale` float32 [L, H] (version 3).
_QUANTISED = ("queries", "keys")


@dataclass
class ProbeAttention:
    """One probe's capture, padding already trimmed.

    Arrays are torch tensors on the training device until `Snapshot.to_host()`, numpy after.
    `attention` is `[L, H, n, n]`, or `[L, H, m, m]` pooled over `spans` when `spans` is set.
    """

    name: str
    tokens: list[str]
    attention: Any  # [L, H, n, n]
    special: Any  # [n] bool
    punct: Any  # [n] bool
    segment: Any  # [n] int
    token_ids: Any  # [n] int
    word_ids: Any = None  # [n] int, -1 = no word id
    causal: bool = False
    is_pair: bool = False
    scaling: float | None = None  # logits = (q . k) * scaling
    queries: Any = None  # [L, H, n, d]
    keys: Any = None  # [L, H, n, d]
    decoder_tokens: list[str] | None = None
    decoder_attention: Any = None  # [L, H, m, m]
    cross_attention: Any = None  # [L, H, m, n]
    spans: Any = None  # [m, 2] int token [start, end) per pooled block; None = full attention
    labels: list[str] | None = None  # [m] text of each pooled block

    @property
    def pooled(self) -> bool:
        """Whether `attention` is pooled over token blocks (`spans`) rather than per token."""
        return self.spans is not None

    @property
    def num_layers(self) -> int:
        return int(self.attention.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.attention.shape[1])

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Snapshot:
    """All probes captured at one training step."""

    step: int
    probes: list[ProbeAttention]
    model_type: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)  # pattern -> [L, H], set by `load`

    def to_host(self, dtype: Any = np.float16) -> Snapshot:
        """Small CPU copies: float attention/q/k as `dtype`, masks as numpy.

        The small arrays on an accelerator come over packed in one copy: each copy waits for the
        device, and one per array (8 probes x 3 arrays) was a visible part of a GPU event.
        """
        packed = _packed_host_copies(self.probes)
        return replace(
            self,
            probes=[
                _probe_to_numpy(p, dtype, packed.get(i, {})) for i, p in enumerate(self.probes)
            ],
        )

    def save(self, path: str | Path, scores: dict[str, Any] | None = None) -> Path:
        """Write an `.npz` archive: arrays under `p<i>/<field>`, metadata as JSON in `meta`.

        `queries` and `keys` go in as int8 with a scale per layer and head (`_quantise_vectors`):
        `p<i>/queries_q8` and `p<i>/queries_scale`; `_load` gives them back as float16.
        `scores` is an optional {name: array} mapping stored under `scores/<name>`.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        host = self.to_host()
        arrays: dict[str, np.ndarray] = {}
        probes_meta = []
        for i, probe in enumerate(host.probes):
            for name in _ARRAY_FIELDS:
                value = getattr(probe, name)
                if value is None:
                    continue
                packed = _quantise_vectors(value) if name in _QUANTISED else None
                if packed is None:
                    arrays[f"p{i}/{name}"] = value
                else:
                    arrays[f"p{i}/{name}_q8"], arrays[f"p{i}/{name}_scale"] = packed
            probes_meta.append(
                {
                    "name": probe.name,
                    "tokens": probe.tokens,
                    "decoder_tokens": probe.decoder_tokens,
                    "causal": probe.causal,
                    "is_pair": probe.is_pair,
                    "scaling": probe.scaling,
                    "labels": probe.labels,
                }
            )
        for name, value in (scores or {}).items():
            arrays[f"scores/{name}"] = np.asarray(value, dtype=np.float32)
        meta = {
            "format": "attnlog.snapshot",
            "version": FORMAT_VERSION,
            "step": self.step,
            "model_type": self.model_type,
            "meta": self.meta,
            "probes": probes_meta,
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            # Stored, not deflated: int8 and float16 bytes look random to deflate, which took 8 %
            # off (949 -> 866 KiB on a MiniLM event) for 20 ms of CPU an event, in the training
            # process with the thread writer.
            np.savez(fh, **arrays)
        tmp.replace(path)  # readers never see a half-written file
        return path


def _load(path: str | Path) -> Snapshot:
    """Read one archive file written by `Snapshot.save` (its scores in `.scores`).

    Private: `attnlog.load` (`attnlog.report.load`) is the one public reader, of a file or a run.
    """
    with open_regular(path) as fh, np.load(fh, allow_pickle=False) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        if meta.get("format") != "attnlog.snapshot":
            raise ValueError(f"{path} is not an attnlog snapshot archive")
        if meta["version"] > FORMAT_VERSION:
            raise ValueError(
                f"{path} has archive version {meta['version']}; this attnlog reads up to "
                f"{FORMAT_VERSION}. Upgrade attnlog with `pip install -U attnlog`."
            )
        probes = []
        for i, pm in enumerate(meta["probes"]):
            arrays = {n: data[f"p{i}/{n}"] for n in _ARRAY_FIELDS if f"p{i}/{n}" in data}
            for n in _QUANTISED:  # version 3; older files (and non-finite q/k) have `p<i>/<n>`
                if f"p{i}/{n}_q8" in data:
                    q8, scale = data[f"p{i}/{n}_q8"], data[f"p{i}/{n}_scale"]
                    arrays[n] = _dequantise_vectors(q8, scale, f"{path}: p{i}/{n}")
            probes.append(ProbeAttention(**pm, **arrays))
        scores = _scores(data, path)
    return Snapshot(
        step=meta["step"],
        probes=probes,
        model_type=meta["model_type"],
        meta=meta["meta"],
        scores=scores,
    )


def load_scores(path: str | Path) -> dict[str, np.ndarray]:
    """Only the `[L, H]` pattern scores of an archive: attention is never read (cheap for
    readers that go over many steps, such as the Attention tab's trend)."""
    with open_regular(path) as fh, np.load(fh, allow_pickle=False) as data:
        return _scores(data, path)


def _scores(data: Any, path: str | Path) -> dict[str, np.ndarray]:
    scores = {k[len("scores/") :]: data[k] for k in data.files if k.startswith("scores/")}
    odd = {name: m.shape for name, m in scores.items() if m.ndim != 2}
    if odd:  # crafted or damaged: every reader indexes scores as [layer, head]
        raise ValueError(f"{path} is damaged: scores must be [layers, heads] matrices; got {odd}")
    return scores


def _quantise_vectors(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """What `save` stores for query/key vectors: `quantise_vectors`, or None to keep them.

    Returns None for arrays this does not cover: not 4-D floats, or holding NaN/inf. Those are
    stored as they are (float16), so a diverging model's non-finite vectors are kept as such
    rather than written as 0.
    """
    values = np.asarray(vectors)
    if values.ndim != 4 or values.dtype.kind != "f":
        return None
    values = values.astype(np.float32)
    if not np.isfinite(values).all():
        return None
    return quantise_vectors(values)


def quantise_vectors(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Finite query/key vectors `[L, H, n, d]` as int8 with one float32 scale per layer and head.

    Symmetric: `scale = max|x| / 127` over `[n, d]` of each head (0 for an all-zero head), so the
    value read back, `q8 * scale`, is within `scale / 2` of `x`: 1/254 of the head's largest
    value. The archive stores them so, and the event page's neuron view draws them so
    (`attnlog.render.page`).

    Returns:
        (`[L, H, n, d]` int8, `[L, H]` float32).
    """
    values = np.asarray(values, dtype=np.float32)
    scale = np.abs(values).max(axis=(2, 3), initial=0.0) / np.float32(127)  # [L, H]
    safe = np.where(scale > 0, scale, np.float32(1))[:, :, None, None]
    q8 = np.clip(np.rint(values / safe), -127, 127).astype(np.int8)
    return q8, scale.astype(np.float32)


def _dequantise_vectors(q8: np.ndarray, scale: np.ndarray, what: str) -> np.ndarray:
    """`[L, H, n, d]` float16 from `_quantise_vectors`' int8 values and `[L, H]` scales."""
    if q8.ndim != 4 or q8.dtype != np.int8 or scale.shape != q8.shape[:2]:
        # crafted or damaged: readers index q/k as [layer, head, token, dim]
        raise ValueError(
            f"{what} is damaged: expected [L, H, n, d] int8 values and [L, H] scales; got "
            f"{q8.dtype} {q8.shape} and {scale.shape}"
        )
    return (q8 * scale.astype(np.float32)[:, :, None, None]).astype(np.float16)


def to_numpy(value: Any, float_dtype: Any = None) -> np.ndarray:
    """A torch tensor (any device; bfloat16, which numpy lacks, included) or an array-like as a
    numpy array; floating values as `float_dtype` when given. Readers and renderers take either."""
    if hasattr(value, "detach"):  # torch tensor; checked by attribute so torch is not imported
        value = value.detach()
        if value.is_floating_point():
            value = value.float()
        value = value.cpu().numpy()
    array = np.asarray(value)
    if float_dtype is not None and array.dtype.kind == "f":
        array = array.astype(float_dtype, copy=False)
    return array


def _probe_to_numpy(probe: ProbeAttention, dtype: Any, copied: dict[str, Any]) -> ProbeAttention:
    changes = {
        f.name: to_numpy(copied.get(f.name, getattr(probe, f.name)), dtype)
        for f in fields(probe)
        if f.name in _ARRAY_FIELDS and getattr(probe, f.name) is not None
    }
    return replace(probe, **changes)


#: Arrays up to this many elements travel packed (`_packed_host_copies`); larger ones alone,
#: where the copy's bandwidth, not its wait, is the cost, and a packed duplicate would be large.
PACKED_ELEMENTS = 2**20


def _packed_host_copies(probes: list[ProbeAttention]) -> dict[int, dict[str, np.ndarray]]:
    """{probe index: {field: float32 numpy}} for the small floating tensors on an accelerator,
    brought over in one copy per device. CPU tensors are left out: `.numpy()` shares their
    memory, where packing would copy them twice."""
    by_device: dict[Any, list[tuple[int, str, Any]]] = {}
    for i, probe in enumerate(probes):
        for name in _ARRAY_FIELDS:
            value = getattr(probe, name)
            if (
                hasattr(value, "detach")
                and value.device.type != "cpu"
                and value.is_floating_point()
                and value.numel() <= PACKED_ELEMENTS
            ):
                by_device.setdefault(value.device, []).append((i, name, value))
    out: dict[int, dict[str, np.ndarray]] = {}
    for items in by_device.values():
        for (i, name, _), array in zip(items, _host_copies([v for _, _, v in items])):
            out.setdefault(i, {})[name] = array
    return out


def _host_copies(tensors: list[Any]) -> list[np.ndarray]:
    """float32 numpy copies of `tensors` (one device, any shapes and strides) through one
    device->host copy of them all, packed."""
    import torch

    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors]).cpu().numpy()
    ends = np.cumsum([t.numel() for t in tensors]).tolist()
    return [flat[end - t.numel() : end].reshape(t.shape) for t, end in zip(tensors, ends)]
