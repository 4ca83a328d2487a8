"""`fedit eval`, `generate`, `chat`, `serve`: commands over a base model with a saved adapter."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedit.config import ConfigError
from fedit.files import atomic_json, atomic_text

if TYPE_CHECKING:
    from fedit.inference import Loaded


def personal_folder(run: Path, client: int, tmp: Path, adapter: Path | None = None) -> Path:
    """Client `client`'s personal model of `run` as a PEFT folder under `tmp`."""
    from fedit.client.personal import personal_adapter
    from fedit.inference import resolve_source
    from fedit.lora import ADAPTER_FILE, CONFIG_FILE, load_adapter_state

    cfg, default = resolve_source(run)
    source = adapter or default
    state = personal_adapter(cfg, run, client, load_adapter_state(source))
    folder = tmp / f"client-{client}"
    folder.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(folder / ADAPTER_FILE),
        metadata={"format": "pt"},
    )
    (folder / CONFIG_FILE).write_bytes((source / CONFIG_FILE).read_bytes())
    return folder


def load_source(args: argparse.Namespace) -> Loaded:
    from fedit.inference import load_for_inference, resolve_source

    cfg, default_adapter = resolve_source(args.source, args.overrides)
    if getattr(args, "client", None) is not None:
        from fedit.client.personal import personal_adapter
        from fedit.inference import use_adapter
        from fedit.lora import load_adapter_state

        loaded = load_for_inference(cfg, default_adapter)
        state = personal_adapter(
            cfg, Path(args.source), args.client, load_adapter_state(default_adapter)
        )
        use_adapter(loaded, state, Path(f"{default_adapter} (client {args.client}'s model)"))
        return loaded
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


