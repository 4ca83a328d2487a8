"""`fedit ...` subcommands: thin over the Python API."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedit.config import ConfigError, iter_keys, load_config, to_toml
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
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )  # fmt: skip


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

    cmp = sub.add_parser(
        "compare", help="base vs local-only vs FedIT vs centralized on one partition"
    )
    _config_args(cmp)
    cmp.add_argument("--out", help="comparison folder (default: runs/compare-<config name>)")
    cmp.add_argument("--quiet", action="store_true", help="no progress lines")

    ev = sub.add_parser("eval", help="score a base model or base + adapter on the held-out split")
    _source_args(ev)
    ev.add_argument("--out", help="folder for eval.json, answers and the judge cache")
    ev.add_argument("--no-generate", action="store_true", help="loss only, no answers")

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

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP API (/v1/chat/completions)")
    _source_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (0 = any free one)")
    srv.add_argument("--model-id", default="fedit", help="model name clients send (default fedit)")
    srv.add_argument("--max-new-tokens", type=int, help="default: generate.max_new_tokens")

    fed = sub.add_parser(
        "federate", help="run the config over real Flower processes on this machine (loopback)"
    )
    _config_args(fed)
    fed.add_argument("--nodes", type=int, help="SuperNodes to start (= partition.num_clients)")
    fed.add_argument("--out", help="run folder (default: runs/<config name>-flower)")
    fed.add_argument(
        "--secure", action="store_true", help="TLS (test CA) and SuperNode authentication"
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


def _cmd_compare(args: argparse.Namespace) -> int:
    from fedit.evaluate.compare import run_compare
    from fedit.evaluate.report import markdown
    from fedit.progress import Progress

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or Path("runs") / f"compare-{Path(args.config).stem}")
    try:
        results = run_compare(cfg, out, Progress(enabled=not args.quiet))
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; finished arms and checkpoints are kept in {out}.\n"
            f"continue with: fedit compare {args.config} --out {out}",
            file=sys.stderr,
        )
        return 130
    print(markdown(results))
    print(f"table: {out / 'results.md'}  data: {out / 'results.json'}  plots: {out}/*.png")
    return 0


def _load_source(args: argparse.Namespace) -> object:
    from fedit.inference import load_for_inference, resolve_source

    cfg, default_adapter = resolve_source(args.source, args.overrides)
    if args.base:
        adapter = None
    elif args.adapter:
        adapter = Path(args.adapter)
    elif default_adapter.is_dir():
        adapter = default_adapter
    else:
        raise ConfigError(
            f"{args.source}: no adapter at {default_adapter}; pass --adapter DIR or --base"
        )
    return load_for_inference(cfg, adapter)


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from fedit.evaluate.generation import Embedder
    from fedit.evaluate.scoring import (
        answer_metrics,
        answers_for,
        generation_subset,
        held_out,
        judge_rows,
        loss_on,
    )
    from fedit.progress import Progress

    loaded: Any = _load_source(args)
    cfg = loaded.cfg
    progress = Progress()
    out = Path(args.out) if args.out else None
    test = held_out(cfg)
    progress.log(f"held-out loss on {len(test)} test records ({loaded.label})")
    result: dict[str, Any] = {"model": cfg.model.name, "adapter": str(loaded.adapter)}
    result["eval"] = loss_on(loaded, test)
    if not args.no_generate and cfg.generate.per_category:
        rows = answers_for(
            loaded,
            generation_subset(test, cfg.generate.per_category, cfg.seed),
            out / "answers.jsonl" if out else None,
            progress,
        )
        embedder = Embedder(cfg.generate.embedder) if cfg.generate.embedder else None
        result["generation"] = answer_metrics(rows, embedder)
        if cfg.judge.base_url:
            cache = (out or Path("runs")) / "judge_cache.jsonl"
            result["judge"] = judge_rows(cfg, rows, cache, progress)
    ev = result["eval"]
    print(f"held-out loss {ev['loss']:.4f}  ppl {ev['ppl']:.2f}")
    for cat, v in ev["per_category"].items():
        print(f"  {cat:<24} loss {v['loss']:.4f}  ppl {v['ppl']:8.2f}")
    gen = result.get("generation")
    if gen:
        sim = gen.get("similarity")
        print(
            f"answers: {gen['answers']}  ROUGE-L {gen['rougeL']:.4f}"
            + (f"  similarity {sim:.4f}" if sim is not None else "")
        )
    for mode, j in (result.get("judge") or {}).items():
        if isinstance(j, dict):
            rel = j.get("relative")
            print(
                f"judge ({mode}): score {j['score']}"
                + (f", {100 * rel:.1f}% of the reference" if rel is not None else "")
                + f", {j['unparsed_replies']} unreadable replies"
            )
    if out:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".eval.json.tmp"
        tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, out / "eval.json")
        print(f"written: {out / 'eval.json'}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import json

    from fedit.data.records import Record, read_prompts
    from fedit.evaluate.generation import generate
    from fedit.inference import prompt_for

    loaded: Any = _load_source(args)
    cfg = loaded.cfg
    if args.prompt is not None:
        records = [Record(instruction=args.prompt, response="", context=args.input)]
    else:
        records = read_prompts(Path(args.prompts))
    prompts = [prompt_for(r, cfg, loaded.tokenizer) for r in records]
    outs = generate(
        loaded.model,
        loaded.tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens or cfg.generate.max_new_tokens,
        batch_size=cfg.generate.batch_size,
        max_prompt_tokens=max(cfg.data.cutoff_len, 2048),
        temperature=args.temperature,
        seed=cfg.seed,
        add_special_tokens=cfg.data.template != "chat",
    )
    if args.prompt is not None and not args.output:
        print(outs[0]["text"])
        return 0
    lines = [
        json.dumps({"instruction": r.instruction, "input": r.context, "output": o["text"]})
        for r, o in zip(records, outs, strict=True)
    ]
    if args.output:
        out = Path(args.output)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, out)
        print(f"wrote {len(lines)} answers to {out}", file=sys.stderr)
    else:
        print("\n".join(lines))
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from fedit.evaluate.generation import generate
    from fedit.inference import messages_to_record, prompt_for

    loaded: Any = _load_source(args)
    cfg = loaded.cfg
    print(
        f"chatting with {loaded.label}; empty line or Ctrl-D quits, /reset forgets",
        file=sys.stderr,
    )
    messages: list[dict[str, str]] = []
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not text:
            return 0
        if text == "/reset":
            messages = []
            continue
        messages.append({"role": "user", "content": text})
        prompt = prompt_for(messages_to_record(messages), cfg, loaded.tokenizer)
        (answer,) = generate(
            loaded.model,
            loaded.tokenizer,
            [prompt],
            max_new_tokens=args.max_new_tokens or cfg.generate.max_new_tokens,
            batch_size=1,
            max_prompt_tokens=max(cfg.data.cutoff_len, 2048),
            temperature=args.temperature,
            seed=cfg.seed + len(messages),
            add_special_tokens=cfg.data.template != "chat",
        )
        print(f"model> {answer['text']}")
        messages.append({"role": "assistant", "content": answer["text"]})


def _cmd_serve(args: argparse.Namespace) -> int:
    from fedit.serve import make_server

    loaded: Any = _load_source(args)
    httpd, _ = make_server(
        loaded,
        args.host,
        args.port,
        args.model_id,
        args.max_new_tokens or loaded.cfg.generate.max_new_tokens,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    host, port = str(httpd.server_address[0]), int(httpd.server_address[1])
    # The readiness line: scripts wait for it (and read the port when --port 0).
    print(f"serving {loaded.label} as {args.model_id!r} on http://{host}:{port}/v1", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


def _cmd_federate(args: argparse.Namespace) -> int:
    from fedit.flower.launch import federate
    from fedit.progress import summary_table

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or Path("runs") / f"{Path(args.config).stem}-flower")
    try:
        summary = federate(cfg, out, args.nodes, secure=args.secure)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; every Flower process was stopped. Completed rounds are in "
            f"{out / 'checkpoints'}; the same command resumes.",
            file=sys.stderr,
        )
        return 130
    print(summary_table(summary["history"]))
    print(f"\nglobal adapter: {out / 'adapter'}  metrics: {out / 'metrics.jsonl'}")
    return 0


def _cmd_flower_app(args: argparse.Namespace) -> int:
    from fedit.flower.launch import FEDERATION, write_app, write_federation

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
    from fedit.flower.certs import make_pki

    hosts = args.host or ["127.0.0.1", "localhost"]
    paths = make_pki(Path(args.folder), args.nodes, hosts)
    for name, path in paths.items():
        if name != "ca_key":
            print(f"{name:<12} {path}")
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
        "compare": _cmd_compare,
        "eval": _cmd_eval,
        "generate": _cmd_generate,
        "chat": _cmd_chat,
        "serve": _cmd_serve,
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


if __name__ == "__main__":
    sys.exit(main())
