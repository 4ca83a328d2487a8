"""Question sets the field evaluates on: `fedit eval SOURCE --suite NAME`, `eval.suites`.

- `dolly-test`: the run's own held-out split (`generate.per_category` per category).
- `vicuna80`: the 80 Vicuna questions (no reference answers).
- `mt-bench`: MT-Bench's 80 two-turn questions; the second turn is asked after the model's own
  first answer; GPT-4's reference answers for math, reasoning and coding.
- `self-instruct`: the 252 user-oriented tasks, each with its first instance (input as context,
  output as the reference).
- `fed-aya`: Fed-Aya's test prompts in 8 languages, with references (per-language results).
- `vicuna80-LANG`: the Vicuna 80 in another language (`vicuna80-Japanese`, ...).
- a path to a JSONL file of your own: one object a line with `instruction` (or `turns`, a list
  of user turns) and optionally `id`, `category`, `context`, `reference` (or `references`; a
  `response` or `output` is taken as the reference, so the `test.jsonl` that `fedit partition`
  writes is a suite: another run's test split, e.g. dolly's for a model tuned on other data).

Files are found through `FEDIT_DATA_DIR` (under `eval/`) and checked line by line. Answers are
generated once per model and suite and kept (`answers/SUITE.jsonl`, appended a batch at a time):
rescoring costs nothing, an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedit.data.records import DataError, Record, resolve_data_path
from fedit.evaluate.vicuna import read_jsonl
from fedit.files import atomic_lines
from fedit.inference import generate, prompt_for
from fedit.seeding import generator

if TYPE_CHECKING:
    from fedit.config import Config
    from fedit.inference import Loaded
    from fedit.progress import Progress

BUILTIN = ("dolly-test", "vicuna80", "mt-bench", "self-instruct", "fed-aya")
MULTILINGUAL = "eval/vicuna80_multilingual"


@dataclass
class Item:
    id: str
    category: str
    turns: list[str]
    references: list[str] = field(default_factory=list)  # per turn ('' where none)
    context: str = ""
    language: str = ""


def is_suite(name: str) -> bool:
    return name in BUILTIN or name.startswith("vicuna80-") or name.endswith((".jsonl", ".json"))


def _file(rel: str) -> Path:
    return resolve_data_path(rel)


def load_suite(name: str, cfg: Config) -> list[Item]:
    """The items of suite `name` (see the module), at most `eval.suite_items` of them (a seeded
    sample in file order); a bad file fails with file:line."""
    items = _load(name, cfg)
    k = cfg.eval.suite_items
    if k and k < len(items):
        keep = generator(cfg.seed, "suite", name).choice(len(items), k, replace=False)
        items = [items[int(i)] for i in sorted(keep)]
    return items


def _load(name: str, cfg: Config) -> list[Item]:
    if name == "dolly-test":
        from fedit.evaluate.scoring import generation_subset, held_out

        test = generation_subset(held_out(cfg), cfg.generate.per_category, cfg.seed)
        return [Item(f"dolly-{i}", r.category, [r.instruction], [r.response], r.context)
                for i, r in enumerate(test)]  # fmt: skip
    if name == "vicuna80" or name.startswith("vicuna80-"):
        lang = name.split("-", 1)[1] if "-" in name else ""
        path = _file(f"{MULTILINGUAL}/questions_{lang}.jsonl" if lang else
                     "eval/vicuna80/question.jsonl")  # fmt: skip
        rows = read_jsonl(path, ["question_id", "text", "category"])
        return [Item(str(r["question_id"]), str(r["category"]), [str(r["text"])], [""],
                     language=lang) for r in rows]  # fmt: skip
    if name == "mt-bench":
        path = _file("eval/mt_bench/question.jsonl")
        ref_path = _file("eval/mt_bench/reference_answer/gpt-4.jsonl")
        refs = {int(r["question_id"]): r["choices"][0]["turns"]
                for r in read_jsonl(ref_path, ["question_id", "choices"])}  # fmt: skip
        items = []
        for n, r in enumerate(read_jsonl(path, ["question_id", "category", "turns"]), start=1):
            if not (isinstance(r["turns"], list) and len(r["turns"]) == 2):
                raise DataError(f"{path}:{n}: turns must be a list of two questions")
            ref = refs.get(int(r["question_id"]), ["", ""])
            items.append(Item(str(r["question_id"]), str(r["category"]), list(r["turns"]),
                              [str(x) for x in ref]))  # fmt: skip
        return items
    if name == "self-instruct":
        path = _file("eval/self_instruct_user_oriented.jsonl")
        items = []
        for n, r in enumerate(read_jsonl(path, ["id", "instruction", "instances"]), start=1):
            if not r["instances"] or "output" not in r["instances"][0]:
                raise DataError(f"{path}:{n}: instances must hold an input and an output")
            first = r["instances"][0]
            items.append(Item(str(r["id"]), str(r.get("motivation_app") or "task"),
                              [str(r["instruction"])], [str(first["output"])],
                              str(first.get("input") or "")))  # fmt: skip
        return items
    if name == "fed-aya":
        path = _file("eval/fed_aya_test.json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not JSON ({e})") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected {{language: [prompts]}}")
        items = []
        for lang, rows in sorted(data.items()):
            for i, r in enumerate(rows):
                if not (isinstance(r, dict) and "instruction" in r and "reference" in r):
                    raise DataError(f"{path}: {lang}[{i}]: needs instruction and reference")
                items.append(Item(f"{lang}-{i}", lang, [str(r["instruction"])],
                                  [str(r["reference"])], language=lang))  # fmt: skip
        return items
    if name.endswith((".jsonl", ".json")):
        return _own_suite(resolve_data_path(name))
    raise DataError(f"unknown suite {name!r}; known: {', '.join(BUILTIN)}, vicuna80-LANG, or a "
                    "path to your own .jsonl")  # fmt: skip


def _own_suite(path: Path) -> list[Item]:
    items = []
    for n, r in enumerate(read_jsonl(path, []), start=1):
        turns = r.get("turns") or ([r["instruction"]] if "instruction" in r else None)
        if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
            raise DataError(f"{path}:{n}: needs `instruction` (a string) or `turns` (strings)")
        one = r.get("reference", r.get("response", r.get("output", "")))  # (a split's test.jsonl)
        refs = r.get("references") or [one] + [""] * (len(turns) - 1)
        if not isinstance(refs, list) or len(refs) != len(turns):
            raise DataError(f"{path}:{n}: `references` must have one entry per turn")
        items.append(Item(str(r.get("id", n)), str(r.get("category", "general")), turns,
                          [str(x or "") for x in refs], str(r.get("context") or "")))  # fmt: skip
    return items


def recorded_references(name: str, cfg: Config) -> dict[str, str]:
    """The references a suite is scored against beyond its own: for `vicuna80`, the recorded
    answers named by `eval.vicuna80_reference`, by question id (empty elsewhere)."""
    ref = cfg.eval.vicuna80_reference
    if name != "vicuna80" or not ref:
        return {}
    path = _file(f"eval/vicuna80/answer/answer_{ref}.jsonl")
    return {str(r["question_id"]): str(r["text"])
            for r in read_jsonl(path, ["question_id", "text"])}  # fmt: skip


def suite_label(name: str) -> str:
    """A file name for the suite's answers and results."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem if name.endswith(".jsonl") else name)


