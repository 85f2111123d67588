"""A plain training loop with accelerate and AttentionLogger (no Trainer).

    python examples/custom_loop_accelerate.py --steps 60 --every 20
    accelerate launch examples/custom_loop_accelerate.py   # several processes: rank 0 logs

The logger is built once before training (configuration errors surface there), `log(step)` is
called at step 0, every `--every` steps and at the end, and `close()` writes what is queued.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from attnlog import AttentionLogger  # noqa: E402
from attnlog.demo import make_examples, minilm_path  # noqa: E402

PROBES = [("The old cat waited near the river.", "Later the cat was happy.")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--logdir", default="runs/custom_loop")
    args = parser.parse_args()

    hf_logging.set_verbosity_error()  # the new classifier head's notice
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    accelerator = Accelerator()
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model.train()
    pairs = make_examples(args.steps * 8)

    def collate(rows):
        a, b, labels = zip(*rows)
        batch = tokenizer(list(a), list(b), padding=True, truncation=True, return_tensors="pt")
        batch["labels"] = torch.tensor(labels)
        return batch

    loader = torch.utils.data.DataLoader(pairs, batch_size=8, shuffle=True, collate_fn=collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    # The wrapped model is fine: the logger unwraps DDP/compile and uses the live weights.
    attn_log = AttentionLogger(
        model,
        tokenizer,
        PROBES,
        sinks=["tensorboard"],
        logdir=args.logdir,
        is_main_process=accelerator.is_main_process,
    )
    attn_log.log(0)
    step = 0
    while step < args.steps:
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % args.every == 0 or step == args.steps:
                attn_log.log(step)
            if step == args.steps:
                break
    attn_log.close()
    if accelerator.is_main_process:
        print(f"trained {step} steps, last loss {loss.item():.3f}")
        print(f"Attention logged to {args.logdir} (steps {sorted(attn_log.logged_steps)})")
        print(f"  tensorboard --logdir {args.logdir} --samples_per_plugin images=1000")
        print(f"  attnlog report {args.logdir}")


if __name__ == "__main__":
    main()
