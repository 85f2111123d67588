"""AlertTracker: entropy collapse, logit growth and head death, each alerted once per run."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from attnlog.alerts import AlertTracker, AttentionAlert
from attnlog.patterns import ScoreTable


def table(step, **scores):
    return ScoreTable(
        step=step, scores={k: np.asarray(v, dtype=np.float32) for k, v in scores.items()}
    )


def quiet(tracker, t):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AttentionAlert)
        return tracker.update(t)


def test_entropy_collapse_below_threshold_or_halved_once():
    tracker = AlertTracker()
    assert quiet(tracker, table(0, broad=[[0.8, 0.8, 0.01]])) == []  # a baseline, even 0.01
    with pytest.warns(AttentionAlert, match="entropy collapse in L0H1"):
        lines = tracker.update(table(10, broad=[[0.7, 0.3, 0.01]]))  # head 1 lost more than half
    assert lines == ["step 10: entropy collapse in L0H1: broad 0.3 (was 0.8)"]
    assert quiet(tracker, table(20, broad=[[0.05, 0.01, 0.01]])) == [
        "step 20: entropy collapse in L0H0: broad 0.05 (was 0.7)"  # L0H1 was already reported
    ]


def test_logit_growth_threshold_or_doubling():
    tracker = AlertTracker(logit=50.0)
    assert quiet(tracker, table(0, max_logit=[[10.0, 30.0, np.nan]])) == []
    lines = quiet(tracker, table(5, max_logit=[[20.0, 55.0, 100.0]]))
    assert [line.split(": ")[1] for line in lines] == [
        "logit growth in L0H0",  # doubled
        "logit growth in L0H1",  # above 50
        "logit growth in L0H2",  # above 50, no previous value
    ]
    assert quiet(tracker, table(6, max_logit=[[80.0, 200.0, 400.0]])) == []


def test_tiny_logits_doubling_is_not_an_alert():
    tracker = AlertTracker(logit=50.0, logit_floor=10.0)
    assert quiet(tracker, table(0, max_logit=[[0.098, 4.0, 6.0]])) == []
    lines = quiet(tracker, table(5, max_logit=[[0.225, 9.0, 12.0]]))  # all three doubled
    assert lines == ["step 5: logit growth in L0H2: max_logit 12 (was 6)"]  # only one reached 10


def test_head_death_is_reported_once():
    tracker = AlertTracker(death=0.95)
    assert quiet(tracker, table(0, sink=[[0.5, 0.2, 0.99]], delimiter=[[0.5, 0.5, 0.5]])) == []
    lines = quiet(tracker, table(1, sink=[[0.97, 0.2, 0.99]], delimiter=[[0.5, 0.99, 0.5]]))
    assert lines == [
        "step 1: head death in L0H0: sink 0.97 (was 0.5)",
        "step 1: head death in L0H1: delimiter 0.99 (was 0.5)",
    ]  # L0H2 was already a sink head at the baseline: not a change
    quiet(tracker, table(2, sink=[[0.5, 0.2, 0.99]], delimiter=[[0.5, 0.5, 0.5]]))
    assert quiet(tracker, table(3, sink=[[0.99, 0.2, 0.99]], delimiter=[[0.5, 0.5, 0.5]])) == []


def test_nan_and_missing_scores_raise_nothing():
    tracker = AlertTracker()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tracker.update(table(0, broad=[[np.nan]], max_logit=[[np.nan]])) == []
        assert tracker.update(table(1, broad=[[np.nan]])) == []
        assert tracker.update(table(2, prev_token=[[0.5]])) == []


def test_bad_threshold():
    with pytest.raises(ValueError, match="collapse"):
        AlertTracker(collapse=float("nan"))
    with pytest.raises(ValueError, match="logit_floor"):
        AlertTracker(logit_floor=float("inf"))
