"""`fedit ...` subcommands: thin over the Python API."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fedit.cli.answers import (
    cmd_chat,
    cmd_eval,
    cmd_generate,
    cmd_judge_check,
    cmd_serve,
    cmd_votes,
)
from fedit.config import ConfigError, iter_keys, load_config, to_toml
from fedit.engines.flower.supernode import main as supernode_main
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


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a run folder (uses its config and adapter/) or a TOML config")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--adapter", help="adapter folder (default: the run's adapter/)")
    which.add_argument("--base", action="store_true", help="the base model alone, no adapter")
    which.add_argument(
        "--client", type=int, metavar="N",
        help="client N's personal model (a run with personalization.method set)",
    )  # fmt: skip
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )  # fmt: skip


def _interrupted(message: str) -> int:
    """Ctrl-C: say what was kept and how to continue; 130 is the shell's code for SIGINT."""
    print(message, file=sys.stderr)
    return 130


def _version() -> str:
    from fedit import __version__

    return __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedit", description="Federated instruction tuning of LLMs with LoRA (FedIT)."
    )
    parser.add_argument("--version", action="version", version=f"fedit {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federation in one process (simulation)")
    _config_args(run)
    run.add_argument("--out", help="run folder (default: runs/<config name>)")
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress lines")

    part = sub.add_parser("partition", help="write the test set and one JSONL per client")
    _config_args(part)
    part.add_argument("--out", required=True, help="output folder (empty, or see --replace)")
    part.add_argument("--replace", action="store_true", help="replace what a non-empty --out holds")

    show = sub.add_parser("config", help="print the effective config as TOML")
    _config_args(show, required=False)

    cmp = sub.add_parser(
        "compare", help="base vs local-only vs FedIT vs centralized on one partition"
    )
    _config_args(cmp)
    cmp.add_argument("--out", help="comparison folder (default: runs/compare-<config name>)")
    cmp.add_argument("--quiet", action="store_true", help="no progress lines")
    cmp.add_argument(
        "--seeds", type=int, nargs="+", metavar="SEED",
        help="run the comparison once per seed (OUT/seed-N) and report mean ± std per arm",
    )  # fmt: skip

    ev = sub.add_parser("eval", help="score a base model or base + adapter on the held-out split")
    _source_args(ev)
    ev.add_argument("--out", help="folder for eval.json, answers and the judge cache")
    ev.add_argument("--no-generate", action="store_true", help="loss only, no answers")
    ev.add_argument(
        "--suite", action="append", default=[], metavar="NAME",
        help="score on a question set instead (repeatable): dolly-test, vicuna80, mt-bench, "
        "self-instruct, fed-aya, vicuna80-LANG, or your own .jsonl",
    )  # fmt: skip

    gen = sub.add_parser("generate", help="answer one prompt or a JSONL file of prompts")
    _source_args(gen)
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one instruction")
    what.add_argument(
        "--prompts", help="JSONL with 'instruction' (and optional 'input'/'context') per line"
    )
    gen.add_argument("--input", default="", help="context for --prompt")
    gen.add_argument("--output", help="write JSONL answers here (default: stdout)")
    gen.add_argument("--max-new-tokens", type=int, help="default: generate.max_new_tokens")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")

    chat = sub.add_parser("chat", help="talk to base + adapter in the terminal")
    _source_args(chat)
    chat.add_argument("--max-new-tokens", type=int, help="default: generate.max_new_tokens")
    chat.add_argument("--temperature", type=float, default=0.0)

    srv = sub.add_parser(
        "serve", help="OpenAI-compatible API and web page over one or more adapters"
    )
    srv.add_argument(
        "sources", nargs="+", metavar="SOURCE",
        help="a run folder, a `fedit compare` folder (one model per arm), or NAME=PATH; "
        "the base model is also served as 'base'",
    )  # fmt: skip
    srv.add_argument("--adapter", help="adapter folder for a single SOURCE (default its adapter/)")
    srv.add_argument(
        "--client", type=int, action="append", default=[], metavar="N",
        help="also serve client N's personal model of each run SOURCE as NAME/client-N "
        "(repeatable)",
    )  # fmt: skip
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (0 = any free one)")
    srv.add_argument("--model-id", help="model name of a single SOURCE (default: its folder name)")
    srv.add_argument("--max-new-tokens", type=int, help="default: generate.max_new_tokens")
    srv.add_argument(
        "--cors-origin", action="append", default=[], metavar="ORIGIN",
        help="origin allowed to call the API from a browser (repeatable; default any)",
    )  # fmt: skip
    srv.add_argument(
        "--votes", metavar="FILE",
        help="SQLite file of the page's blind votes (default: votes.sqlite in the first "
        "SOURCE folder; 'none' turns voting off)",
    )  # fmt: skip

    jc = sub.add_parser(
        "judge-check", help="the configured LLM judge against GPT-4's recorded Vicuna-80 reviews"
    )
    jc.add_argument("config", nargs="?", help="a TOML config or run folder (its judge.*)")
    jc.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. judge.base_url=URL")  # fmt: skip
    jc.add_argument("--data", help="the Vicuna-80 folder (default: eval/vicuna80 in "
                    "$FEDIT_DATA_DIR)")  # fmt: skip
    jc.add_argument("--limit", type=int, default=0,
                    help="a seeded sample of this many recorded pairs (default: all)")  # fmt: skip
    jc.add_argument("--out", default="runs/judge-check",
                    help="folder for the report and the judge's cache")  # fmt: skip

    vot = sub.add_parser("votes", help="people's blind votes of fedit serve: win rates, ranking")
    vot.add_argument("where", help="a folder holding votes.sqlite (or the file itself)")
    vot.add_argument("--judge", action="store_true",
                     help="also ask the LLM judge (judge.* of the folder's config.toml or "
                     "--set) about the same pairs: its agreement with the votes")  # fmt: skip
    vot.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. judge.base_url=URL")  # fmt: skip
    vot.add_argument("--draws", type=int, default=1000, help="bootstrap draws (default 1000)")
    vot.add_argument("--out", help="also write the report (JSON) to this file")

    exp = sub.add_parser(
        "export", help="the adapter merged into the base as a HF model folder (or adapter only)"
    )
    exp.add_argument("source", help="a run folder (its config.toml and adapter/)")
    exp.add_argument("--out", required=True, help="folder to write (new, empty, or an export)")
    exp.add_argument("--adapter", help="adapter folder (default: the run's adapter/)")
    exp.add_argument("--client", type=int, metavar="N", help="client N's personal model")
    exp.add_argument(
        "--adapter-only", action="store_true",
        help="the PEFT adapter with tokenizer, model card and prompt format, not merged",
    )  # fmt: skip
    exp.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="weights of the merged model (default float32)",
    )  # fmt: skip

    fed = sub.add_parser(
        "federate", help="run the config over real Flower processes on this machine (loopback)"
    )
    _config_args(fed)
    fed.add_argument(
        "--nodes",
        type=int,
        help="SuperNodes to start, each holding a block of the clients (default: one per client)",
    )
    fed.add_argument("--out", help="run folder (default: runs/<config name>-flower)")
    fed.add_argument(
        "--secure", action="store_true", help="TLS (test CA) and SuperNode authentication"
    )
    fed.add_argument("--plain-supernodes", action="store_true",
                     help="Flower's stock flower-supernode (a ClientApp process per message) "
                     "instead of fedit supernode")  # fmt: skip
    sub.add_parser(  # `main` passes the arguments on as they are
        "supernode", help="Flower's SuperNode with a cheap round (flower-supernode's arguments)"
    )

    fapp = sub.add_parser(
        "flower-app", help="write the Flower app folder for a multi-host deployment"
    )
    _config_args(fapp)
    fapp.add_argument("--app", required=True, help="app folder to write (pyproject.toml)")
    fapp.add_argument("--out", required=True, help="run folder on the SuperLink host")
    fapp.add_argument("--superlink", help="HOST:PORT of the SuperLink (writes flwr-home/)")
    fapp.add_argument("--root-certificates", help="CA certificate for a TLS SuperLink")

    certs = sub.add_parser(
        "flower-certs", help="make a test CA, SuperLink certificate and SuperNode keys"
    )
    certs.add_argument("folder", help="where to write them")
    certs.add_argument("--nodes", type=int, default=2, help="node key pairs (default 2)")
    certs.add_argument(
        "--host", action="append", default=[],
        help="SuperLink address the certificate is valid for (repeatable; default 127.0.0.1 "
        "and localhost)",
    )  # fmt: skip

    keys = sub.add_parser("keys", help="list every config key with its type, default and meaning")
    keys.add_argument("--markdown", action="store_true", help="as a Markdown table (README)")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from fedit.progress import Progress, summary_table
    from fedit.recipe import run_federation

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    progress = Progress(enabled=not args.quiet)
    try:
        result = run_federation(cfg, out, resume=args.resume, progress=progress)
    except KeyboardInterrupt:
        return _interrupted(
            f"\ninterrupted; completed rounds are checkpointed in {out / 'checkpoints'}.\n"
            f"continue with: fedit run {args.config} --out {out} --resume",
        )
    print(summary_table(result.history))
    last = next((h["eval"] for h in reversed(result.history) if h.get("eval")), None)
    if last:
        print("\nheld-out loss per category (last evaluated round):")
        for cat, v in last["per_category"].items():
            print(
                f"  {cat:<24} loss {v['loss']:.4f}  ppl {v['ppl']:8.2f}  tokens {int(v['tokens'])}"
            )
    own = (last or {}).get("own_data")
    if own:
        print(
            f"\neach client's own held-out data ({own['n']} clients): mean loss {own['mean']:.4f}, "
            f"worst {own['worst']:.4f} (client {own['worst_name']})"
        )
    print(f"\nglobal adapter: {out / 'adapter'}  metrics: {out / 'metrics.jsonl'}")
    return 0