def _stamp(name: str, items: list[Item], loaded: Loaded) -> str:
    cfg = loaded.cfg
    blob = [name, [asdict(i) for i in items], cfg.generate.max_new_tokens, cfg.data.template,
            str(loaded.adapter), loaded.label]  # fmt: skip
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def suite_answers(loaded: Loaded, name: str, items: list[Item], path: Path,
                  progress: Progress | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Each item's answers (one per turn), generated once and kept in `path`."""
    stamp = _stamp(name, items, loaded)
    done: dict[str, dict[str, Any]] = {}
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interruption: that item is answered again
            if row.get("stamp") == stamp:
                done[row["id"]] = row
            else:
                done.clear()  # another model or other settings: start the file afresh
                break
        if len(done) != len(text.splitlines()) or not text.endswith("\n"):
            atomic_lines(path, list(done.values()))  # only whole answers stay
    todo = [i for i in items if i.id not in done]
    path.parent.mkdir(parents=True, exist_ok=True)
    step = max(1, loaded.cfg.generate.batch_size)
    for start in range(0, len(todo), step):
        chunk = todo[start : start + step]
        rows = _answer_chunk(loaded, chunk, stamp)
        with path.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        done.update({r["id"]: r for r in rows})
        if progress is not None:
            n = len(done)
            progress.log(f"{name}: answered {n}/{len(items)} ({loaded.label})"
                         + progress.rate(("suite", name, loaded.label), start + len(chunk),
                                         len(todo), "item"))  # fmt: skip
    return [done[i.id] for i in items]


def _answer_chunk(loaded: Loaded, chunk: list[Item], stamp: str) -> list[dict[str, Any]]:
    cfg, tok = loaded.cfg, loaded.tokenizer
    answers: list[list[str]] = [[] for _ in chunk]
    for turn in range(max(len(i.turns) for i in chunk)):
        asked = [k for k, i in enumerate(chunk) if len(i.turns) > turn]
        prompts = []
        for k in asked:
            item = chunk[k]
            history: list[dict[str, str]] = []
            for t in range(turn):  # the model's own earlier answers
                first = item.turns[t] + (f"\n\n{item.context}" if t == 0 and item.context else "")
                history += [{"role": "user", "content": first},
                            {"role": "assistant", "content": answers[k][t]}]  # fmt: skip
            record = Record(instruction=item.turns[turn], response="",
                            context=item.context if turn == 0 else "", history=history)  # fmt: skip
            prompts.append(prompt_for(record, cfg, tok))
        new = cfg.generate.max_new_tokens
        context = int(getattr(loaded.model.config, "max_position_embeddings", 4096))
        room = max(16, min(max(cfg.data.cutoff_len, 2048), context - new))  # prompt keeps its end
        outs = generate(loaded.model, tok, prompts, max_new_tokens=new,
                        batch_size=cfg.generate.batch_size, max_prompt_tokens=room,
                        add_special_tokens=cfg.data.template != "chat")  # fmt: skip
        for k, o in zip(asked, outs, strict=True):
            answers[k].append(o["text"])
    return [
        {**asdict(i), "answers": a, "stamp": stamp} for i, a in zip(chunk, answers, strict=True)
    ]
