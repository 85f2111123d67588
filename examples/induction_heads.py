"""Watch induction heads form: a 2-layer attention-only decoder learns to copy, on CPU, in seconds.

    python examples/induction_heads.py --steps 300 --every 20
    tensorboard --logdir runs/induction --samples_per_plugin images=1000

Olsson et al. (2022) found that induction heads (attend to the token *after* an earlier copy of
the current token, then copy it) form in a sudden phase change. Here every training sequence is
a random segment of k tokens repeated over and over (k varies from row to row), so everything
after the first k tokens can be predicted by copying: a previous-token head in layer 0 and an
induction head in layer 1 appear together, around step 250. `AttentionLogger` logs the
`induction` score on attnlog's repeated-random-token probe every `--every` steps; its best head
goes from about 0.06 to above 0.9, in TensorBoard's scalars (`patterns/induction/max`), the
score-matrix images (`patterns/induction`) and the Attention tab.

The model is a GPT-style causal decoder with its MLPs removed (a Llama config: with rotary
positions the previous-token head is quick to learn; with GPT-2's learned absolute positions the
model first finds slower, fixed-offset shortcuts). Everything is built offline: a word-level
tokenizer over 64 made-up tokens (the `tokenizers` library), the config, synthetic data.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from attnlog import AttentionLogger, load  # noqa: E402
from attnlog.layout import read_index  # noqa: E402
from attnlog.probes import induction_probe  # noqa: E402

VOCAB = 64  # ordinary tokens t0..t63
HALF = 16  # longest repeated segment; sequences are 1 + 2 * HALF tokens
PROBE_HALF = 10  # tokens in one copy of the probe


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `t0`..`t63` plus [BOS]/[UNK], built in memory."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {"[BOS]": 0, "[UNK]": 1, **{f"t{i}": i + 2 for i in range(VOCAB)}}
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="[BOS]", unk_token="[UNK]")


class _NoMLP(torch.nn.Module):
    """Stands in for a block's MLP: the model is attention-only, as in Olsson et al."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden)


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """2 layers x 4 heads, width 64, no MLPs: about 42k parameters."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=4,  # replaced below
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2 * HALF + 8,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.bos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        layer.mlp = _NoMLP()
    return model


def batch(generator: torch.Generator, size: int, bos: int) -> torch.Tensor:
    """[size, 1 + 2 * HALF] ids: BOS, then k random ordinary tokens repeated periodically; k
    varies per row (4..HALF), so copying needs an induction head, not a fixed offset."""
    length = 2 * HALF
    ids = torch.randint(2, VOCAB + 2, (size, 1 + length), generator=generator)
    positions = torch.arange(length)
    for row, k in enumerate(torch.randint(4, HALF + 1, (size,), generator=generator).tolist()):
        ids[row, 1:] = ids[row, 1 + positions % k]
    ids[:, 0] = bos
    return ids


def induction_by_step(logdir: str) -> dict[int, float]:
    """The best head's `induction` score at every logged step, read back from the archive."""
    scores = {}
    for entry in read_index(logdir):
        step = entry["step"]
        scores[step] = float(load(logdir, step).scores["induction"].max())
    return scores


def train(
    steps: int,
    every: int,
    logdir: str,
    seed: int = 0,
    lr: float = 3e-3,
    sinks: tuple[str, ...] = ("tensorboard",),
) -> dict[int, float]:
    """Train with the logger attached; returns {step: best induction score}."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed)
    probe = induction_probe(tokenizer, length=PROBE_HALF, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    with AttentionLogger(
        model,
        tokenizer,
        [probe],
        sinks=list(sinks),
        logdir=logdir,
        patterns=["induction", "duplicate_token", "prev_token"],
        views=("head",),
        queue_size=64,  # tiny events: keep every one even when the machine is busy
        # MLflow charts the induction head itself (2 layers x 4 heads: a few metrics an event)
        sink_options={"mlflow": {"head_metrics": True}} if "mlflow" in sinks else None,
    ) as attn_log:
        attn_log.log(0)
        model.train()
        for step in range(1, steps + 1):
            ids = batch(generator, 32, tokenizer.bos_token_id)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step % every == 0 or step == steps:
                attn_log.log(step)
    return induction_by_step(logdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--logdir", default="runs/induction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mlflow", action="store_true", help="also log to MLflow (MLFLOW_TRACKING_URI)"
    )
    args = parser.parse_args()

    torch.set_num_threads(1)  # a 42k-parameter model: more threads only add overhead
    sinks = ("tensorboard", "mlflow") if args.mlflow else ("tensorboard",)
    scores = train(args.steps, args.every, args.logdir, args.seed, sinks=sinks)
    print("step  best induction score")
    for step, value in scores.items():
        print(f"{step:>4}  {value:.2f}  " + "#" * round(40 * value))
    print(f"Attention logged to {args.logdir} (steps {sorted(scores)})")
    print(f"  tensorboard --logdir {args.logdir} --samples_per_plugin images=1000")


if __name__ == "__main__":
    main()
