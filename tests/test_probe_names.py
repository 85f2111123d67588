"""Probe names in any script stay readable and distinct in every place a sink writes them:
TensorBoard tags, the archive, HTML paths and MLflow keys (which take ASCII only)."""

from __future__ import annotations

import json
import re

import pytest

from attnlog.layout import (
    ascii_key,
    clean_key,
    html_dir,
    page_path,
    plugin_dir,
    read_index,
    safe_name,
    tb_attention_tag,
)
from attnlog.probes import Probe, ProbeSet

MLFLOW_IMAGE_KEY = re.compile(r"^[a-zA-Z0-9_\-./ ]+$")  # what MlflowClient.log_image accepts


def unescape(key: str) -> str:
    """The inverse of `ascii_key`: proves that it is one to one."""
    return re.sub(r"-u([0-9a-f]{4})|-U([0-9a-f]{8})", lambda m: chr(int(m[1] or m[2], 16)), key)


@pytest.mark.parametrize(
    "text",
    ["猫", "狗", "北京_欢迎你", "नमस्ते", "x-u732b", "-猫", "a-", "a-U", "long-range", "😀", "plain"],
)
def test_ascii_key_is_one_to_one(text):
    key = ascii_key(text)
    assert key.isascii()
    assert unescape(key) == text
    assert ascii_key("long-range") == "long-range"  # ASCII without `-u` is unchanged


def test_safe_names_keep_every_script():
    assert safe_name("猫") == "猫" and safe_name("北京 欢迎你") == "北京_欢迎你"
    assert safe_name("नमस्ते") == "नमस्ते"  # combining vowel signs are kept
    assert safe_name("e\u0301") == safe_name("\u00e9") == "\u00e9"  # one NFC spelling
    assert safe_name("a/b:c") == "a_b_c" and safe_name("..") == "_."  # no path parts
    tags = {tb_attention_tag(n) for n in ("猫", "狗")}
    assert tags == {"attention/猫/model", "attention/狗/model"}
    keys = {clean_key(t, 250) for t in tags}
    assert keys == {"attention/-u732b/model", "attention/-u72d7/model"}
    assert all(MLFLOW_IMAGE_KEY.match(k) for k in keys)


def test_long_keys_are_cut_but_stay_distinct():
    a, b = (clean_key("attention/" + "猫" * 79 + last, 250) for last in ("猫", "狗"))
    assert a != b and len(a) == len(b) == 250


def test_probe_set_accepts_cjk_names_and_limits_their_bytes():
    names = [p.name for p in ProbeSet([Probe("a", name="猫"), Probe("b", name="狗")])]
    assert names == ["猫", "狗"]
    with pytest.raises(ValueError, match="rename one"):
        ProbeSet([Probe("a", name="e\u0301"), Probe("b", name="\u00e9")])  # same once NFC
    assert Probe("a", name="猫" * 80).name == "猫" * 80
    with pytest.raises(ValueError, match="is 243 bytes in UTF-8; use at most 240"):
        Probe("a", name="猫" * 81)  # a folder name of 243 bytes: file systems allow 255


def test_cjk_probes_end_to_end(minilm, tmp_path):
    """猫 and 狗 through the real logger: archive, TensorBoard events, HTML files, MLflow store."""
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from attnlog import AttentionLogger, load

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment = MlflowClient(uri).create_experiment("exp", artifact_location=str(tmp_path / "art"))
    model, tokenizer = minilm
    probes = [Probe("The cat sat.", name="猫"), Probe("The dog slept.", name="狗")]
    logdir = tmp_path / "run"
    with AttentionLogger(
        model,
        tokenizer,
        probes,
        sinks=["tensorboard", "mlflow"],
        sink_options={"mlflow": {"tracking_uri": uri, "experiment_name": "exp"}},
        logdir=logdir,
        patterns=["cls"],
        views=("head",),
        writer="thread",
        strict=True,
    ) as logger:
        logger.log(0)

    (entry,) = read_index(logdir)
    snapshot = load(plugin_dir(logdir) / entry["file"])
    assert [p.name for p in snapshot.probes] == ["猫", "狗"]
    assert [p["name"] for p in entry["probe_shapes"]] == ["猫", "狗"]

    acc = EventAccumulator(str(logdir), size_guidance={"images": 0})
    acc.Reload()
    images = set(acc.Tags()["images"])
    assert {"attention/猫/model", "attention/狗/model"} <= images

    pages = {p.relative_to(html_dir(logdir)).as_posix() for p in html_dir(logdir).rglob("*.html")}
    assert pages == {page_path(0)} == {"attention/step_00000000.html"}
    page = (html_dir(logdir) / page_path(0)).read_text(encoding="utf-8")
    data = json.loads(page.split("id='attnlog-data'>")[1].split("</script>")[0])  # ASCII escapes
    assert [p["name"] for p in data["probes"]] == ["猫", "狗"] and "cat" in page and "dog" in page

    client = MlflowClient(uri)
    (run,) = client.search_runs([experiment])
    files = set()
    stack = [None]
    while stack:
        for info in client.list_artifacts(run.info.run_id, stack.pop()):
            (stack.append(info.path) if info.is_dir else files.add(info.path))
    assert {page_path(0)} <= files
    # MLflow stores an image as `images/<key, / as ~>+step+<step>+...png`
    keys = {
        f[len("images/") :].split("+step+")[0].replace("~", "/") for f in files if "+step+" in f
    }
    assert keys == {"attention/-u732b/model", "attention/-u72d7/model"}  # the probes' cards
