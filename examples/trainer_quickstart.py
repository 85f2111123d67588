"""Quick start: Hugging Face Trainer + AttentionLoggerCallback on the shipped MiniLM (offline).

    python examples/trainer_quickstart.py --steps 60 --every 20
    tensorboard --logdir runs/quickstart --samples_per_plugin images=1000

Fine-tunes MiniLM on a toy pair task ("does sentence B repeat a noun of sentence A?") and logs
attention at step 0, every `--every` steps and at the last step.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from attnlog import AttentionLoggerCallback  # noqa: E402
from attnlog.demo import make_examples, minilm_path  # noqa: E402

PROBES = [
    ("The old cat waited near the river.", "Later the cat was happy."),
    ("Yesterday the doctor found an old letter.", "Then a busy market appeared."),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--logdir", default="runs/quickstart")
    parser.add_argument(
        "--report-to", nargs="+", default=["tensorboard"], help="tensorboard and/or mlflow"
    )
    args = parser.parse_args()

    hf_logging.set_verbosity_error()  # the new classifier head's "newly initialized" notice
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    train = [
        {**tokenizer(a, b, truncation=True, max_length=64), "labels": label}
        for a, b, label in make_examples(args.steps * 8)
    ]
    os.environ["TENSORBOARD_LOGGING_DIR"] = args.logdir  # the Trainer's own TensorBoard folder
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=os.path.join(args.logdir, "trainer"),
            max_steps=args.steps,
            per_device_train_batch_size=8,
            learning_rate=1e-4,
            logging_steps=max(args.every // 2, 1),
            save_strategy="no",
            report_to=args.report_to,
            disable_tqdm=True,
        ),
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[AttentionLoggerCallback(probes=PROBES, every_n_steps=args.every)],
    )
    trainer.train()
    print(f"Attention logged to {args.logdir} (archive: {args.logdir}/plugins/attnlog)")
    print(f"  tensorboard --logdir {args.logdir} --samples_per_plugin images=1000")
    print(f"  attnlog report {args.logdir}")


if __name__ == "__main__":
    main()
