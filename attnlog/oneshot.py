"""`attnlog snapshot`: the one-shot look at a local model that the seed blog post makes by hand.

Loads a model folder offline, adds special tokens if asked, captures the probes once and writes
everything a training-time event writes, flattened for a person browsing a folder:

    <out>/<probe>/{head_view,model_view,neuron_view}.html   bertviz views (offline)
    <out>/<probe>/model.png, layer_<l>.png                 heatmaps
    <out>/patterns/<pattern>.png                           layer x head score matrices
    <out>/scores.json                                      scores and head labels
    <out>/plugins/attnlog/step_00000000.npz                the archive `attnlog report` reads
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attnlog.report import format_heads, strongest_heads


def load_model(model_dir: str | os.PathLike, special_tokens: Sequence[str] = ()) -> tuple[Any, Any]:
    """(model, tokenizer) from a local folder, never the network; special tokens added and the
    embeddings resized when the vocabulary grew.

    Raises:
        FileNotFoundError: the folder or its config.json is missing.
    """
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a model folder (no config.json); pass a folder saved with "
            "save_pretrained() or downloaded from the Hub"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # unused-head notices would bury the table
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    if special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    model.eval()
    return model, tokenizer


def write_snapshot(
    model_dir: str | os.PathLike,
    probes: Sequence[Any],
    out: str | os.PathLike,
    *,
    special_tokens: Sequence[str] = (),
    max_length: int | None = None,
    top: int = 12,
) -> str:
    """Capture `probes` once with the model in `model_dir` and write views, heatmaps and scores
    under `out`. Returns a printable summary: the strongest heads and where the files went.
    """
    from attnlog.capture import capture
    from attnlog.patterns import score
    from attnlog.render.event import render_images, render_views
    from attnlog.sinks.archive import ArchiveSink

    model, tokenizer = load_model(model_dir, special_tokens)
    out = Path(out)
    snapshot = capture(model, tokenizer, list(probes), step=0, max_length=max_length)
    table = score(snapshot)
    host = snapshot.to_host()
    written = []
    for relpath, html in render_views(host).items():
        written.append(_write(out / _flat(relpath), html))
    for tag, image in render_images(host, table).items():
        written.append(_png(out / (_flat(tag) + ".png"), image))
    written.append(_write(out / "scores.json", json.dumps(table.to_json(), ensure_ascii=False)))
    ArchiveSink(out).log_archive(host, table, 0)

    layers, heads = next(iter(table.scores.values())).shape
    lines = [
        f"{Path(model_dir).name}: {layers} layers x {heads} heads, {len(host.probes)} probe(s)",
    ]
    for probe in host.probes:
        marked = [f"<{t}>" if s else t for t, s in zip(probe.tokens, probe.special)]
        lines.append(f"  {probe.name}: {' '.join(marked)}")
    lines += ["strongest heads:", format_heads(strongest_heads(table.scores, table.labels)[:top])]
    lines.append(f"wrote {len(written)} files to {out} (views, heatmaps, scores.json)")
    lines.append(f"summary later: attnlog report {out}")
    return "\n".join(lines)


def _flat(relpath: str) -> str:
    """`attention/step_00000000/<probe>/head_view.html` -> `<probe>/head_view.html`;
    `attention/<probe>/model` -> `<probe>/model`: one step, so no step folders."""
    parts = relpath.split("/")
    if parts[0] == "attention":
        parts = parts[1:]
    if parts and parts[0].startswith("step_"):
        parts = parts[1:]
    return "/".join(parts)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _png(path: Path, image: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path)
    return path
