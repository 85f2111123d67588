"""`attnlog export`: paper figures from a run's archive, SVG with the tokens as text, PNG at a dpi."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from PIL import Image

from attnlog.cli import main

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def run(minilm, tmp_path_factory):
    from attnlog import AttentionLogger

    model, tokenizer = minilm
    logdir = tmp_path_factory.mktemp("export_run")
    probes = ["Zebras gallop across savannas.", ("The cat sat.", "It purred.")]
    with AttentionLogger(model, tokenizer, probes, sinks=[], logdir=logdir, views=()) as log:
        log.log(0)
        log.log(4)
    return logdir


def texts(svg_path):
    root = ET.parse(svg_path).getroot()  # well-formed XML
    return root, [t.text for t in root.iter(f"{SVG}text")]


def test_head_svg_is_vector_with_token_text(run, tmp_path):
    out = tmp_path / "head.svg"
    assert main(["export", str(run), "--layer", "1", "--head", "3", "--out", str(out)]) == 0
    root, words = texts(out)
    assert "zebra" in words and "##s" in words and "[CLS]" in words  # rows and columns
    assert words.count("zebra") == 2
    assert "layer 1 head 3" in words and any("step 4" in w for w in words if w)
    n = 10  # [CLS] zebra ##s gall ##op across sa ##vanna ##s [SEP]
    assert len(list(root.iter(f"{SVG}rect"))) > n * n  # one rect a cell
    assert not list(root.iter(f"{SVG}image"))  # no embedded bitmap


def test_layer_and_pattern_figures(run, tmp_path):
    layer = tmp_path / "layer.svg"
    assert main(["export", str(run), "--layer", "0", "--step", "0", "--out", str(layer)]) == 0
    _, words = texts(layer)
    assert [f"layer 0 head {h}" in words for h in range(12)] == [True] * 12
    pattern = tmp_path / "pattern.svg"
    args = ["export", str(run), "--pattern", "prev_token", "--out", str(pattern)]
    assert main(args) == 0
    _, words = texts(pattern)
    assert any(w.startswith("prev_token") for w in words if w)
    assert {str(i) for i in range(6)} <= set(words)  # layer ticks
    assert sum(1 for w in words if w and w.startswith("0.")) >= 6 * 12 - 6  # cell values


def test_png_size_follows_dpi(run, tmp_path):
    sizes = {}
    for dpi in (100, 200):
        out = tmp_path / f"head{dpi}.png"
        args = ["export", str(run), "--layer", "2", "--head", "0", "--dpi", str(dpi)]
        assert main([*args, "--out", str(out)]) == 0
        with Image.open(out) as image:
            sizes[dpi] = image.size
            assert round(image.info["dpi"][0]) == dpi
    for a, b in zip(sizes[100], sizes[200]):
        assert b == pytest.approx(2 * a, rel=0.02)


def test_word_level_export(run, tmp_path):
    out = tmp_path / "words.svg"
    args = ["export", str(run), "--probe", "p0_zebras_gallop_across", "--layer", "0"]
    assert main([*args, "--head", "0", "--words", "--out", str(out)]) == 0
    _, words = texts(out)
    assert "zebras" in words and "savannas" in words and "##s" not in words


def test_errors_name_the_fix(run, tmp_path, capsys):
    assert main(["export", str(run), "--layer", "0", "--out", str(tmp_path / "x.jpg")]) == 1
    assert ".svg or .png" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "x.svg")]) == 1
    assert "--layer" in capsys.readouterr().err
    assert main(["export", str(run), "--pattern", "nope", "--out", str(tmp_path / "x.svg")]) == 1
    assert "patterns:" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                str(run),
                "--layer",
                "0",
                "--probe",
                "nope",
                "--out",
                str(tmp_path / "x.svg"),
            ]
        )
        == 1
    )
    assert "probes:" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--layer", "0", "--out", str(tmp_path / "x.svg")]) == 1
    assert "no attnlog archive" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".svg", ".png"])
def test_any_token_gives_a_valid_figure(tmp_path, suffix):
    """Tokens are arbitrary text: control characters, U+FFFE/U+FFFF, a lone surrogate and XML
    markup still give an SVG that parses as XML (and a PNG), each drawn visibly."""
    from test_sinks_contract import make_snapshot, make_table

    from attnlog.sinks.archive import ArchiveSink

    snapshot = make_snapshot(0)
    odd = ["\x00", "a\x1bb", "\ufffe", "\uffff", "\ud800", "]]><x>&amp;"]
    snapshot.probes[0].tokens = odd
    snapshot.probes[0].name = "probe\x07\ufffe"
    ArchiveSink(tmp_path / "run").log_archive(snapshot, make_table(0), 0)
    out = tmp_path / f"odd{suffix}"
    args = ["export", str(tmp_path / "run"), "--layer", "0", "--head", "1", "--out", str(out)]
    assert main(args) == 0
    if suffix == ".png":
        with Image.open(out) as image:
            assert image.size[0] > 50
        return
    _, words = texts(out)  # before: "not well-formed (invalid token)"
    for shown in ("\\x00", "a\\x1bb", "\\ufffe", "\\uffff", "\\ud800", "]]><x>&amp;"):
        assert words.count(shown) == 2  # a row and a column label
    assert ET.parse(out).getroot().find(f"{SVG}title").text.startswith("probe\\x07\\ufffe")
