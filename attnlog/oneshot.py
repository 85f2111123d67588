"""`attnlog snapshot`: the one-shot look at a local model that the seed blog post makes by hand.

Loads a model folder (local files only, never the network), adds special tokens if asked, captures
the probes once and writes one event through the same sinks a training event uses: a
`FolderSink` (views, heatmaps, score matrices, scores.json, laid out for a person browsing a
folder; see attnlog/sinks/folder.py) and the archive that `attnlog report` reads
(`<out>/plugins/attnlog/`). Layer images are on: one event, and a folder has no Attention tab.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from attnlog.report import format_heads, strongest_heads

__all__ = ["load_model", "quiet_transformers", "write_snapshot"]


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
    from transformers import AutoModel, AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True)
    if special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    model.eval()
    return model, tokenizer


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Unused-head notices and the loading bar would bury the table; restored afterwards, so a
    program that calls `write_snapshot` keeps its own logging settings."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


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
    from attnlog.capturing import Capturer
    from attnlog.render.event import render_images, render_views
    from attnlog.sinks.archive import ArchiveSink
    from attnlog.sinks.folder import FolderSink

    out = Path(out)
    folder, archive = FolderSink(out), ArchiveSink(out)  # fail on an unwritable `out` first
    model, tokenizer = load_model(model_dir, special_tokens)
    capturer = Capturer(
        model, tokenizer, list(probes), max_length=max_length, induction_probe=False
    )
    host, table = capturer.measure(0)  # scored in the pass: long probes are pooled, not n x n
    images, views = render_images(host, table), render_views(host)
    for sink in (folder, archive):  # the calls the logger makes for one event
        sink.log_scores(table, 0)
        sink.log_images(images, 0)
        sink.log_html(views, 0)
        sink.log_archive(host, table, 0)
        sink.close()
    return _summary(Path(model_dir).name, host, table, top, out, len(folder.written))


def _summary(model: str, host: Any, table: Any, top: int, out: Path, files: int) -> str:
    layers, heads = next(iter(table.scores.values())).shape
    lines = [f"{model}: {layers} layers x {heads} heads, {len(host.probes)} probe(s)"]
    for probe in host.probes:
        marked = [f"<{t}>" if s else t for t, s in zip(probe.tokens, probe.special)]
        lines.append(f"  {probe.name}: {' '.join(marked)}")
    lines += ["strongest heads:", format_heads(strongest_heads(table.scores, table.labels)[:top])]
    lines.append(f"wrote {files} files to {out} (views, heatmaps, scores.json)")
    lines.append(f"summary later: attnlog report {out}")
    return "\n".join(lines)
