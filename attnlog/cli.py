"""The `attnlog` command: demo, snapshot, report, compare, export, sync."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

BROWSE_HINT = """\
Browse it:
  tensorboard --logdir {logdir} --samples_per_plugin images=1000
  mlflow ui --backend-store-uri {tracking_uri}
(--samples_per_plugin images=1000 keeps up to 1000 logged steps per image; TensorBoard shows
only 10 without it, and `images=0` shows none in TensorBoard 2.21.)"""


class _Parser(argparse.ArgumentParser):
    """Bad flags give one line, not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="attnlog",
        description="Watch transformer attention change while the model trains.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_demo(sub)
    _add_snapshot(sub)
    _add_report(sub)
    _add_compare(sub)
    _add_export(sub)
    _add_sync(sub)
    return parser


def _add_demo(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="fine-tune the shipped MiniLM on a small task with the callback "
        "(150 steps: a few minutes on 2 CPU cores)",
        description="Fine-tune the shipped pretrained MiniLM on a built-in sentence-pair task "
        "('does sentence B repeat a noun of sentence A?') with AttentionLoggerCallback, logging "
        "to TensorBoard and MLflow, then print what changed and how to browse it.",
    )
    demo.add_argument("--steps", type=_positive, default=150, help="training steps (default 150)")
    demo.add_argument("--every", type=_positive, default=25, help="log every N steps (default 25)")
    demo.add_argument("--logdir", default="runs", help="TensorBoard folder (default ./runs)")
    demo.add_argument(
        "--tracking-uri",
        default="sqlite:///mlflow.db",
        help="MLflow tracking URI (default sqlite:///mlflow.db)",
    )
    demo.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="training device"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _add_snapshot(sub) -> None:
    snap = sub.add_parser(
        "snapshot",
        help="one-shot views, heatmaps and scores for a local model folder",
        description="Load a local Hugging Face model folder (offline), run the probes once, and "
        "write to --out: <probe>/{head,model,neuron}_view.html, <probe>/*.png heatmaps, "
        "patterns/*.png, scores.json and an archive that `attnlog report OUT` reads. Prints the "
        "heads with the strongest patterns.",
    )
    snap.add_argument("model_dir", help="a local model folder (config.json, weights, tokenizer)")
    snap.add_argument("--probe", action="append", required=True, help="probe text (repeatable)")
    snap.add_argument(
        "--pair", action="append", help="sentence B for the probe at the same position"
    )
    snap.add_argument(
        "--add-special-tokens",
        nargs="+",
        default=[],
        metavar="TOK",
        help="extra special tokens, e.g. [unused1]",
    )
    snap.add_argument("--out", required=True, help="output folder")
    snap.add_argument(
        "--max-length", type=_positive, default=None, help="truncate probes to N tokens"
    )


def _add_report(sub) -> None:
    report = sub.add_parser(
        "report",
        help="summarise an archive: logged steps and the strongest heads per pattern",
        description="Read <logdir>/plugins/attnlog and print, for the last (or --step) logged "
        "step, the strongest head of every pattern and the head labels.",
    )
    report.add_argument("logdir", help="the logger's logdir (holds plugins/attnlog)")
    report.add_argument("--step", type=int, default=None, help="a logged step (default: the last)")
    report.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_compare(sub) -> None:
    compare = sub.add_parser(
        "compare",
        help="compare two runs (logdirs or MLflow runs) head by head; --out writes an HTML page",
        description="Print the heads whose pattern scores differ most between two runs' last "
        "steps. A run is a logdir, `runs:/<run id>` or a bare MLflow run id (with "
        "--tracking-uri or MLFLOW_TRACKING_URI). --out FILE.html writes one self-contained page: "
        "the heads that changed most, both runs' score matrices side by side and their "
        "difference; for MLflow runs the page is also logged to both runs.",
    )
    compare.add_argument("run_a", help="first run: a logdir, runs:/<id> or an MLflow run id")
    compare.add_argument("run_b", help="second run")
    compare.add_argument("--top", type=_positive, default=10, help="rows to print (default 10)")
    compare.add_argument("--out", default=None, help="write the comparison page here (.html)")
    compare.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)"
    )
    compare.add_argument(
        "--no-log", action="store_true", help="do not log the page to the MLflow runs"
    )


def _add_export(sub) -> None:
    export = sub.add_parser(
        "export",
        help="a figure for a paper (SVG or PNG) from a run's archive",
        description="Draw, from <logdir>/plugins/attnlog, one head's token-labelled heatmap "
        "(--layer, --head), a layer's heads (--layer), or a pattern's layer x head matrix "
        "(--pattern). SVG keeps the tokens as text; PNG is drawn at --dpi. Offline.",
    )
    export.add_argument("logdir", help="the logger's logdir (or an `attnlog snapshot` folder)")
    export.add_argument("--out", required=True, help="FILE.svg or FILE.png")
    export.add_argument("--step", type=int, default=None, help="a logged step (default: last)")
    export.add_argument("--probe", default=None, help="probe name (default: the first)")
    export.add_argument("--layer", type=int, default=None, help="layer to draw")
    export.add_argument("--head", type=int, default=None, help="one head (default: all heads)")
    export.add_argument("--pattern", default=None, help="draw this pattern's score matrix")
    export.add_argument("--dpi", type=_positive, default=150, help="PNG resolution (default 150)")
    export.add_argument("--words", action="store_true", help="attention between words")