def _cmd_partition(args: argparse.Namespace) -> int:
    from fedit.data.partition import make_partition, partition_target, write_partition
    from fedit.data.records import load_records
    from fedit.data.stats import format_stats

    cfg = load_config(args.config, args.overrides)
    out = partition_target(Path(args.out), args.replace)
    records, report = load_records(cfg.data)
    if report.skipped:
        print(f"skipped {len(report.skipped)} bad records; first: {report.skipped[0]}")
    partition = make_partition(records, cfg)
    write_partition(partition, out, args.replace)
    print(format_stats(partition.stats))
    print(
        f"\nwrote {len(partition.clients)} client files, test.jsonl, stats.json and heatmap.png "
        f"(client x category shares) to {out}"
    )
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from fedit.evaluate.compare import run_compare
    from fedit.evaluate.report import markdown
    from fedit.progress import Progress

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or Path("runs") / f"compare-{Path(args.config).stem}")
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds: {args.seeds} repeats a seed")
    try:
        if args.seeds:
            from fedit.evaluate import seeds

            summary = seeds.run_seeds(cfg, out, args.seeds, Progress(enabled=not args.quiet))
            print(seeds.markdown(summary))
            print(f"table: {out / 'seeds.md'}  data: {out / 'seeds.json'}  each seed: {out}/seed-N")
            return 0
        results = run_compare(cfg, out, Progress(enabled=not args.quiet))
    except KeyboardInterrupt:
        return _interrupted(
            f"\ninterrupted; finished arms and checkpoints are kept in {out}.\n"
            f"continue with: fedit compare {args.config} --out {out}",
        )
    print(markdown(results))
    print(f"table: {out / 'results.md'}  data: {out / 'results.json'}  plots: {out}/*.png")
    return 0


