"""The FedIT paper's setup at full size, timed: what its 20 rounds cost on this machine.

    python benchmarks/paper_scale.py                       # LLaMA-7B-shaped, on the GPU
    python benchmarks/paper_scale.py --model fedit/random:llama2-13b --time-rounds 3
    python benchmarks/paper_scale.py --set model.quantization=4bit --set model.dtype=bfloat16

configs/paper.toml as the paper and Shepherd ran it: dolly-15k over 100 clients by category
shards, 5% (5 clients) a round, 1 local epoch, cutoff 512, LoRA r16 on q_proj / v_proj, FedAvg
by data size, bf16 weights. The model is `fedit/random:<preset>`, a real architecture at full
size with random weights (the tokens are dolly's, through SmolLM2's tokenizer: the vocabulary
grows to its 49,152 tokens). Evaluation is off: only training and aggregation are timed.

It runs `--time-rounds` rounds (default 3) and prints: seconds per round (the first apart: it
tokenizes its clients), real (non-padding) tokens per second, MFU against the device's dense
bf16 peak (a table of data-sheet figures for GPUs; on a CPU its measured fp32 matmul peak),
peak GPU memory, and the projected wall time of the paper's 20 rounds (first round + 19 x the
median later round). Written to --json too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf import matmul_peak

from fedit.config import load_config
from fedit.models import load_tokenizer, model_config, pick_device
from fedit.progress import Progress
from fedit.recipe import run_federation

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s, no sparsity).
GPU_PEAKS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
             "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12,
             "RTX 4090": 165e12, "RTX A6000": 155e12, "V100": 125e12}  # fmt: skip
PAPER_ROUNDS = 20
SETTINGS = ["model.dtype=bfloat16", "lora.target_modules=[\"q_proj\",\"v_proj\"]",
            "eval.every=0", "eval.at_start=false"]  # fmt: skip


def device_peak(device: torch.device) -> tuple[str, float, str]:
    """(device name, peak FLOP/s, what the peak is)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS.items():  # the most specific key first (H100 PCIe)
            if key in name:
                return name, peak, "dense bf16 data-sheet peak"
        return name, float("nan"), "unknown device: no peak on record"
    return "cpu", matmul_peak(), "measured fp32 matmul peak (2048^2)"


def architecture(cfg: Any) -> tuple[Any, int, int]:
    """(config, parameters, matmul parameters) of the model as it trains (vocabulary grown
    to the tokenizer's), counted on the meta device: no memory."""
    from transformers import AutoModelForCausalLM

    conf = model_config(cfg.model)
    conf.vocab_size = max(int(conf.vocab_size), len(load_tokenizer(cfg.model)))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return conf, sum(p.numel() for p in model.parameters()), int(linear)


def flops_per_token(conf: Any, matmul: int, seq: float) -> float:
    """Forward 2N plus backward to the activations 2N (frozen weights get no gradient), and
    attention's 12 x layers x seq x hidden at the mean sequence length trained."""
    return 4 * matmul + 12 * conf.num_hidden_layers * seq * conf.hidden_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="configs/paper.toml")
    ap.add_argument("--model", default="fedit/random:llama-7b")
    ap.add_argument("--time-rounds", type=int, default=3)
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.time_rounds < 2:
        ap.error("--time-rounds: at least 2 (the first round tokenizes its clients)")
    overrides = [*SETTINGS, f"model.name={args.model}", f"federation.rounds={args.time_rounds}",
                 *args.extra]  # fmt: skip
    cfg = load_config(args.config, overrides)
    device = pick_device(cfg.model)
    conf, params, matmul = architecture(cfg)
    progress = Progress()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_federation(cfg, Path(tmp) / "run", progress=progress)
    total = time.perf_counter() - t0
    rows = [h for h in result.history if h["round"] >= 1]
    seconds = [float(r["seconds"]) for r in rows]
    metrics = [r["client_metrics"] for r in rows]
    tokens = [sum(float(m["real_tokens"]) for m in ms) for ms in metrics]
    train_s = [sum(float(m["seconds"]) for m in ms) for ms in metrics]
    seqs = sum(float(m["steps"]) * cfg.client.batch_size for ms in metrics for m in ms)
    later = statistics.median(seconds[1:])
    rate = sum(tokens[1:]) / sum(train_s[1:])
    name, peak, peak_kind = device_peak(device)
    fpt = flops_per_token(conf, matmul, sum(tokens) / max(seqs, 1.0))
    out = {
        "device": name, "model": args.model, "config": args.config, "overrides": overrides,
        "parameters": params, "clients": cfg.partition.num_clients,
        "clients_per_round": len(rows[0]["clients"]),
        "setup_s": total - sum(seconds), "round_s": seconds, "first_round_s": seconds[0],
        "median_round_s": later, "tokens_per_round": statistics.median(tokens[1:]),
        "tokens_per_s": rate, "flops_per_token": fpt, "peak_flops": peak,
        "peak_kind": peak_kind, "mfu": fpt * rate / peak,
        "peak_gpu_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                if device.type == "cuda" else None),
        "projected_paper_s": seconds[0] + (PAPER_ROUNDS - 1) * later,
    }  # fmt: skip
    mem = out["peak_gpu_memory_gib"]
    print(f"\n{name}: {args.model} ({out['parameters'] / 1e9:.2f}B parameters), "
          f"{out['clients']} clients, {out['clients_per_round']} a round")  # fmt: skip
    print(
        "| setup (data, model) | first round | later round (median) | tokens/round | tokens/s "
        "| MFU "
        "| peak GPU memory | paper's 20 rounds |"
    )
    print("|---" * 8 + "|")
    print(f"| {out['setup_s']:.1f} s | {seconds[0]:.1f} s | {later:.1f} s | "
          f"{out['tokens_per_round']:,.0f} | {rate:,.0f} | {out['mfu']:.1%} | "
          f"{f'{mem:.1f} GiB' if mem is not None else '-'} | "
          f"{out['projected_paper_s'] / 60:.1f} min |")  # fmt: skip
    print(f"(MFU against {peak / 1e12:.3g} TFLOP/s, the {peak_kind})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
