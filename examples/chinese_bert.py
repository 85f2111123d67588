"""Chinese BERT with added special tokens, the seed blog post's case, logged while it trains.

    python examples/chinese_bert.py --steps 40 --every 10

The post runs bertviz once on `bert-base-chinese` over `title + key_word` with
`[unused1]`..`[unused3]` added as special tokens. Here the same set-up trains: a tiny random
BERT over a character vocabulary built on the fly (no download), learning whether the keyword
occurs in the title. For the real model, load `bert-base-chinese` instead of `build_tokenizer`/
`BertConfig`, or look once with `attnlog snapshot /downloads/bert-base-chinese --probe ...
--add-special-tokens [unused1] [unused2] [unused3] --out views`.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast  # noqa: E402

from attnlog import AttentionLogger, capture  # noqa: E402
from attnlog.probes import Probe  # noqa: E402

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ADDED = ["[unused1]", "[unused2]", "[unused3]"]
CHARACTERS = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说"
    "产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点"
    "从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原"
    "又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革"
    "位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强"
    "放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交"
    "受联什认六共权收证改清美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离"
    "华科票市股价涨跌银行手机发布新款屏折叠汽车芯片游戏视频网络平台用户数据智能城球赛冠军旅游酒店美食"
)
PUNCTUATION = "，。！？、；：“”‘’（）《》【】—…·"
LATIN = "0123456789abcdefghijklmnopqrstuvwxyz"

TITLES = [
    "华为发布新款折叠屏手机",
    "银行股价今日大涨",
    "新能源汽车销量再创新高",
    "国产芯片进入量产阶段",
    "世界杯冠军球队回国",
    "城市旅游市场全面回暖",
    "视频平台用户数据增长",
    "游戏公司推出新款智能设备",
]
KEYWORDS = ["手机", "股价", "汽车", "芯片", "冠军", "旅游", "视频", "游戏", "银行", "数据"]

# title + keyword, as the post feeds them; [unused1] marks where the keyword starts.
PROBES = [
    Probe("华为发布新款折叠屏手机[unused1]手机", name="title_keyword"),
    Probe("银行股价今日大涨。", "[unused2]汽车", name="title_pair"),
]


def build_tokenizer(folder: Path) -> BertTokenizerFast:
    """A character vocabulary: one token per Chinese character, like bert-base-chinese."""
    vocab = list(dict.fromkeys(SPECIAL + ADDED + list(CHARACTERS + PUNCTUATION + LATIN)))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast.from_pretrained(
        folder, tokenize_chinese_chars=True, do_lower_case=True
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ADDED})  # as in the post
    return tokenizer


def make_examples(count: int, seed: int = 0) -> list[tuple[str, int]]:
    """`title[unused1]keyword`, label 1 when the keyword occurs in the title."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        title = rng.choice(TITLES)
        keyword = rng.choice(KEYWORDS)
        examples.append((f"{title}[unused1]{keyword}", int(keyword in title)))
    return examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--logdir", default="runs/chinese_bert")
    args = parser.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_tokenizer(Path(folder))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    model.resize_token_embeddings(len(tokenizer))  # a no-op here; needed when tokens are new
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    data = make_examples(args.steps * 16)

    attn_log = AttentionLogger(
        model, tokenizer, PROBES, sinks=["tensorboard"], logdir=args.logdir, views=("head", "model")
    )
    attn_log.log(0)
    model.train()
    for step in range(1, args.steps + 1):
        texts, labels = zip(*data[(step - 1) * 16 : step * 16])
        batch = tokenizer(list(texts), padding=True, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor(labels)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % args.every == 0 or step == args.steps:
            attn_log.log(step)
    attn_log.close()

    probe = capture(model, tokenizer, PROBES[:1]).probes[0]
    marked = [f"<{t}>" if special else t for t, special in zip(probe.tokens, probe.special)]
    print(f"trained {args.steps} steps, last loss {loss.item():.3f}")
    print("tokens (<special>):", " ".join(marked))
    print(f"Attention logged to {args.logdir} (steps {sorted(attn_log.logged_steps)})")
    print(f"  tensorboard --logdir {args.logdir} --samples_per_plugin images=1000")
    print(f"  attnlog report {args.logdir}")


if __name__ == "__main__":
    main()
