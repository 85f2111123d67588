"""Heatmap images: sizes, labels, colour bar, NaN cells, CJK glyphs, speed."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

from attnlog.render import fonts
from attnlog.render.heatmap import VIRIDIS, colorize, render_layer, render_matrix, render_model

TOKENS = ["[CLS]", "the", "cat", "sat", "on", "the", "mat", ".", "[SEP]"]


def softmax_attention(*shape, seed=0):
    logits = np.random.default_rng(seed).normal(scale=2.5, size=shape)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)).astype(np.float16)


def is_rgb_image(img):
    return img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


def has_colorbar(img):
    """A column on the right that runs from viridis' top (yellow) down to its bottom (purple)."""
    right = img[:, img.shape[1] * 2 // 3 :].astype(int)
    top = (np.abs(right - VIRIDIS[255].astype(int)).sum(-1) <= 3).any(0)
    bottom = (np.abs(right - VIRIDIS[0].astype(int)).sum(-1) <= 3).any(0)
    return bool((top & bottom).any())


def test_viridis_matches_matplotlib():
    matplotlib = pytest.importorskip("matplotlib")
    ref = matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3]
    np.testing.assert_array_equal(VIRIDIS, (ref * 255 + 0.5).astype(np.uint8))
    rgb = colorize([0.0, 1.0, np.nan])
    assert rgb.tolist()[:2] == [VIRIDIS[0].tolist(), VIRIDIS[255].tolist()]
    assert len(set(rgb[2].tolist())) == 1  # NaN is grey


