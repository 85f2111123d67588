"""Lightning: a LightningModule around MiniLM, logged with the Lightning AttentionLoggerCallback.

    pip install -e '.[lightning]'        # from the clone's root (attnlog is not on PyPI yet)
    python examples/lightning_module.py --steps 60 --every 20

The callback finds the model as `self.model` and the tokenizer as `self.tokenizer` on the module,
and writes next to Lightning's own TensorBoard logs (one folder for both).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from attnlog.callbacks.lightning import AttentionLoggerCallback  # noqa: E402
from attnlog.demo import make_examples, minilm_path  # noqa: E402

PROBES = [("The old cat waited near the river.", "Later the cat was happy.")]


class PairClassifier(L.LightningModule):
    def __init__(self, examples: int) -> None:
        super().__init__()
        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        self.model.train()
        self.pairs = make_examples(examples)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def train_dataloader(self):
        def collate(rows):
            a, b, labels = zip(*rows)
            batch = self.tokenizer(list(a), list(b), padding=True, return_tensors="pt")
            batch["labels"] = torch.tensor(labels)
            return batch

        return torch.utils.data.DataLoader(self.pairs, batch_size=8, collate_fn=collate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--logdir", default="runs/lightning")
    args = parser.parse_args()

    hf_logging.set_verbosity_error()  # the new classifier head's notice
    hf_logging.disable_progress_bar()
    L.seed_everything(0, verbose=False)
    tb_logger = TensorBoardLogger(args.logdir, name="", version="")
    callback = AttentionLoggerCallback(probes=PROBES, every_n_steps=args.every)
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="auto",
        logger=tb_logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=max(args.every // 2, 1),
        callbacks=[callback],
    )
    trainer.fit(PairClassifier(examples=args.steps * 8))
    if trainer.is_global_zero:
        logdir = Path(tb_logger.log_dir)
        print(f"Attention logged to {logdir} (next to Lightning's own TensorBoard logs)")
        print(f"  tensorboard --logdir {logdir} --samples_per_plugin images=1000")
        print(f"  attnlog report {logdir}")


if __name__ == "__main__":
    main()
