"""TensorBoardSink: written with a real SummaryWriter, read back with TensorBoard's EventAccumulator."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from test_sinks_contract import make_html, make_images, make_table

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from attnlog import notes  # noqa: E402
from attnlog.layout import TB_ALERTS_TAG, TB_SETTINGS_TAG  # noqa: E402
from attnlog.sinks.base import pattern_scalars  # noqa: E402
from attnlog.sinks.tensorboard import TensorBoardSink  # noqa: E402


def read(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def text_of(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    # torch's SummaryWriter.add_text stores `<tag>/text_summary` (as for Trainer's "args").
    events = acc.Tensors(f"{tag}/text_summary")
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events]


def test_scalars_images_and_texts_read_back_exactly(tmp_path):
    sink = TensorBoardSink(tmp_path)
    tables = {step: make_table(step) for step in (0, 100)}
    sink.log_settings({"every_n_steps": "100", "probes": "cat | pair"})
    for step, table in tables.items():
        sink.log_scores(table, step)
        sink.log_images(make_images(step), step)
    sink.close()

    acc = read(tmp_path)
    expected = pattern_scalars(tables[0])
    assert set(acc.Tags()["scalars"]) == set(expected)
    assert "patterns/cross_sentence/layer_1" not in expected  # all-NaN layer: never logged
    for tag in expected:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [0, 100]
        for event in events:
            assert event.value == pytest.approx(pattern_scalars(tables[event.step])[tag], rel=1e-6)

    images = make_images(0)
    assert set(acc.Tags()["images"]) == set(images)
    for tag, array in images.items():
        events = acc.Images(tag)
        assert [e.step for e in events] == [0, 100]
        assert (events[0].height, events[0].width) == array.shape[:2]

    assert text_of(acc, TB_ALERTS_TAG) == [(s, "\n\n".join(t.alerts)) for s, t in tables.items()]
    ((step, settings),) = text_of(acc, TB_SETTINGS_TAG)
    assert step == 0 and "| every_n_steps | 100 |" in settings and "cat \\| pair" in settings


def test_shared_writer_is_flushed_not_closed(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    sink = TensorBoardSink(writer=writer)
    assert sink.logdir == tmp_path
    table = make_table(3)
    sink.log_scores(table, 3)
    sink.close()
    writer.add_scalar("train/loss", 1.5, 4)  # the Trainer's writer still works
    writer.close()

    acc = read(tmp_path)
    expected = pattern_scalars(table)["patterns/cls/max"]
    assert [(e.step, e.value) for e in acc.Scalars("patterns/cls/max")] == [
        (3, pytest.approx(expected))
    ]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(4, 1.5)]


def test_writer_is_created_on_first_use(tmp_path):
    sink = TensorBoardSink(tmp_path / "run")
    assert not (tmp_path / "run").exists()
    sink.close()
    assert not (tmp_path / "run").exists()


def test_html_goes_to_the_plugin_folder(tmp_path):
    sink = TensorBoardSink(tmp_path)
    files = make_html(100)
    sink.log_html(files, 100)
    for relpath, html in files.items():
        assert (tmp_path / "plugins/attnlog/html" / relpath).read_text() == html
    with pytest.raises(ValueError, match="relative"):
        sink.log_html({"../escape.html": "x"}, 100)
    sink.close()


def test_large_images_are_scaled_down(tmp_path):
    sink = TensorBoardSink(tmp_path, max_image_side=64)
    sink.log_images({"attention/cat/model": np.zeros((100, 300, 3), np.uint8)}, 1)
    with pytest.raises(ValueError, match="uint8"):
        sink.log_images({"attention/cat/model": np.zeros((10, 10), np.float32)}, 2)
    sink.close()
    (event,) = read(tmp_path).Images("attention/cat/model")
    assert (event.height, event.width) == (21, 64)


def test_images_hint_is_shown_once(tmp_path, caplog, monkeypatch):
    notes.forget("tensorboard/images-hint")
    sink = TensorBoardSink(tmp_path)
    with caplog.at_level(logging.WARNING, logger="attnlog"):
        sink.log_images(make_images(0), 0)
        sink.log_images(make_images(1), 1)
    sink.close()
    hints = [r for r in caplog.records if "--samples_per_plugin images=1000" in r.getMessage()]
    assert len(hints) == 1


def test_disk_error_while_logging_raises_from_the_method(tmp_path):
    sink = TensorBoardSink(tmp_path)
    (tmp_path / "plugins").write_text("a file where the plugin folder should be")
    with pytest.raises(OSError):
        sink.log_html(make_html(0), 0)
    sink.close()


def test_the_event_file_is_framed_with_tensorflows_checksums(tmp_path):
    from tensorboard.compat.tensorflow_stub import errors
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import (
        PyRecordReader_New,
        masked_crc32c,
    )

    from attnlog.sinks import tensorboard_records

    rng = np.random.default_rng(0)
    for size in (0, 1, 8, 4097):  # the C checksum is TensorFlow's, byte for byte
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert tensorboard_records.masked_crc32c(data) == masked_crc32c(data)

    sink = TensorBoardSink(tmp_path)  # its writer frames records with the C checksum
    for step in (0, 100):
        sink.log_scores(make_table(step), step)
        sink.log_images(make_images(step), step)
    sink.close()
    [path] = tmp_path.glob("events.out.tfevents.*")
    reader, records = PyRecordReader_New(str(path)), 0
    while True:
        try:
            reader.GetNext()  # checks both checksums of every record: DataLossError if wrong
        except errors.OutOfRangeError:
            break
        records += 1
    assert records > 2 * len(make_images(0))
