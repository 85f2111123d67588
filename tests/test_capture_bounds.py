"""What one event may cost: `archive_mb` bounds the whole stored event, and the probe pass adds
a bounded share of one layer's attention to the training process, whatever the probe length."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from attnlog.capturing import Capturer
from attnlog.probes import Probe

ROOT = Path(__file__).resolve().parents[1]


def _stored_bytes(snapshot) -> int:
    """float16 bytes of the arrays an archive stores per probe, before compression."""
    arrays = ("attention", "queries", "keys")
    return sum(
        getattr(p, a).size * 2 for p in snapshot.probes for a in arrays if getattr(p, a) is not None
    )


def test_archive_mb_bounds_whole_probes_with_their_queries_and_keys(minilm):
    """16 MiniLM probes of 244 tokens stored whole with q/k take 144 MiB; archive_mb=4 holds."""
    model, tokenizer = minilm
    rng = np.random.default_rng(0)
    probes = [Probe(ids=rng.integers(2000, 9000, 244).tolist(), name=f"p{i}") for i in range(16)]
    with pytest.warns(UserWarning, match="keep their attention pooled.*archive_mb=4"):
        cap = Capturer(model, tokenizer, probes, archive_mb=4)
    snapshot, table = cap.measure(0)
    assert _stored_bytes(snapshot) <= 4 * 2**20
    assert all(p.pooled and p.queries is None for p in snapshot.probes)
    whole, whole_table = Capturer(model, tokenizer, probes[:2], archive_mb=64).measure(0)
    assert not whole.probes[0].pooled and whole.probes[0].queries is not None
    for name in ("p0", "p1"):  # scores stay exact: computed in the pass from whole rows
        for pattern, values in whole_table.per_probe[name].items():
            np.testing.assert_allclose(table.per_probe[name][pattern], values, atol=1e-4)


def test_queries_and_keys_are_dropped_before_attention_to_fit(minilm):
    model, tokenizer = minilm
    probes = [Probe("The cat sat on the mat. " * 6, name=f"p{i}") for i in range(4)]
    n = len(Capturer(model, tokenizer, probes[:1]).encoded[0])
    attention, qk = 6 * 12 * n * n * 2, 2 * 6 * 12 * n * 32 * 2
    budget = (4 * attention + 2 * qk + qk // 2) / 2**20  # all attention, q/k of two probes
    with pytest.warns(UserWarning, match="query/key vectors are kept for 2 of 4 probes"):
        snapshot = Capturer(model, tokenizer, probes, archive_mb=budget)(0)
    assert [p.queries is not None for p in snapshot.probes] == [True, True, False, False]
    assert not any(p.pooled for p in snapshot.probes)
    assert _stored_bytes(snapshot.to_host()) <= budget * 2**20


# Peak memory of the probe pass, measured in a fresh process: large blocks go straight to mmap
# (so freed memory leaves the resident set at once), and the peak is reset just before the pass.
_MEASURE = textwrap.dedent("""
    import gc, json, re, sys
    import numpy as np, torch, transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    import attnlog.capturing.stream as stream
    from attnlog.capturing import Capturer
    from attnlog.probes import Probe

    def status(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

    n, heads, chunk_bytes = int(sys.argv[1]), 8, int(sys.argv[2])
    stream.CHUNK_BYTES["cpu"] = chunk_bytes
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=8, num_attention_heads=heads, num_key_value_heads=2,
                            max_position_embeddings=n + 64)
    model = tf.LlamaForCausalLM(config).eval()
    vocab = {"<pad>": 0, "<s>": 1} | {f"w{i}": i + 2 for i in range(998)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>")
    ids = np.random.default_rng(0).integers(2, 1000, n).tolist()
    result = {}
    for name, probes in (("alone", [Probe(ids=ids, name="long")]),
                         ("two", [Probe(ids=ids, name="a"), Probe(ids=ids[::-1], name="b")])):
        cap = Capturer(model, tokenizer, probes)  # default options: the induction probe too
        cap.measure(0)  # warm-up: lazily built state is not the pass's cost
        gc.collect()
        base = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM)
        cap.measure(0)
        layer = len(probes) * heads * n * n * 4  # one layer's float32 attention
        result[name] = (status("VmHWM") - base) / layer
    print(json.dumps(result))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_the_pass_adds_at_most_three_layers_of_attention():
    """A decoder gets the induction probe by default; with a long probe that must not pad the
    long one (an n x n mask), and a layer is reduced a fraction at a time. 1024 tokens with a
    GPU-sized chunk budget: the layer is still split, not reduced whole."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, "1024", str(128 * 2**20)],
        env=env, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    layers = json.loads(out.stdout.strip().splitlines()[-1])
    assert layers["alone"] <= 3 and layers["two"] <= 3, layers


def test_long_probes_are_batched_alone():
    """The built-in induction probe never pads a long probe: each long one runs on its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1} | {f"w{i}": i + 2 for i in range(98)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>")
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=2048)  # fmt: skip
    rng = np.random.default_rng(0)
    long = [Probe(ids=rng.integers(2, 100, 1500).tolist(), name=f"l{i}") for i in range(2)]
    probes = [Probe("w1 w2", name="short"), *long, Probe("w3 w4", name="other")]
    cap = Capturer(LlamaForCausalLM(config), tokenizer, probes)
    assert [[p.name for p in b] for b in cap.batches] == [
        ["short"],
        ["l0"],
        ["l1"],
        ["other", "induction"],
    ]
    snapshot = cap(0)
    assert [p.name for p in snapshot.probes] == ["short", "l0", "l1", "other", "induction"]
    assert snapshot.probes[1].pooled and not snapshot.probes[0].pooled