def cmd_eval(args: argparse.Namespace) -> int:
    from fedit.evaluate.generation import Embedder
    from fedit.evaluate.scoring import held_out, score_model
    from fedit.progress import Progress

    if args.suite:
        return _eval_suites(args)
    loaded = load_source(args)
    cfg = loaded.cfg
    out = Path(args.out) if args.out else None
    generating = not args.no_generate and cfg.generate.per_category > 0
    embedder = Embedder(cfg.generate.embedder) if generating and cfg.generate.embedder else None
    result: dict[str, Any] = {"model": cfg.model.name, "adapter": str(loaded.adapter)}
    result.update(
        score_model(
            loaded,
            held_out(cfg),
            answer=generating,
            answers=out / "answers.jsonl" if out else None,
            judge_cache=(out or Path("runs")) / "judge_cache.jsonl",
            embedder=embedder,
            progress=Progress(),
        )
    )
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
        atomic_json(out / "eval.json", result)
        print(f"written: {out / 'eval.json'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import json

    from fedit.data.records import Record, read_prompts
    from fedit.inference import generate, prompt_for

    loaded = load_source(args)
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
        atomic_text(out, "".join(line + "\n" for line in lines))
        print(f"wrote {len(lines)} answers to {out}", file=sys.stderr)
    else:
        print("\n".join(lines))
    return 0


CHAT_HELP = """commands:
  /reset   forget the conversation (a new chat)
  /help    this text
  /quit    leave (or Ctrl-D); Ctrl-C stops an answer that is being written
Earlier turns are part of each prompt; arrow keys edit the line and recall history."""


def _line_editing() -> None:
    """readline: line editing, and history kept across sessions (where the platform has it)."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input()
        return
    import atexit

    from fedit.models import cache_dir

    history = cache_dir() / "chat_history"
    try:
        history.parent.mkdir(parents=True, exist_ok=True)
        if history.is_file():
            readline.read_history_file(history)
    except OSError:
        return
    readline.set_history_length(1000)
    atexit.register(lambda: _save_history(readline, history))


def _save_history(readline: Any, history: Path) -> None:
    with contextlib.suppress(OSError):
        readline.write_history_file(history)


def cmd_chat(args: argparse.Namespace) -> int:
    from fedit.data.prompts import template_stops
    from fedit.inference import messages_to_record, prompt_for, stream_answer

    loaded = load_source(args)
    cfg, tok = loaded.cfg, loaded.tokenizer
    interactive = sys.stdin.isatty()
    if interactive:
        _line_editing()
    print(
        f"chatting with {loaded.label} (template {cfg.data.template}); /help for commands, "
        "Ctrl-D quits",
        file=sys.stderr,
    )
    messages: list[dict[str, str]] = []
    limit = max(cfg.data.cutoff_len, 2048)
    while True:
        try:
            text = input("you> " if interactive else "").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /quit leaves)", file=sys.stderr)
            continue
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0]
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                messages = []
                print("(new conversation)", file=sys.stderr)
            elif command == "/help":
                print(CHAT_HELP, file=sys.stderr)
            else:
                print(f"unknown command {command}; /help lists them", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        prompt = prompt_for(messages_to_record(messages), cfg, tok)
        ids = tok(prompt, add_special_tokens=cfg.data.template != "chat")["input_ids"][-limit:]
        print("model> ", end="", flush=True)
        try:
            answer = stream_answer(
                loaded.model,
                tok,
                ids,
                args.max_new_tokens or cfg.generate.max_new_tokens,
                temperature=args.temperature,
                seed=cfg.seed + len(messages),
                stops=template_stops(cfg.data.template),
                on_text=lambda t: print(t, end="", flush=True),
            )
        except KeyboardInterrupt:
            print("\n(stopped; this turn is forgotten)", file=sys.stderr)
            messages.pop()
            continue
        print(flush=True)
        messages.append({"role": "assistant", "content": answer.text})


def cmd_serve(args: argparse.Namespace) -> int:
    import tempfile

    from fedit.serve import Models, Source, bind, expand_sources, run_server

    sources = expand_sources(args.sources, args.adapter)
    if args.model_id:
        if len(sources) != 1:
            raise ConfigError("--model-id: only with one source; name several with NAME=PATH")
        sources[0].name = args.model_id
    tmp = tempfile.TemporaryDirectory(prefix="fedit-personal-")
    for s in list(sources):  # each client's personal model beside its run's global adapter
        run = Path(s.info.get("folder", ""))
        for client in args.client:
            folder = personal_folder(
                run, client, Path(tmp.name) / s.name.replace("/", "_"), s.adapter
            )
            sources.append(Source(f"{s.name}/client-{client}", s.cfg, folder, dict(s.info)))
    votes = None
    if args.votes != "none":
        from fedit.serve import VoteStore

        first = Path(args.sources[0].split("=", 1)[-1])  # the run or compare folder named first
        where = (
            Path(args.votes) if args.votes else first / "votes.sqlite" if first.is_dir() else None
        )
        votes = VoteStore(where) if where is not None else None
    sock = bind(args.host, args.port)  # a taken port fails before the model loads
    models = Models(sources, args.max_new_tokens)

    def ready(url: str) -> None:
        # The readiness line: scripts wait for it (and read the port when --port 0).
        names = ", ".join(models.names)
        kept = f"; votes in {votes.path}" if votes is not None else ""
        print(f"serving {names} on {url}/v1 (web page: {url}/{kept})", flush=True)

    try:
        run_server(models, sock, args.cors_origin or None, ready=ready, votes=votes)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        tmp.cleanup()
    return 0


def cmd_votes(args: argparse.Namespace) -> int:
    from fedit.config import load_config
    from fedit.evaluate.votes import judge_agreement, load_votes, markdown, summarize, votes_file

    where = Path(args.where)
    rows = load_votes(where)
    report = summarize(rows, draws=args.draws)
    agreement, judge_name = None, ""
    if args.judge:
        from fedit.evaluate.judge import Judge

        folder = votes_file(where).parent
        config = folder / "config.toml"
        cfg = load_config(config if config.is_file() else None, args.overrides)
        judge = Judge(cfg.judge, folder / "votes-judge-cache.jsonl")
        judge_name = f"{cfg.judge.model} at {cfg.judge.base_url}"

        def verdict(q: str, a: str, b: str) -> tuple[float | None, float | None]:
            v = judge.pairwise(q, a, b)
            return v.answer, v.other

        agreement = judge_agreement(rows, verdict)
        report["judge"] = {"model": cfg.judge.model, "base_url": cfg.judge.base_url, **agreement}
    print(markdown(report, agreement, judge_name), end="")
    if args.out:
        atomic_json(Path(args.out), report)
    return 0


def cmd_judge_check(args: argparse.Namespace) -> int:
    import numpy as np

    from fedit.config import load_config
    from fedit.evaluate.judge import Judge
    from fedit.evaluate.vicuna import judge_check, load_pairs, load_prompts, markdown, vicuna_folder
    from fedit.progress import Progress

    cfg = load_config(args.config, args.overrides)
    folder = vicuna_folder(args.data)
    prompts, pairs = load_prompts(folder), load_pairs(folder)
    if args.limit and args.limit < len(pairs):
        keep = np.random.default_rng(0).choice(len(pairs), args.limit, replace=False)
        pairs = [pairs[int(i)] for i in sorted(keep)]
    out = Path(args.out)
    judge = Judge(cfg.judge, out / "judge-cache.jsonl")
    progress = Progress()

    def shown(i: int, n: int) -> None:
        if i == n or i % 10 == 0:
            progress.log(f"judged {i}/{n} pairs ({judge.requests} requests, the rest cached)")

    report = judge_check(pairs, prompts, lambda system, user: judge.ask(user, 0, system), shown)
    name = f"{cfg.judge.model} at {cfg.judge.base_url}"
    report.update(judge=cfg.judge.model, base_url=cfg.judge.base_url, data=str(folder))
    table = markdown(report, name)
    atomic_json(out / "report.json", report)
    atomic_text(out / "report.md", table)
    print(table, end="")
    return 0


def _eval_suites(args: argparse.Namespace) -> int:
    from fedit.evaluate.generation import Embedder
    from fedit.evaluate.suite_scoring import score_suite
    from fedit.evaluate.suites import load_suite, recorded_references, suite_answers, suite_label
    from fedit.inference import resolve_source
    from fedit.progress import Progress

    probe, _ = resolve_source(args.source, args.overrides)
    # Every suite file is read and checked before the model loads.
    items = {name: load_suite(name, probe) for name in args.suite}
    recorded = {name: recorded_references(name, probe) for name in args.suite}
    loaded = load_source(args)
    cfg = loaded.cfg
    source = Path(args.source)
    out = Path(args.out) if args.out else (source if source.is_dir() else Path("runs")) / "eval"
    embedder = Embedder(cfg.generate.embedder) if cfg.generate.embedder else None
    progress = Progress()
    who = "base" if args.base else f"client-{args.client}" if args.client is not None else "adapter"
    for name, suite in items.items():
        label = suite_label(name)
        rows = suite_answers(
            loaded, name, suite, out / "answers" / f"{who}-{label}.jsonl", progress
        )
        scores = score_suite(cfg, rows, embedder, out / "judge_cache.jsonl", progress,
                             recorded[name])  # fmt: skip
        result = {"suite": name, "model": cfg.model.name, "adapter": str(loaded.adapter), **scores}
        atomic_json(out / "suites" / f"{who}-{label}.json", result)
        line = f"{name}: {result['items']} items, {result['answers']} answers"
        ref = result.get("reference")
        if ref:
            line += f"  ROUGE-L {ref['rougeL']:.4f}"
            if ref.get("similarity") is not None:
                line += f"  similarity {ref['similarity']:.4f}"
        if result.get("script_match") is not None:
            line += f"  in the asked script {100 * result['script_match']:.0f}%"
        j = result.get("judge")
        if j:
            score = "-" if j["score"] is None else f"{j['score']:.2f}"
            line += f"  judge {j['judge']}: {score}/10 ({j['unparsed_replies']} unreadable)"
        print(line)
    print(f"written: {out / 'suites'}")
    return 0
