"""LLM-as-judge over any OpenAI-compatible chat-completions endpoint.

The FedIT paper's protocol (after Vicuna): the judge sees a question and two answers and rates
each from 1 to 10. Every pair is asked in both orders, which cancels the judge's preference for
a position, and `judge.repeats` times; the scores are averaged. Single-answer grading rates one
answer alone against the reference. Every reply is cached on disk before it is used, so a rerun
or a run cut short costs nothing for what was already judged. A reply with no readable scores
is counted and kept, never scored as 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedit.config import JudgeConfig
from fedit.errors import FeditError


class JudgeError(FeditError, RuntimeError):
    """The judge endpoint cannot be used; what was judged before stays cached."""


class JudgeRefused(JudgeError):
    """The endpoint refused this one request (e.g. a prompt over its context): others may pass."""


SYSTEM = "You are a careful, impartial judge of answers written by AI assistants."

PAIRWISE = """[Question]
{question}

[The Start of Assistant 1's Answer]
{a}
[The End of Assistant 1's Answer]

[The Start of Assistant 2's Answer]
{b}
[The End of Assistant 2's Answer]

Rate how well each assistant answers the question: helpfulness, relevance, accuracy and level \
of detail. Give each assistant one overall score from 1 to 10, higher is better. On the first \
line write only the two scores, Assistant 1's then Assistant 2's, separated by a space. Then, \
on the following lines, explain your rating. Judge the content only: the order in which the \
answers appear must not influence you."""

SINGLE = """[Question]
{question}

[Reference Answer]
{reference}

[The Start of the Assistant's Answer]
{answer}
[The End of the Assistant's Answer]

Rate the assistant's answer to the question for helpfulness, relevance, accuracy and level of \
detail, using the reference answer as a guide to what is correct. Explain briefly, then give \
your rating from 1 to 10 in exactly this form: Rating: [[N]]"""

_NUMBER = r"(10(?:\.0+)?|[0-9](?:\.[0-9]+)?)"
_PAIR = re.compile(rf"^\D*?{_NUMBER}\s*(?:,|/|\s|and)\s*{_NUMBER}\b")
_SINGLE = re.compile(rf"\[\[\s*{_NUMBER}\s*\]\]")


def parse_pair(reply: str) -> tuple[float, float] | None:
    """Scores from the first non-empty line: '8 6', '8, 6', 'Scores: 8 and 6'."""
    for line in reply.strip().splitlines():
        if line.strip():
            m = _PAIR.match(line.strip())
            if not m:
                return None
            a, b = float(m.group(1)), float(m.group(2))
            return (a, b) if 1 <= a <= 10 and 1 <= b <= 10 else None
    return None


def parse_single(reply: str) -> float | None:
    m = _SINGLE.findall(reply)
    if not m:
        return None
    score = float(m[-1])
    return score if 1 <= score <= 10 else None


class JudgeCache:
    """Append-only JSONL of replies keyed by a hash of the request; flushed per reply."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, str] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.entries[row["key"]] = row["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a crash: that request is simply asked again

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def put(self, key: str, reply: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "reply": reply}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries[key] = reply


@dataclass
class Verdict:
    """Mean scores of an answer (and of the other answer, in pairwise mode)."""

    answer: float | None
    other: float | None
    judgments: int
    unparsed: list[str] = field(default_factory=list)


class Judge:
    def __init__(
        self,
        cfg: JudgeConfig,
        cache_path: Path,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not cfg.base_url:
            raise JudgeError("judge.base_url is empty: no judge endpoint configured")
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.cache = JudgeCache(cache_path)
        self.sleep = sleep
        self.requests = 0

    # ------------------------------------------------------------ transport

    def _key(self, messages: list[dict[str, str]], repeat: int) -> str:
        blob = json.dumps(
            [self.cfg.model, self.cfg.temperature, self.cfg.max_tokens, messages, repeat],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def _post(self, messages: list[dict[str, str]], repeat: int) -> str:
        body = {
            "model": self.cfg.model,
            "messages": messages,
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
            "seed": repeat,
        }
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self.sleep(min(2.0 ** (attempt - 1), 30.0))
            self.requests += 1
            try:
                with urllib.request.urlopen(request, timeout=self.cfg.timeout) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
                content = payload["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise TypeError("message.content is not a string")
                return content
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                last = f"HTTP {e.code}: {detail}"
                if e.code in (401, 403):
                    raise JudgeError(
                        f"judge {self.url}: {last} — is ${self.cfg.api_key_env} set to a valid key?"
                    ) from None
                if e.code < 500 and e.code != 429:
                    raise JudgeRefused(f"judge {self.url}: request refused: {last}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"cannot reach the endpoint: {getattr(e, 'reason', e)}"
            except (json.JSONDecodeError, KeyError, IndexError, TypeError, UnicodeDecodeError) as e:
                last = f"not a chat-completions reply ({type(e).__name__}: {e})"
        raise JudgeError(
            f"judge {self.url}: {last} (after {self.cfg.max_retries + 1} tries); "
            f"{len(self.cache.entries)} earlier judgments are kept in {self.cache.path}"
        )

    def ask(self, prompt: str, repeat: int, system: str = SYSTEM) -> str:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        key = self._key(messages, repeat)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        reply = self._post(messages, repeat)
        self.cache.put(key, reply)
        return reply

    # ------------------------------------------------------------ protocols

    def pairwise(self, question: str, answer: str, other: str) -> Verdict:
        """`answer` vs `other`, both orders, `repeats` times each."""
        mine, theirs, bad = [], [], []
        for repeat in range(self.cfg.repeats):
            for first, second, flipped in ((answer, other, False), (other, answer, True)):
                reply = self.ask(PAIRWISE.format(question=question, a=first, b=second), repeat)
                scores = parse_pair(reply)
                if scores is None:
                    bad.append(reply)
                    continue
                a, b = (scores[1], scores[0]) if flipped else scores
                mine.append(a)
                theirs.append(b)
        return Verdict(_mean(mine), _mean(theirs), len(mine), bad)

    def single(self, question: str, answer: str, reference: str) -> Verdict:
        scores, bad = [], []
        for repeat in range(self.cfg.repeats):
            prompt = SINGLE.format(question=question, reference=reference, answer=answer)
            reply = self.ask(prompt, repeat)
            score = parse_single(reply)
            if score is None:
                bad.append(reply)
            else:
                scores.append(score)
        return Verdict(_mean(scores), None, len(scores), bad)


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def judge_answers(
    judge: Judge,
    questions: Sequence[str],
    answers: Sequence[str],
    references: Sequence[str],
    mode: str,
    on_item: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Judge every answer against its reference answer; totals and every unreadable reply."""
    result: dict[str, Any] = {"items": len(answers)}
    modes = ("pairwise", "single") if mode == "both" else (mode,)
    for m in modes:
        mine: list[float] = []
        theirs: list[float] = []
        unparsed: list[dict[str, Any]] = []
        for i, (q, a, r) in enumerate(zip(questions, answers, references, strict=True)):
            v = judge.pairwise(q, a, r) if m == "pairwise" else judge.single(q, a, r)
            if v.answer is not None:
                mine.append(v.answer)
                if v.other is not None:
                    theirs.append(v.other)
            unparsed += [{"item": i, "reply": text[:500]} for text in v.unparsed]
            if on_item:
                on_item(i + 1, len(answers))
        entry: dict[str, Any] = {
            "score": _mean(mine),
            "judged_items": len(mine),
            "unparsed_replies": len(unparsed),
            "unparsed": unparsed[:20],
        }
        if m == "pairwise":
            entry["reference_score"] = _mean(theirs)
            # Vicuna's relative score: total of the answer's scores over the reference's.
            entry["relative"] = sum(mine) / sum(theirs) if theirs and sum(theirs) else None
        result[m] = entry
    return result
