"""Run summaries (attnlog.summary) and MLflow's image cards, read back from real stores."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_sinks_contract import make_images, make_snapshot

from attnlog.patterns import score
from attnlog.render.draw import colorize
from attnlog.render.mlflow_cards import CARD_PX, covered, pattern_card, probe_card
from attnlog.summary import CHANGE_THRESHOLD, SummaryTracker, summarize

CLS_HEAD = (1, 2)  # the head that learns to attend to [CLS] between the two events


def trained(step: int):
    """The contract snapshot with layer 1, head 2 sending 90 % of every row to [CLS]."""
    snapshot = make_snapshot(0)
    probes = []
    for probe in snapshot.probes:
        attention = probe.attention.copy()
        n = attention.shape[-1]
        attention[CLS_HEAD] = 0.1 / (n - 1)
        attention[CLS_HEAD][:, 0] = 0.9
        probes.append(dataclasses.replace(probe, attention=attention))
    return dataclasses.replace(snapshot, step=step, probes=probes)


@pytest.fixture(scope="module")
def tables():
    return score(make_snapshot(0), step=0), score(trained(100), step=100)


def test_the_head_that_moved_is_named_and_counted(tables):
    first, later = tables
    summary = summarize(first, later)
    cls_move = abs(later.scores["cls"][CLS_HEAD] - first.scores["cls"][CLS_HEAD])
    assert cls_move > 0.5
    assert summary.max_change >= cls_move - 1e-6
    assert summary.most_changed.head == "L1H2"
    assert summary.changed_heads == 1  # every other head kept its attention
    assert summary.top_head["cls"] == "L1H2"
    assert summary.top_score["cls"] == pytest.approx(float(later.scores["cls"][CLS_HEAD]))
    entropy = float(np.nanmean(later.scores["entropy_nats"]))
    assert summary.metrics()["mean_entropy"] == pytest.approx(entropy)
    assert summary.metrics()["top.cls"] == summary.top_score["cls"]


def test_nothing_changed_at_the_first_event_and_unbounded_scores_never_count(tables):
    first, later = tables
    tracker = SummaryTracker()
    at_start = tracker.update(first)
    assert (at_start.changed_heads, at_start.max_change, at_start.most_changed) == (0, 0.0, None)
    assert tracker.update(later).most_changed.head == "L1H2"  # against the first table kept
    # A head whose logits grew a lot changed no score in [0, 1]: not a change.
    logits = dataclasses.replace(first, scores={**first.scores})
    logits.scores["max_logit"] = first.scores["max_logit"] + 10 * CHANGE_THRESHOLD + 5
    logits.scores["entropy_nats"] = first.scores["entropy_nats"] + 1
    assert summarize(first, logits).changed_heads == 0


def test_pattern_card_is_square_and_outlines_the_top_head(tables):
    _, later = tables
    card = pattern_card(later.scores["cls"], 100)
    assert card.shape == (CARD_PX, CARD_PX, 3) and card.dtype == np.uint8
    red = (card[..., 0] > 200) & (card[..., 1] < 60) & (card[..., 2] < 60)
    ys, xs = np.nonzero(red)
    # the outline sits in the lower layer's row (2 layers) and the last head's column (3 heads)
    assert ys.min() > CARD_PX * 0.4 and xs.min() > CARD_PX * 0.6
    other = pattern_card(later.scores["prev_token"], 100)
    assert not np.array_equal(card, other)


def test_probe_card_fills_the_square_with_every_head():
    probe = trained(100).probes[0]
    card = probe_card(probe.attention, probe.tokens, 100, probe.special)
    assert card.shape == (CARD_PX, CARD_PX, 3)
    coloured = (np.ptp(card.astype(int), axis=2) > 30).mean()  # viridis, not white or grey
    assert coloured > 0.5


@pytest.mark.parametrize("value", [0.0, 0.37, 1.0])
def test_probe_card_tiles_show_viridis_at_the_attention_value(value):
    card = probe_card(np.full((2, 3, 4, 4), value, np.float32), list("abcd"), 5)
    tiles = card[CARD_PX // 2 :, CARD_PX // 2 :].reshape(-1, 3).astype(int)
    tiles = tiles[np.ptp(tiles, axis=1) > 30]  # not the white gaps
    expected = colorize(np.float32(value)).astype(int)
    assert len(tiles) and np.abs(tiles - expected).max() <= 4  # 239 levels of viridis' 256


def test_cards_cover_the_overview_images_only():
    assert covered("attention/cat/model") and covered("patterns/cls")
    assert not covered("attention/cat/layer_0") and not covered("patterns/cls/max")
    assert not covered("attention/cat_words/model")


# ---- read back from real stores -----------------------------------------------------------


def image_files(client, run_id: str) -> dict[str, dict[int, list[str]]]:
    """{key: {step: [files]}} of `log_image(key=, step=)` artifacts (`/` in keys as `~`)."""
    out: dict[str, dict[int, list[str]]] = {}
    for info in client.list_artifacts(run_id, "images"):
        match = re.match(r"images/(.+?)\+step\+(\d+)\+", info.path)
        if match:
            key = match.group(1).replace("~", "/")
            out.setdefault(key, {}).setdefault(int(match.group(2)), []).append(info.path)
    return out


@pytest.mark.parametrize("pattern_cards", [False, True])
def test_mlflow_holds_the_summary_and_one_square_card_per_overview(tables, tmp_path, pattern_cards):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from attnlog.sinks.mlflow import MLflowSink

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.create_experiment("exp", artifact_location=str(tmp_path / "art"))
    sink = MLflowSink(
        uri, experiment_name="exp", spool_dir=tmp_path / "spool", cards=True,
        pattern_cards=pattern_cards,
    )  # fmt: skip
    snapshots = {0: make_snapshot(0), 100: trained(100)}
    for (step, snapshot), table in zip(snapshots.items(), tables):
        sink.log_scores(table, step)
        sink.log_images(make_images(step), step)  # TensorBoard's renders, as the writer sends
        sink.log_event(snapshot, table, step)
    sink.close()

    run = client.get_run(sink.run_id)
    history = client.get_metric_history(run.info.run_id, "attn.summary.changed_heads")
    assert [(m.step, m.value) for m in history] == [(0, 0.0), (100, 1.0)]
    [_, last] = client.get_metric_history(run.info.run_id, "attn.summary.max_change")
    assert last.value == pytest.approx(summarize(*tables).max_change)
    assert "attn.summary.mean_entropy" in run.data.metrics
    assert run.data.metrics["attn.summary.top.cls"] == pytest.approx(
        float(tables[1].scores["cls"][CLS_HEAD])
    )
    assert " L1H2 " in run.data.tags["attnlog.summary.most_changed"]
    assert "cls L1H2" in run.data.tags["attnlog.summary.top_heads"]

    images = image_files(client, run.info.run_id)
    patterns = {f"patterns/{p}" for p, m in tables[0].scores.items() if np.isfinite(m).any()}
    overviews = {"attention/cat/model", "attention/pair/model"} | (
        patterns if pattern_cards else set()
    )
    # Layer images as given; TensorBoard's pattern matrices become cards, or stay out of MLflow.
    assert overviews | {"attention/cat/layer_0"} == set(images)
    for key in overviews:  # one card per step, TensorBoard's render of it left out
        assert {step: len(files) for step, files in images[key].items()} == {0: 2, 100: 2}
    files = images["patterns/cls" if pattern_cards else "attention/cat/model"][100]
    [full] = [f for f in files if f.endswith(".png")]  # the click preview shows this one
    [thumb] = [f for f in files if f.endswith("+compressed.webp")]  # the card shows this one
    local = client.download_artifacts(run.info.run_id, full, str(tmp_path / "dl"))
    with Image.open(local) as png:
        assert png.size == (CARD_PX, CARD_PX) and png.mode == "P"  # a palette PNG: 1/3 the bytes
        if not pattern_cards:  # a probe card is drawn in palette indices: stored as drawn
            [cat] = [p for p in snapshots[100].probes if p.name == "cat"]
            drawn = probe_card(cat.attention, cat.tokens, 100, cat.special)
            assert np.array_equal(np.asarray(png.convert("RGB")), drawn)
    local = client.download_artifacts(run.info.run_id, thumb, str(tmp_path / "dl"))
    with Image.open(local) as webp:
        assert webp.size == (256, 256)  # what the card shows: square, fills its box
        assert len(np.unique(np.asarray(webp.convert("RGB")).reshape(-1, 3), axis=0)) > 256


def test_a_card_spooled_while_the_server_is_down_is_sent_as_drawn(tables, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient
    from servers import free_port
    from test_sink_mlflow import completes

    from attnlog.sinks.mlflow import MLflowSink
    from attnlog.sinks.spool import sync

    spool = tmp_path / "spool"
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    sink = MLflowSink(down, experiment_name="exp", spool_dir=spool, cards=True)
    snapshot = trained(100)
    completes(sink.log_event, snapshot, tables[1], 100)
    completes(sink.close)
    cards = list(spool.glob("*.files/images/*.png"))
    assert len(cards) == len(snapshot.probes)
    for card in cards:
        with Image.open(card) as png:
            assert png.mode == "P"  # spooled as drawn, not widened to RGB

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert sync(spool, uri) >= 1
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    [full] = [f for f in image_files(client, run.info.run_id)["attention/cat/model"][100]
              if f.endswith(".png")]  # fmt: skip
    [cat] = [p for p in snapshot.probes if p.name == "cat"]
    with Image.open(client.download_artifacts(run.info.run_id, full, str(tmp_path))) as png:
        assert png.mode == "P"
        drawn = probe_card(cat.attention, cat.tokens, 100, cat.special)
        assert np.array_equal(np.asarray(png.convert("RGB")), drawn)


def test_images_are_named_and_sized_as_mlflows_log_image_makes_them(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from attnlog.sinks.spool import send

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("exp", artifact_location=str(tmp_path / "art"))
    image = np.random.default_rng(5).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    theirs = client.create_run(experiment).info.run_id
    client.log_image(theirs, image, key="attention/cat/model", step=3, timestamp=1234)
    ours = client.create_run(experiment).info.run_id
    img = {"key": "attention/cat/model", "step": 3, "timestamp": 1234, "array": image}
    event = {"run_id": ours, "metrics": [], "params": {}, "tags": {}, "artifacts": [],
             "images": [img], "end_run": None}  # fmt: skip
    send(client, event, None, lambda: None)

    def files(run_id):
        local = client.download_artifacts(run_id, "images", str(tmp_path / run_id))
        found = {}
        for path in Path(local).iterdir():
            with Image.open(path) as opened:
                found[re.sub(r"\+[0-9a-f-]{36}", "+<id>", path.name)] = opened.size
        return found

    assert files(ours) == files(theirs)  # names (but the id), and the thumbnail's size
    assert client.get_run(ours).data.tags["mlflow.loggedImages"] == "True"


def test_an_image_stem_is_one_file_name():
    from attnlog.sinks.spool import image_stem

    img = {"key": "a/b", "step": 1, "timestamp": 2, "id": "../../elsewhere"}
    stem = image_stem(img)
    assert "/" not in stem and stem.startswith("a~b+step+1+timestamp+2+")
    assert img["id"] != "../../elsewhere" and stem == image_stem(img)  # a new id, kept
    with pytest.raises(ValueError, match="letters, digits"):
        image_stem({"key": "a\\b", "step": 1, "timestamp": 2})


def test_tensorboard_has_the_summary_scalars(tables, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from attnlog.sinks.tensorboard import TensorBoardSink

    sink = TensorBoardSink(tmp_path)
    for (step, snapshot), table in zip({0: make_snapshot(0), 100: trained(100)}.items(), tables):
        sink.log_scores(table, step)
        sink.log_event(snapshot, table, step)
    sink.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("summary/changed_heads")] == [(0, 0), (100, 1)]
    assert acc.Scalars("summary/top.cls")[-1].value == pytest.approx(
        float(tables[1].scores["cls"][CLS_HEAD])
    )


def test_the_logger_sends_mlflow_cards_instead_of_tensorboards_renders(minilm, tmp_path):
    """Through AttentionLogger and its writer process, on the real MiniLM: MLflow's overview
    images are the square cards, once per step; TensorBoard keeps its own renders."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient
    from PIL import Image as PILImage
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from attnlog import AttentionLogger

    model, tokenizer = minilm
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logdir = tmp_path / "run"
    options = {"mlflow": {"tracking_uri": uri, "experiment_name": "cards"}}
    probes = ["The old cat sat on the mat."]
    with AttentionLogger(model, tokenizer, probes, sinks=["mlflow", "tensorboard"], logdir=logdir,
                         sink_options=options, views=()) as logger:  # fmt: skip
        assert logger.log(0) and logger.log(1)
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("cards").experiment_id])
    images = image_files(client, run.info.run_id)
    [probe_key] = images  # the probe's card; pattern cards are opt-in (`pattern_cards=True`)
    assert probe_key.startswith("attention/") and probe_key.endswith("/model")
    assert {step: len(files) for step, files in images[probe_key].items()} == {0: 2, 1: 2}
    [full] = [f for f in images[probe_key][1] if f.endswith(".png")]
    local = client.download_artifacts(run.info.run_id, full, str(tmp_path / "dl"))
    with PILImage.open(local) as png:
        assert png.size == (CARD_PX, CARD_PX)
    assert [
        m.step for m in client.get_metric_history(run.info.run_id, "attn.summary.max_change")
    ] == [0, 1]
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tb = acc.Images(probe_key)[-1]
    assert (tb.width, tb.height) != (CARD_PX, CARD_PX)  # TensorBoard's own wide render
    assert acc.Images("patterns/cls")  # TensorBoard keeps every pattern's matrix
    assert [e.step for e in acc.Scalars("summary/max_change")] == [0, 1]
