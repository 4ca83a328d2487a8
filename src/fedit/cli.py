"""`fedit ...` subcommands: thin over the Python API."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fedit.config import iter_keys, load_config, to_toml
from fedit.errors import FeditError


def _config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="TOML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set federation.rounds=5 (repeatable)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedit", description="Federated instruction tuning of LLMs with LoRA (FedIT)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federation in one process (simulation)")
    _config_args(run)
    run.add_argument("--out", help="run folder (default: runs/<config name>)")
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress lines")

    part = sub.add_parser("partition", help="write the test set and one JSONL per client")
    _config_args(part)
    part.add_argument("--out", required=True, help="output folder")

    show = sub.add_parser("config", help="print the effective config as TOML")
    _config_args(show, required=False)

    keys = sub.add_parser("keys", help="list every config key with its type, default and meaning")
    keys.add_argument("--markdown", action="store_true", help="as a Markdown table (README)")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from fedit.progress import Progress, summary_table
    from fedit.simulation import run_federation

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    progress = Progress(enabled=not args.quiet)
    try:
        result = run_federation(cfg, out, resume=args.resume, progress=progress)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; completed rounds are checkpointed in {out / 'checkpoints'}.\n"
            f"continue with: fedit run {args.config} --out {out} --resume",
            file=sys.stderr,
        )
        return 130
    print(summary_table(result.history))
    last = next((h["eval"] for h in reversed(result.history) if h.get("eval")), None)
    if last:
        print("\nheld-out loss per category (last evaluated round):")
        for cat, v in last["per_category"].items():
            print(
                f"  {cat:<24} loss {v['loss']:.4f}  ppl {v['ppl']:8.2f}  tokens {int(v['tokens'])}"
            )
    print(f"\nglobal adapter: {out / 'adapter'}  metrics: {out / 'metrics.jsonl'}")
    return 0


def _cmd_partition(args: argparse.Namespace) -> int:
    from fedit.data.partition import format_stats, make_partition, write_partition
    from fedit.data.records import load_records

    cfg = load_config(args.config, args.overrides)
    records, report = load_records(cfg.data)
    if report.skipped:
        print(f"skipped {len(report.skipped)} bad records; first: {report.skipped[0]}")
    partition = make_partition(records, cfg)
    out = Path(args.out)
    write_partition(partition, out)
    print(format_stats(partition.stats))
    print(f"\nwrote {len(partition.clients)} client files, test.jsonl and stats.json to {out}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    print(to_toml(load_config(args.config, args.overrides)), end="")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    if args.markdown:
        print("| key | type | default | meaning |\n|---|---|---|---|")
    for key, tp, default, help_text in iter_keys():
        if args.markdown:
            cells = [f"`{key}`", tp, f"`{default!r}`", help_text]
            print("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        else:
            print(f"{key} ({tp}, default {default!r})\n    {help_text}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handlers = {
        "run": _cmd_run,
        "partition": _cmd_partition,
        "config": _cmd_config,
        "keys": _cmd_keys,
    }
    try:
        return handlers[args.command](args)
    except FeditError as e:
        print(f"fedit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