def _cmd_federate(args: argparse.Namespace) -> int:
    from fedit.engines.flower.launch import federate
    from fedit.progress import summary_table

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or Path("runs") / f"{Path(args.config).stem}-flower")
    try:
        summary = federate(cfg, out, args.nodes, secure=args.secure,
                           plain_nodes=args.plain_supernodes)  # fmt: skip
    except KeyboardInterrupt:
        return _interrupted(
            f"\ninterrupted; every Flower process was stopped. Completed rounds are in "
            f"{out / 'checkpoints'}; the same command resumes.",
        )
    print(summary_table(summary["history"]))
    print(f"\nglobal adapter: {out / 'adapter'}  metrics: {out / 'metrics.jsonl'}")
    return 0


def _cmd_flower_app(args: argparse.Namespace) -> int:
    from fedit.engines.flower.launch import FEDERATION, write_app, write_federation

    cfg = load_config(args.config, args.overrides)
    app = write_app(Path(args.app), cfg, Path(args.out))
    print(f"wrote {app / 'pyproject.toml'} (run folder on the SuperLink host: {args.out})")
    if args.superlink:
        ca = Path(args.root_certificates) if args.root_certificates else None
        write_federation(app / "flwr-home", args.superlink, ca)
        print(f"wrote {app / 'flwr-home' / 'config.toml'}: federation {FEDERATION!r}")
        print(f"next: FLWR_HOME={app / 'flwr-home'} flwr run {app} {FEDERATION} --stream")
    return 0


def _cmd_flower_certs(args: argparse.Namespace) -> int:
    from fedit.engines.flower.certs import make_pki

    hosts = args.host or ["127.0.0.1", "localhost"]
    paths = make_pki(Path(args.folder), args.nodes, hosts)
    for name, path in paths.items():
        if name != "ca_key":
            print(f"{name:<12} {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import tempfile

    from fedit.cli.answers import personal_folder
    from fedit.export import export

    adapter = Path(args.adapter) if args.adapter else None
    with tempfile.TemporaryDirectory(prefix="fedit-personal-") as tmp:
        if args.client is not None:
            adapter = personal_folder(Path(args.source), args.client, Path(tmp), adapter)
        export(args.source, Path(args.out), adapter, args.adapter_only, args.dtype)
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["supernode"]:  # flower-supernode's own options, which argparse would eat
        return supernode_main(argv[1:])
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handlers = {
        "run": _cmd_run,
        "partition": _cmd_partition,
        "config": _cmd_config,
        "compare": _cmd_compare,
        "eval": cmd_eval,
        "generate": cmd_generate,
        "chat": cmd_chat,
        "serve": cmd_serve,
        "votes": cmd_votes,
        "judge-check": cmd_judge_check,
        "export": _cmd_export,
        "federate": _cmd_federate,
        "flower-app": _cmd_flower_app,
        "flower-certs": _cmd_flower_certs,
        "keys": _cmd_keys,
    }
    try:
        return handlers[args.command](args)
    except FeditError as e:
        print(f"fedit: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `fedit keys | head`: the reader has all it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        return 0