def _add_sync(sub) -> None:
    sync = sub.add_parser(
        "sync",
        help="send MLflow events spooled while the tracking server was unreachable",
        description="Send what the MLflow sink spooled under <logdir>/plugins/attnlog/mlflow_spool "
        "to the MLflow server you name (--tracking-uri, else MLFLOW_TRACKING_URI). The server "
        "each entry recorded is never used on its own: with neither given, sync sends nothing "
        "and lists the servers the entries name; entries recorded for another server are sent "
        "to yours, and it says so. An entry may send only the files spooled with it; one that "
        "names any other file (outside its own folder) is refused, moved to mlflow_spool/failed/ "
        "and counted. One sync at a time per spool: a second one exits with a message.",
    )
    sync.add_argument("logdir", help="the logger's logdir")
    sync.add_argument(
        "--tracking-uri",
        default=None,
        help="the MLflow server to send to (default: MLFLOW_TRACKING_URI; required if unset)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    handler = {
        "demo": _demo,
        "snapshot": _snapshot,
        "report": _report,
        "compare": _compare,
        "export": _export,
        "sync": _sync,
    }[args.command]
    try:
        return handler(args) or 0
    except (ValueError, FileNotFoundError, ModuleNotFoundError, OSError) as ex:
        print(f"attnlog {args.command}: error: {ex}", file=sys.stderr)
        return 1


def _demo(args: argparse.Namespace) -> int:
    from attnlog.demo import run_demo

    print(f"attnlog demo: fine-tuning MiniLM for {args.steps} steps, logging every {args.every}")
    result = run_demo(
        steps=args.steps,
        every=args.every,
        logdir=args.logdir,
        tracking_uri=args.tracking_uri,
        device=args.device,
        seed=args.seed,
    )
    print(
        f"\nDone: training loss {result['train_loss']:.3f}, held-out accuracy {result['accuracy']:.0%}"
    )
    if result["missing_steps"]:
        print(
            f"Not written (see the warnings above): the events of steps {result['missing_steps']}"
        )
    if result["changes"]:
        print("Heads whose attention changed most:")
        for row in result["changes"]:
            print(
                f"  {row['pattern']:<24} layer {row['layer']} head {row['head']:<3} "
                f"{row['before']:.2f} -> {row['after']:.2f}  (steps {row['from_step']} -> {row['to_step']})"
            )
    for row in result["cross_sentence"]:
        print(
            "The task needs attention across the two sentences: `identical_token_other` of "
            f"layer {row['layer']} head {row['head']} went {row['before']:.2f} -> {row['after']:.2f}"
        )
    print(
        f"\nLogged to {result['logdir']} and {result['tracking_uri']} (run {result['run_name']})."
    )
    print(BROWSE_HINT.format(logdir=args.logdir, tracking_uri=args.tracking_uri))
    return 0


def _snapshot(args: argparse.Namespace) -> int:
    from attnlog.oneshot import write_snapshot

    pairs = args.pair or []
    if len(pairs) > len(args.probe):
        raise ValueError(
            "more --pair than --probe values; each --pair belongs to the --probe before it"
        )
    probes = [(p, pairs[i]) if i < len(pairs) else p for i, p in enumerate(args.probe)]
    summary = write_snapshot(
        args.model_dir,
        probes,
        Path(args.out),
        special_tokens=args.add_special_tokens,
        max_length=args.max_length,
    )
    print(summary)
    return 0


def _report(args: argparse.Namespace) -> int:
    from attnlog.report import report

    text = report(args.logdir, step=args.step, as_json=args.json)
    print(text)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from attnlog.compare import compare_runs

    text, written = compare_runs(
        args.run_a,
        args.run_b,
        out=args.out,
        top=args.top,
        tracking_uri=args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
        log_to_runs=not args.no_log,
    )
    print(text)
    for line in written:
        print(line)
    return 0


def _export(args: argparse.Namespace) -> int:
    from attnlog.export import export

    path = export(
        args.logdir,
        args.out,
        step=args.step,
        probe=args.probe,
        layer=args.layer,
        head=args.head,
        pattern=args.pattern,
        dpi=args.dpi,
        words=args.words,
    )
    print(f"attnlog export: wrote {path}")
    return 0


def _sync(args: argparse.Namespace) -> int:
    from attnlog.layout import default_spool_dir, plugin_dir
    from attnlog.sinks.spool import Spool, sync

    if not plugin_dir(args.logdir).is_dir():
        raise FileNotFoundError(
            f"no attnlog run in {args.logdir} (no {plugin_dir(args.logdir)}); pass the logdir "
            "the logger wrote to"
        )
    spool = default_spool_dir(args.logdir)
    if not Spool(spool).entries():
        print(f"attnlog sync: sent 0 spooled entries: {spool} holds none")
        return 0
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    other = {s: n for s, n in Spool(spool).servers().items() if uri and s != uri}
    if other:
        named = ", ".join(f"{s} ({n})" for s, n in sorted(other.items()))
        print(
            f"attnlog sync: sending to {uri}, as given; entries recorded for another server: {named}"
        )
    try:
        sent = sync(spool, tracking_uri=uri)
    except (ConnectionError, RuntimeError) as exc:
        print(f"attnlog sync: error: {exc}", file=sys.stderr)
        return 1
    print(f"attnlog sync: sent {sent} spooled entr{'y' if sent == 1 else 'ies'} from {spool}")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _version() -> str:
    from attnlog import __version__

    return f"attnlog {__version__}"


if __name__ == "__main__":
    sys.exit(main())