def viridis_mask(img):
    """[h, w] True where a pixel is a viridis colour (heatmap cells, colour bar)."""

    def code(rgb):
        return (
            (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
        )

    return np.isin(code(img), code(VIRIDIS))


def test_render_layer_shape_labels_colorbar():
    attn = softmax_attention(4, len(TOKENS), len(TOKENS))
    img = render_layer(attn, TOKENS, title="layer 0")
    bare = render_layer(attn, TOKENS, title="layer 0", labels=False)
    assert is_rgb_image(img) and is_rgb_image(bare)
    assert img.shape[0] > bare.shape[0] and img.shape[1] > bare.shape[1]  # room for the labels
    assert has_colorbar(img) and has_colorbar(bare)
    for image, labelled in ((img, True), (bare, False)):
        heat = viridis_mask(image)
        rows = np.flatnonzero(heat.any(1))
        first_col = np.flatnonzero(heat.any(0))[0]
        left = image[rows[0] : rows[-1], :first_col]  # beside the first heatmap
        assert (left.astype(int).sum(-1) < 200).any() == labelled  # dark label text


def test_labels_are_token_text():
    attn = softmax_attention(1, 3, 3)
    one = render_layer(attn, ["aaa", "bbb", "ccc"], labels=True)
    other = render_layer(attn, ["xxxxx", "bbb", "ccc"], labels=True)
    assert one.shape != other.shape or not np.array_equal(one, other)


def test_cross_attention_key_tokens_and_shape_errors():
    img = render_layer(softmax_attention(2, 3, 5), ["a", "b", "c"], ["k1", "k2", "k3", "k4", "k5"])
    assert is_rgb_image(img)
    with pytest.raises(ValueError, match="key_tokens"):
        render_layer(softmax_attention(2, 3, 5), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"tokens has 2 entries"):
        render_layer(softmax_attention(2, 3, 3), ["a", "b"])
    with pytest.raises(ValueError, match=r"\[H, n, m\]"):
        render_layer(np.zeros((3, 3)), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\[L, H, n, n\]"):
        render_model(np.zeros((2, 3, 3)), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\[L, H\]"):
        render_matrix(np.zeros(3))


def test_long_sequences_are_capped_and_thinned():
    n = 700
    tokens = [f"w{i}" for i in range(n)]
    img = render_layer(softmax_attention(12, n, n), tokens, title="long", max_size=1024)
    assert is_rgb_image(img) and max(img.shape[:2]) <= 1024
    img = render_model(softmax_attention(4, 4, n, n), tokens, max_size=800)
    assert max(img.shape[:2]) <= 800


def test_render_model_grid():
    # Speed lives in benchmarks/bench_render.py: no test asserts wall time.
    n = 32
    tokens = [f"t{i}" for i in range(n)]
    img = render_model(softmax_attention(12, 12, n, n), tokens, title="model")
    assert is_rgb_image(img) and has_colorbar(img) and max(img.shape[:2]) <= 2048


def test_render_model_panels_sit_in_a_grid():
    attn = np.zeros((2, 3, 4, 4), np.float32)
    attn[:, :, np.arange(4), np.arange(4)] = 1.0  # identity: yellow diagonals
    img = render_model(attn, ["a", "b", "c", "d"])
    yellow = np.all(img == VIRIDIS[255], axis=-1)

    # 2 x 3 panels separated by gaps: one run of yellow columns per head, of rows per layer.
    def runs(index):
        return np.split(index, np.flatnonzero(np.diff(index) > 1) + 1)

    col_runs = runs(np.flatnonzero(yellow.any(0)))
    assert len(col_runs) == 3 + 1  # three head columns and the colour bar's top
    panels = yellow[:, : col_runs[-1][0]]
    assert len(runs(np.flatnonzero(panels.any(1)))) == 2
    assert panels.sum() == 2 * 3 * 4 * 4 * 4  # 4 diagonal cells of 4 x 4 px per panel


def test_render_matrix_values_and_nan():
    matrix = np.array([[0.1, np.nan, 0.9], [0.5, 0.25, 1.0]], np.float32)
    img = render_matrix(matrix, title="previous_token")
    assert is_rgb_image(img) and has_colorbar(img)
    grey = np.all(img == (210, 210, 210), axis=-1)
    ys, xs = np.nonzero(grey)
    assert ys.size > 100  # the NaN cell is grey ...
    cell = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    assert (cell.astype(int).sum(-1) < 300).any()  # ... with a dark dash in it

    def white_text_in_cell(image, value):
        same = np.all(image == VIRIDIS[int(value * 255.999)], axis=-1)
        ys, xs = np.nonzero(same[:, : image.shape[1] - 60])  # left of the colour bar
        cell = image[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        return bool((cell.min(-1) > 200).any())

    assert white_text_in_cell(img, 0.1)  # the value is written on the dark cell
    assert not white_text_in_cell(render_matrix(matrix, fmt=""), 0.1)
    assert is_rgb_image(render_matrix(np.full((2, 2), np.nan)))


def _cell_box(img, value):
    """(y0, y1, x0, x1) of the cells coloured `value` (left of the colour bar)."""
    same = np.all(img == VIRIDIS[int(value * 255.999)], axis=-1)
    ys, xs = np.nonzero(same[:, : img.shape[1] - 60])
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def test_render_matrix_has_layer_and_head_numbers():
    # One distinct value per row: each row's cells can be found by colour.
    layers, heads = 6, 3
    values = np.linspace(0.0, 1.0, layers)
    matrix = np.repeat(values[:, None], heads, axis=1)
    img = render_matrix(matrix, fmt="")
    assert has_colorbar(img)
    grid_left = min(_cell_box(img, v)[2] for v in values)
    for v in values:
        y0, y1, _, _ = _cell_box(img, v)
        ticks = img[y0:y1, max(0, grid_left - 20) : grid_left - 1]  # where the layer number goes
        assert (ticks.astype(int).sum(-1) < 300).any(), f"no layer number beside row {v}"
    y0 = min(_cell_box(img, v)[0] for v in values)
    above = img[max(0, y0 - 16) : y0 - 1, grid_left:]  # the head numbers
    assert (above.astype(int).sum(-1) < 300).any()


def _ink_rows(img, y0, y1):
    """Rows in [y0, y1) with dark pixels."""
    return np.flatnonzero((img[y0:y1].astype(int).sum(-1) < 500).any(1)) + y0


@pytest.mark.parametrize("title", ["gjpqy", "北京 gy"])
def test_title_is_not_clipped(title):
    if fonts.has_cjk(title) and fonts.find_font("cjk") is None:
        pytest.skip("no CJK font")
    from PIL import Image, ImageDraw

    img = render_layer(softmax_attention(1, 2, 2), ["a", "b"], title=title, labels=False)
    heat_top = np.flatnonzero(viridis_mask(img).any(1))[0]
    rows = _ink_rows(img, 0, heat_top)
    rows = rows[: np.argmax(np.diff(rows, append=10**6) > 4) + 1]  # the title: the first block
    font = fonts.font_for(title, 15)  # the title's font, drawn alone on a roomy canvas
    ref = Image.new("L", (600, 80), 0)
    ImageDraw.Draw(ref).text((5, 20), title, fill=255, font=font)
    ref_rows = np.flatnonzero((np.asarray(ref) > 100).any(1))
    assert rows.size and rows[0] > 0  # not cut at the top edge of the image
    assert rows[-1] - rows[0] >= ref_rows[-1] - ref_rows[0]  # descenders and all


def test_render_matrix_range_outside_unit_interval():
    img = render_matrix(np.array([[-2.0, 3.0]]), fmt="{:.1f}")
    assert is_rgb_image(img) and has_colorbar(img)


# ---- CJK ------------------------------------------------------------------------------------


def _label_region(img):
    return img[:, : img.shape[1] // 3]


@pytest.mark.skipif(
    fonts.find_font("cjk") is None, reason="no CJK font (apt-get install fonts-noto-cjk)"
)
def test_cjk_tokens_draw_real_glyphs():
    attn = softmax_attention(1, 2, 2)
    with_font = [render_layer(attn, [c, "[SEP]"]) for c in ("北", "京")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the expected missing-font warning
        tofu = [render_layer(attn, [c, "[SEP]"], cjk_font=None) for c in ("北", "京")]
    # Real glyphs differ from one another; without a CJK font both are the same empty box.
    assert not np.array_equal(_label_region(with_font[0]), _label_region(with_font[1]))
    assert np.array_equal(_label_region(tofu[0]), _label_region(tofu[1]))
    assert not np.array_equal(_label_region(with_font[0]), _label_region(tofu[0]))


def test_missing_cjk_font_warns_once_per_process():
    code = (
        "import warnings\n"
        "import numpy as np\n"
        "from attnlog.render.heatmap import render_layer\n"
        "warnings.simplefilter('always')\n"
        "a = np.full((1, 2, 2), 0.5)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3):\n"
        "        render_layer(a, ['中文', 'x'], title='标题', cjk_font=None)\n"
        "    render_layer(a, ['a', 'b'], cjk_font=None)\n"
        "msgs = [str(w.message) for w in caught]\n"
        "print(len(msgs)); print(msgs[0] if msgs else '')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, message = out.stdout.splitlines()[:2]
    assert count == "1"
    assert "apt-get install fonts-noto-cjk" in message


def test_latin_only_tokens_never_warn(recwarn):
    render_layer(softmax_attention(1, 2, 2), ["a", "b"], cjk_font=None)
    assert not [w for w in recwarn if "CJK" in str(w.message)]


def _decoded(png: bytes) -> tuple[str, np.ndarray]:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return image.mode, np.asarray(image.convert("RGB")).astype(int)


def test_heatmaps_are_saved_on_the_fixed_palette_within_a_few_levels():
    from attnlog.render.draw import PALETTE
    from attnlog.render.png import encode_png

    rng = np.random.default_rng(3)
    attn = rng.dirichlet(np.ones(10), size=(2, 3, 10)).astype(np.float32)
    for image in (render_model(attn, list("abcdefghij")), render_matrix(rng.random((3, 4)))):
        mode, back = _decoded(encode_png(image))
        assert mode == "P" and back.shape == image.shape
        assert set(map(tuple, np.unique(back.reshape(-1, 3), axis=0))) <= set(map(tuple, PALETTE))
        assert np.abs(back - image).mean() < 1.5


def test_an_image_off_the_palette_gets_its_own_colours():
    from attnlog.render.png import encode_png

    rng = np.random.default_rng(4)
    colours = rng.integers(0, 256, size=(200, 3), dtype=np.uint8)  # 200 colours, not viridis
    image = np.repeat(np.repeat(colours.reshape(10, 20, 3), 8, axis=0), 8, axis=1)
    mode, back = _decoded(encode_png(image))
    assert mode == "P" and np.abs(back - image).max() <= 8
