"""Configuration errors fail where the logger or a callback is built, naming the fix."""

from __future__ import annotations

import pytest

from attnlog import AttentionLogger

BAD_HTML_CAPS = ["abc", "0", "-5", "nan", "inf"]


@pytest.mark.parametrize("value", BAD_HTML_CAPS)
def test_a_bad_html_cap_fails_when_the_logger_is_built(minilm, tmp_path, monkeypatch, value):
    model, tokenizer = minilm
    monkeypatch.setenv("ATTNLOG_MAX_HTML_MB", value)
    with pytest.raises(ValueError, match="ATTNLOG_MAX_HTML_MB=.*positive number of MiB"):
        AttentionLogger(model, tokenizer, ["The cat sat."], sinks=[], logdir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_good_html_cap_is_accepted(minilm, tmp_path, monkeypatch):
    model, tokenizer = minilm
    monkeypatch.setenv("ATTNLOG_MAX_HTML_MB", "2.5")
    with AttentionLogger(
        model, tokenizer, ["The cat sat."], sinks=[], logdir=tmp_path / "run", writer="thread"
    ) as logger:
        assert logger.log(0)
        assert logger.flush()


def test_callbacks_check_capture_options_and_settings_when_built(monkeypatch):
    pytest.importorskip("transformers")
    from attnlog import AttentionLoggerCallback

    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        AttentionLoggerCallback(probes=["The cat sat."], batch_size=0)
    with pytest.raises(TypeError, match="archive_mb must be a number of MiB"):
        AttentionLoggerCallback(probes=["The cat sat."], archive_mb="lots")
    with pytest.raises(TypeError, match="unknown option 'pooled_sise'; did you mean 'pooled_size'"):
        AttentionLoggerCallback(probes=["The cat sat."], pooled_sise=8)
    monkeypatch.setenv("ATTNLOG_MAX_HTML_MB", "abc")
    with pytest.raises(ValueError, match="ATTNLOG_MAX_HTML_MB='abc'"):
        AttentionLoggerCallback(probes=["The cat sat."])
