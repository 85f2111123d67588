"""The docs run: every Python block of README.md, CHANGELOG.md and docs/*.md runs, and every
`attnlog` command in them parses.

Each Python block runs in a fresh namespace that holds what a reader's script would already have
(`model`, `tokenizer`, `probes`, a tiny dataset and loader, `args` with few steps), in a scratch
folder that holds a logged run at `runs/exp1` (steps 0 and 100) and an MLflow store. A block that
cannot run here says why in the doc itself, on the line above its fence:
`<!-- skip: needs a GPU -->`; it is then skipped with that reason.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
PROBES = ["The cat sat on the mat.", ("The cat sat.", "It was happy.")]
FENCE = re.compile(r"^```(\S*)\s*$")
SKIP = re.compile(r"^<!--\s*skip:\s*(.+?)\s*-->$")
SHELLS = {"bash", "sh", "shell", "console"}


@dataclass(frozen=True)
class Block:
    """A fenced code block: where it starts (the fence's line), its language and text."""

    path: Path
    line: int
    lang: str
    code: str
    skip: str | None = None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def read_blocks(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown file, with the skip reason written above each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, start, lang = [], None, ""
    for number, text in enumerate(lines, start=1):
        fence = FENCE.match(text)
        if fence is None:
            continue
        if start is None:
            start, lang = number, fence.group(1)
            continue
        above = [s.strip() for s in lines[: start - 1] if s.strip()][-1:]
        reason = SKIP.match(above[0]) if above else None
        code = "\n".join(lines[start : number - 1])
        blocks.append(Block(path, start, lang, code, reason.group(1) if reason else None))
        start = None
    assert start is None, f"{path}:{start}: unclosed code fence"
    return blocks


ALL_BLOCKS = [b for path in DOCS for b in read_blocks(path)]
PYTHON = [b for b in ALL_BLOCKS if b.lang == "python"]


def test_every_fence_names_its_language():
    """A block without a language would escape both checks below."""
    assert [b.id for b in ALL_BLOCKS if not b.lang] == []
    assert len(PYTHON) >= 10


def test_a_block_marked_skip_carries_its_reason(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- skip: needs a GPU -->\n```python\nimport torch\n```\n\n```python\n1\n```\n"
    )
    first, second = read_blocks(page)
    assert (first.line, first.skip, first.code) == (2, "needs a GPU", "import torch")
    assert second.skip is None


# ---- Python blocks ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def doc_world(tmp_path_factory, minilm):
    """Made once: a logged run at `runs/exp1` (steps 0 and 100) and an MLflow store with its
    tables created (creating them is the slow part of a new sqlite store)."""
    from mlflow import MlflowClient

    from attnlog import AttentionLogger

    folder = tmp_path_factory.mktemp("doc_world")
    model, tokenizer = minilm
    logdir = folder / "runs" / "exp1"
    with AttentionLogger(
        model, tokenizer, PROBES, sinks=[], views=(), logdir=logdir, writer="thread"
    ) as log:
        log.log(0)
        log.log(100)
    MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder


def training_set(tokenizer, size: int = 8) -> list[dict]:
    """A tiny labelled sentence set: one Trainer epoch is one step at the default batch size."""
    texts = [f"Sentence number {i} is about a cat." for i in range(size)]
    return [{**tokenizer(t), "labels": i % 2} for i, t in enumerate(texts)]


@pytest.fixture
def namespace(doc_world, tmp_path, monkeypatch, minilm_path, minilm):
    """What a block may take as given, in a scratch folder that is the current directory."""
    import torch
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    from attnlog.patterns import PATTERNS

    shutil.copytree(doc_world, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.delenv(name, raising=False)
    tokenizer = minilm[1]
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    data = training_set(tokenizer)
    batch = tokenizer(["A cat.", "A dog sat on the mat."], padding=True, return_tensors="pt")
    batch = {**batch, "labels": torch.tensor([0, 1])}
    registered = dict(PATTERNS)
    yield {
        "__name__": "__doc__",
        "model": model,
        "tokenizer": tokenizer,
        "probes": list(PROBES),
        "ds": data,
        "train_ds": data,
        "loader": [batch, batch],
        "optimizer": torch.optim.SGD(model.parameters(), lr=1e-3),
        "args": TrainingArguments(output_dir="out", max_steps=2, report_to="none"),
    }
    PATTERNS.clear()  # a block's register_pattern must not reach later tests
    PATTERNS.update(registered)
    _reset_mlflow()


def _reset_mlflow() -> None:
    """The Trainer's MLflow callback sets the process-wide tracking URI and may leave a run."""
    if "mlflow" not in sys.modules:
        return
    mlflow = sys.modules["mlflow"]
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.id)
def test_python_block_runs(block, request):
    if block.skip:
        pytest.skip(block.skip)
    scope = request.getfixturevalue("namespace")
    # The doc's own line numbers in tracebacks; a name that is no file keeps pytest from
    # printing the whole page above the failing line.
    code = compile("\n" * block.line + block.code, f"<{block.id.split(':')[0]}>", "exec")
    try:
        exec(code, scope)
    finally:
        _close_loggers(scope)


def _close_loggers(scope: dict) -> None:
    """A block may leave a logger open (a constructor shown alone); close it like a script's exit."""
    from attnlog import AttentionLogger

    for value in scope.values():
        if isinstance(value, AttentionLogger):
            value.close()


# ---- attnlog commands ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    where: str
    argv: tuple[str, ...]


def shell_commands(block: Block) -> list[Command]:
    """Every `attnlog ...` command of a shell block (also after `&&`, `;`, `|`)."""
    found = []
    text = block.code.replace("\\\n", " ")
    for offset, line in enumerate(text.splitlines(), start=1):
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in [*words, ";"]:
            if word not in ("&&", "||", ";", "|"):
                command.append(word)
                continue
            while command and re.fullmatch(r"[A-Z_]+=.*", command[0]):
                command.pop(0)  # VAR=value before the command
            if command[:1] == ["attnlog"]:
                found.append(Command(f"{block.id}+{offset}", tuple(command[1:])))
            command = []
    return found


COMMANDS = [c for b in ALL_BLOCKS if b.lang in SHELLS for c in shell_commands(b)]
INLINE = re.compile(r"`(attnlog [^`]+)`")


def inline_commands() -> list[Command]:
    """`attnlog <command> ...` in running text (synopses with [optional] parts included)."""
    found = []
    for path in DOCS:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for match in INLINE.finditer(line):
                words = match.group(1).replace("\\|", "|").split()
                if re.fullmatch(r"[a-z]+", words[1]):
                    where = f"{path.relative_to(ROOT)}:{number}"
                    found.append(Command(where, tuple(words[1:])))
    return found


def parse(argv: tuple[str, ...]) -> argparse.Namespace:
    """attnlog's own parser; its errors exit, which is turned into a failure naming them."""
    from attnlog.cli import build_parser

    try:
        return build_parser().parse_args(list(argv))
    except SystemExit as exit_:
        pytest.fail(f"`attnlog {shlex.join(argv)}` does not parse (exit {exit_.code})")


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 10
    assert {c.argv[0] for c in COMMANDS} >= {"demo", "snapshot", "export", "compare", "sync"}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.where)
def test_command_parses(command):
    assert parse(command.argv).command == command.argv[0]


def options_of(command: str) -> set[str]:
    """The flags that `attnlog <command>` accepts."""
    from attnlog.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert command in sub.choices, f"attnlog has no command {command!r}"
    return {flag for action in sub.choices[command]._actions for flag in action.option_strings}


@pytest.mark.parametrize("command", inline_commands(), ids=lambda c: c.where)
def test_command_in_the_text_names_real_flags(command):
    flags = {w.strip("[]").split("=")[0] for w in command.argv if w.strip("[").startswith("--")}
    assert flags <= options_of(command.argv[0])
