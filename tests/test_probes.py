"""Probe values, names and files: what fails at construction, and what is made safe."""

from __future__ import annotations

import json

import pytest

from attnlog.probes import (
    MAX_NAME_LENGTH,
    Probe,
    ProbeSet,
    bare_token,
    encode_probe,
    is_punctuation,
    safe_probe_name,
)


def names(*probes):
    return [p.name for p in ProbeSet(probes)]


def test_given_names_are_made_safe_for_paths_and_tags():
    got = names(
        Probe("a", name="x y"),
        Probe("b", name="a/b\\c"),
        Probe("c", name=".hidden"),
        Probe("d", name="tab\there"),
    )
    assert got == ["x_y", "a_b_c", "_hidden", "tab_here"]
    for name in got:
        assert safe_probe_name(name) == name  # already safe: later layers change nothing


def test_names_that_collide_once_safe_fail_at_construction():
    with pytest.raises(ValueError, match=r"'x y' and 'x_y' are the same .*'x_y'.*rename one"):
        ProbeSet([Probe("a", name="x y"), Probe("b", name="x_y")])
    with pytest.raises(ValueError, match="'cat' and 'Cat'"):  # case-insensitive file systems
        ProbeSet([Probe("a", name="cat"), Probe("b", name="Cat")])
    with pytest.raises(ValueError, match="rename one"):
        ProbeSet([Probe("a", name="same"), Probe("b", name="same")])


def test_bad_names_fail_when_the_probe_is_built():
    for bad in ("..", ".", "", "   ", "///", "___"):
        with pytest.raises(ValueError, match="no letter or digit"):
            Probe("a", name=bad)
    with pytest.raises(ValueError, match=f"is 300 characters; use at most {MAX_NAME_LENGTH}"):
        Probe("a", name="n" * 300)
    assert Probe("a", name="n" * MAX_NAME_LENGTH).name == "n" * MAX_NAME_LENGTH
    for bad in (3, 1.5, b"bytes", ["x"]):
        with pytest.raises(TypeError, match="probe name must be a string"):
            Probe("a", name=bad)
    with pytest.raises(TypeError, match="probe name must be a string, got int"):
        ProbeSet([{"text": "a", "name": 7}])  # e.g. from a .jsonl file


def test_cjk_names_stay_readable_and_unique():
    from attnlog.layout import safe_name

    got = names("猫坐在垫子上。", "狗在睡觉。", Probe("x", name="北京 欢迎你"), "猫坐在垫子上。")
    assert got == ["p0_猫坐在垫子上", "p1_狗在睡觉", "北京_欢迎你", "p3_猫坐在垫子上"]
    # Unique also as the sinks write them (MLflow image keys take ASCII only).
    assert len({safe_name(n).casefold() for n in got}) == len(got)
    assert names(Probe("a", name="猫 cat"), Probe("b", name="狗 dog")) == ["猫_cat", "狗_dog"]
    assert names(Probe("a", name="猫"), Probe("b", name="狗")) == ["猫", "狗"]


def test_generated_names_avoid_given_ones_and_stay_short():
    got = names(Probe("a", name="p1_b"), "b", "b")
    assert got == ["p1_b", "p1_b_2", "p2_b"]
    long = names("Supercalifragilisticexpialidocious words everywhere in this sentence.")[0]
    assert long.startswith("p0_supercalifragilistic") and len(long) <= 30
    assert names(Probe(ids=[5, 6]))[0] == "p0_ids"


def test_missing_probe_file_is_an_error_not_a_sentence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for missing in ("missing.txt", "probes/missing.jsonl", " missing.txt "):
        with pytest.raises(FileNotFoundError, match=r"missing\.(txt|jsonl).*does not exist"):
            ProbeSet.coerce(missing)
    (tmp_path / "ok.txt").write_text("The cat sat.\nA\tB\n", encoding="utf-8")
    loaded = ProbeSet.coerce("ok.txt")
    assert [(p.text, p.pair) for p in loaded] == [("The cat sat.", None), ("A", "B")]
    lines = [{"text": "x", "name": "one"}, {"ids": [1, 2, 3], "name": "ids"}]
    (tmp_path / "ok.jsonl").write_text("\n".join(map(json.dumps, lines)), encoding="utf-8")
    loaded = ProbeSet.coerce(tmp_path / "ok.jsonl")
    assert [p.name for p in loaded] == ["one", "ids"] and loaded[1].ids == (1, 2, 3)
    assert ProbeSet.coerce(["Open notes.txt"])[0].text == "Open notes.txt"  # in a list: a sentence


def test_empty_probes_raise():
    with pytest.raises(ValueError, match="probe set is empty"):
        ProbeSet([])
    for empty in ("", "   ", ("a", " ")):
        with pytest.raises(ValueError, match="is empty"):
            ProbeSet([empty])
    with pytest.raises(ValueError, match="needs 'text' or 'ids'"):
        ProbeSet([{"name": "x"}])


def test_empty_probe_file_raises(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no probe"):
        ProbeSet.coerce(path)


def test_token_id_probes_are_validated():
    p = Probe(ids=[3, 4, 5])
    assert p.ids == (3, 4, 5) and p.text == "<3 token ids>"
    for bad in ([], [1.5, 2.0], [[1, 2]], ["a"]):
        with pytest.raises(ValueError, match="non-empty sequence of integer token ids"):
            Probe(ids=bad, name="bad")
    with pytest.raises(ValueError, match=">= 0"):
        Probe(ids=[1, -1])
    with pytest.raises(ValueError, match="cannot have a pair"):
        Probe("a", "b", ids=[1])


def test_bare_token_is_the_one_marker_stripper():
    assert [bare_token(t) for t in ("##berries", "Ġthe", "▁the", "the</w>", "Ċ", "@@x")] == [
        "berries",
        "the",
        "the",
        "the",
        "",
        "x",
    ]
    assert is_punctuation("Ġ,") and is_punctuation("。") and not is_punctuation("##s")


def test_encode_probe_masks(minilm):
    _, tokenizer = minilm
    enc = encode_probe(Probe("The cat, it sat.", "Yes.", name="pair"), tokenizer)
    assert enc.tokens[0] == "[CLS]" and enc.special[0] and enc.special[-1]
    assert enc.is_pair and enc.segment.tolist()[-2:] == [1, 1]
    assert [t for t, m in zip(enc.tokens, enc.punct) if m] == [",", ".", "."]
