"""The comparison's Markdown table and plots (held-out loss per round, per-category bars)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedit.files import atomic_file, atomic_text

ARM_NAMES = {
    "base": "base (no tuning)",
    "local": "local-only (mean over clients)",
    "fedit": "FedIT",
    "centralized": "centralized",
    "finetune": "FedIT + local fine-tuning",
    "ditto": "Ditto",
    "fedsa": "FedSA-LoRA",
    "feddpa": "FedDPA",
}


def _f(v: Any, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _judge_cell(arm: dict[str, Any]) -> str:
    j = arm.get("judge")
    if not j:
        return "–"
    parts = []
    if "pairwise" in j and j["pairwise"].get("relative") is not None:
        parts.append(f"{100 * j['pairwise']['relative']:.0f}% of ref")
    if "single" in j and j["single"].get("score") is not None:
        parts.append(f"{j['single']['score']:.2f}/10")
    bad = sum(j[m].get("unparsed_replies", 0) for m in ("pairwise", "single") if m in j)
    if bad:
        parts.append(f"{bad} unparsed")
    return ", ".join(parts) or "–"


def markdown(results: dict[str, Any]) -> str:
    arms = results["arms"]
    lines = [
        "| arm | held-out loss | ppl | worst category | best category | ROUGE-L | similarity "
        "| judge | optimizer steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, arm in arms.items():
        loss = _f(arm["loss"])
        if key == "local":
            loss += f" ± {arm['loss_std']:.4f} ({_f(arm['loss_min'])}–{_f(arm['loss_max'])})"
        steps = arm.get("steps")
        steps_cell = "–" if steps is None else f"{steps:.0f}" + (" each" if key == "local" else "")
        lines.append(
            f"| {ARM_NAMES.get(key, key)} | {loss} | {_f(arm.get('ppl'), 2)} "
            f"| {_f(arm.get('category_loss_max'))} | {_f(arm.get('category_loss_min'))} "
            f"| {_f(arm.get('rougeL'))} | {_f(arm.get('similarity'))} | {_judge_cell(arm)} "
            f"| {steps_cell} |"
        )
    cats = sorted({c for a in arms.values() for c in a.get("loss_per_category", {})})
    lines += ["", "Held-out loss per category:", ""]
    lines.append("| category | " + " | ".join(ARM_NAMES.get(k, k) for k in arms) + " |")
    lines.append("|---|" + "---|" * len(arms))
    for c in cats:
        cells = [_f(a.get("loss_per_category", {}).get(c)) for a in arms.values()]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    tagged = {k: a["loss_per_tag"] for k, a in arms.items() if a.get("loss_per_tag")}
    for tag in sorted({t for v in tagged.values() for t in v if t != "source"}):
        values = sorted({v for a in tagged.values() for v in a.get(tag, {})})
        lines += ["", f"Held-out loss per {tag} (and the gap, worst - best):", "",
                  f"| {tag} | " + " | ".join(ARM_NAMES.get(k, k) for k in tagged) + " |",
                  "|---|" + "---|" * len(tagged)]  # fmt: skip
        for v in values:
            cells = [_f(a.get(tag, {}).get(v)) for a in tagged.values()]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        gaps = [_f(arms[k].get("tag_gap", {}).get(tag, {}).get("gap")) for k in tagged]
        lines.append("| **gap** | " + " | ".join(gaps) + " |")
    if "local" in arms:
        lines += [
            "",
            "Local-only clients:",
            "",
            "| client | records | held-out loss | ROUGE-L |",
            "|---|---|---|---|",
        ]
        for p in arms["local"]["per_client"]:
            cells = [str(p["client"]), str(p["train_records"]), _f(p["loss"]), _f(p.get("rougeL"))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = results["arms"]
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("fedit", "o-"), ("centralized", "s-")):
        if key in arms and arms[key].get("loss_per_round"):
            curve = arms[key]["loss_per_round"]
            ax.plot([r for r, _ in curve], [v for _, v in curve], style, label=ARM_NAMES[key])
    if "base" in arms:
        ax.axhline(arms["base"]["loss"], color="gray", ls=":", label=ARM_NAMES["base"])
    if "local" in arms:
        ax.axhline(arms["local"]["loss"], color="tab:red", ls="--", label=ARM_NAMES["local"])
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss")
    ax.set_title("Held-out loss per round")
    ax.legend()
    fig.tight_layout()
    written.append(_save(fig, out / "loss_per_round.png"))
    plt.close(fig)

    cats = sorted({c for a in arms.values() for c in a.get("loss_per_category", {})})
    if cats:
        fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cats)), 4.6))
        width = 0.8 / max(len(arms), 1)
        for i, (key, arm) in enumerate(arms.items()):
            ys = [arm.get("loss_per_category", {}).get(c, float("nan")) for c in cats]
            xs = [x + i * width for x in range(len(cats))]
            ax.bar(xs, ys, width, label=ARM_NAMES.get(key, key))
        ax.set_xticks([x + width * (len(arms) - 1) / 2 for x in range(len(cats))])
        ax.set_xticklabels(cats, rotation=30, ha="right")
        ax.set_ylabel("held-out loss")
        ax.set_title("Held-out loss per category")
        # Bars start at zero, so their lengths compare honestly; the legend sits above the
        # axes, where it covers no bar.
        ax.set_ylim(0, None)
        ax.legend(
            fontsize=8,
            ncol=min(len(arms), 4),
            loc="lower center",
            bbox_to_anchor=(0.5, 1.08),
            frameon=False,
        )
        fig.tight_layout()
        written.append(_save(fig, out / "per_category.png"))
        plt.close(fig)

    judged = {
        k: a["judge"]["pairwise"]["relative"]
        for k, a in arms.items()
        if a.get("judge", {}).get("pairwise", {}).get("relative") is not None
    }
    if judged:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar([ARM_NAMES.get(k, k) for k in judged], [100 * v for v in judged.values()])
        ax.axhline(100, color="gray", ls=":")
        ax.set_ylabel("judge score, % of the reference answer's")
        ax.set_title("LLM judge (pairwise, both orders)")
        plt.setp(ax.get_xticklabels(), rotation=15, ha="right")
        fig.tight_layout()
        written.append(_save(fig, out / "judge.png"))
        plt.close(fig)
    return written


def _save(fig: Any, path: Path) -> Path:
    with atomic_file(path, binary=True) as f:
        fig.savefig(f, dpi=110, format="png")
    return path


def own_data_markdown(own: dict[str, dict[str, float]]) -> str:
    """Each client's own held-out loss under every arm, and the mean and worst client."""
    arms = list(own)
    clients = sorted({c for v in own.values() for c in v}, key=int)
    lines = [
        "",
        "Each client's own held-out data (data.client_test_fraction), loss:",
        "",
        "| client | " + " | ".join(ARM_NAMES.get(a, a) for a in arms) + " |",
        "|---|" + "---|" * len(arms),
    ]
    for c in clients:
        lines.append(f"| {c} | " + " | ".join(_f(own[a].get(c)) for a in arms) + " |")
    for label, fn in (("mean", lambda xs: sum(xs) / len(xs)), ("worst", max)):
        cells = [_f(fn(list(own[a].values()))) if own[a] else "–" for a in arms]
        lines.append(f"| **{label}** | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def suites_markdown(results: dict[str, Any]) -> str:
    """Every arm on the other question sets: ROUGE-L against references, the judge's 1-10."""
    arms = {a: v for a, v in results["arms"].items() if v.get("suites")}
    if not arms:
        return ""
    names = list(next(iter(arms.values()))["suites"])
    lines = ["", "### Other question sets (each arm's answers; ROUGE-L against the references, "
             "the judge's MT-Bench grade 1-10 where a judge is set)", "",
             "| arm | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]  # fmt: skip
    for arm, v in arms.items():
        cells = []
        for n in names:
            s = v["suites"].get(n, {})
            parts = []
            if s.get("reference"):
                parts.append(f"ROUGE-L {_f(s['reference']['rougeL'])}")
            if s.get("judge") and s["judge"].get("score") is not None:
                parts.append(f"judge {s['judge']['score']:.2f}")
            cells.append(", ".join(parts) or f"{s.get('answers', 0)} answers")
        lines.append(f"| {ARM_NAMES.get(arm, arm)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], out: Path) -> None:
    text = markdown(results)
    if results.get("own_data"):
        text += own_data_markdown(results["own_data"])
    text += suites_markdown(results)
    atomic_text(out / "results.md", text)
    plots(results, out)
