"""Performance figures of one fedit round, printed as a table and written as JSON.

    python benchmarks/perf.py CONFIG [--set KEY=VALUE ...] [--json OUT.json]
    python benchmarks/perf.py CONFIG --server-memory 10,1000 [--set ...]

Measured in one process, on the same examples and batches:
- the fp32 matmul peak of this machine (2048 x 2048, median of 5);
- one fedit round (the sampled clients train in turn, then aggregation), and the floor: plain
  centralized LoRA training over exactly the same micro-batches and optimizer steps with one
  AdamW, no adapter swaps; federation overhead = fedit / floor;
- throughput in real (non-padding) tokens/s, padding efficiency (real / computed tokens), and
  MFU = (4 x matmul parameters + 12 x layers x seq x hidden) x tokens/s / peak, counting only
  real tokens: forward 2N, backward to the activations 2N, the frozen weights get no gradient;
- a time breakdown (tokenization once per client, training, aggregation, evaluation,
  checkpoint), bytes per client per round, and the peak RSS of the process.
With --server-memory, each partition size runs in its own process (one round, then its RSS).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedit.checkpoint import save_checkpoint
from fedit.client.batching import collate, token_losses
from fedit.client.train import client_schedule
from fedit.config import load_config
from fedit.lora import set_adapter, state_bytes
from fedit.recipe import Setup, setup_run
from fedit.seeding import derive_seed


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        rates.append(2 * n**3 * 10 / (time.perf_counter() - t))
    return statistics.median(rates)


def matmul_params(model: Any) -> int:
    """Parameters that take part in a matmul per token (the LM head included, LoRA excluded)."""
    base = model.get_base_model()
    n = sum(
        m.weight.numel()
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in name
    )
    return int(n)


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def plain_training(run: Setup, clients: list[int], rnd: int) -> tuple[float, int]:
    """The floor: the same batches through one optimizer, no federation around them."""
    cfg = run.cfg.client
    model, runtime = run.lm.model, run.engine.runtime  # type: ignore[attr-defined]
    set_adapter(model, run.server.global_state)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = []
    for c in clients:
        examples = runtime.examples(c)
        schedule = client_schedule(examples, cfg, derive_seed(run.cfg.seed, "client", rnd, c))
        batches += [[[examples[i] for i in mb] for mb in step] for step in schedule]
    model.train()
    tokens = 0
    start = time.perf_counter()
    for step in batches:
        n_targets = sum(e.num_target_tokens for mb in step for e in mb)
        for mb in step:
            batch = collate(mb, run.lm.pad_id)
            losses, _ = token_losses(model, batch)
            (losses.sum() / n_targets).backward()
            tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    model.eval()
    return seconds, tokens


def measure(config: str, overrides: list[str], repeats: int) -> dict[str, Any]:
    cfg = load_config(config, overrides)
    peak = matmul_peak()
    t = time.perf_counter()
    run = setup_run(cfg)
    server = run.server
    setup = time.perf_counter() - t
    rnd = 1
    clients = server.select(rnd)
    t = time.perf_counter()
    for c in clients:
        run.engine.runtime.examples(c)  # type: ignore[attr-defined]
    tokenize = time.perf_counter() - t
    start_state = dict(server.global_state)
    # Alternate fedit and the floor, each from the same start, so warm-up and drift hit both.
    fedit_times, floor_times = [], []
    floor_tokens = 0
    for r in range(repeats):
        if r % 2:  # every other repeat runs the floor first: no order effect
            server.global_state = start_state
            seconds, floor_tokens = plain_training(run, clients, rnd)
            floor_times.append(seconds)
        server.global_state = start_state
        row = server.run_round(rnd, run.engine)
        fedit_times.append(row["time"]["train"])
        end_state = server.global_state
        if not r % 2:
            server.global_state = start_state
            seconds, floor_tokens = plain_training(run, clients, rnd)
            floor_times.append(seconds)
    server.global_state = end_state
    fedit_train = statistics.median(fedit_times)
    floor_seconds = statistics.median(floor_times)
    aggregate = row["time"]["aggregate"]
    t = time.perf_counter()
    run.evaluate()
    evaluate = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        save_checkpoint(Path(tmp), rnd, run.lm.model, server.global_state, {}, {"round": rnd})
        checkpoint = time.perf_counter() - t
    cm = row["client_metrics"]
    real = sum(c["real_tokens"] for c in cm)
    computed = sum(c["real_tokens"] / c["padding_efficiency"] for c in cm)
    mcfg = run.lm.model.get_base_model().config
    seq = computed / sum(c["steps"] for c in cm) / cfg.client.batch_size
    flops_per_token = (
        4 * matmul_params(run.lm.model) + 12 * mcfg.num_hidden_layers * seq * mcfg.hidden_size
    )
    tokens_per_s = real / fedit_train
    return {
        "model": cfg.model.name,
        "clients_per_round": len(clients),
        "steps_per_client": cfg.client.max_steps,
        "micro_batch": cfg.client.micro_batch_size,
        "peak_gflops": peak / 1e9,
        "setup_s": setup,
        "tokenize_s": tokenize,
        "repeats": repeats,
        "fedit_round_train_s": fedit_train,
        "floor_train_s": floor_seconds,
        "federation_overhead": fedit_train / floor_seconds,
        "federation_overhead_with_aggregation": (fedit_train + aggregate) / floor_seconds,
        "same_tokens": floor_tokens == real,
        "real_tokens": real,
        "tokens_per_s": tokens_per_s,
        "padding_efficiency": real / computed,
        "mfu": flops_per_token * tokens_per_s / peak,
        "adapter_load_and_setup_s": sum(c["setup_seconds"] for c in cm),
        "batching_s": sum(c["collate_seconds"] for c in cm),
        "aggregate_s": aggregate,
        "eval_s": evaluate,
        "eval_examples": run.held.examples,
        "checkpoint_s": checkpoint,
        "bytes_per_client_per_round": state_bytes(server.global_state),
        "peak_rss_gib": rss_gib(),
    }


def server_memory(config: str, overrides: list[str], sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        code = (
            "import json,sys; sys.path.insert(0, 'benchmarks'); import perf; "
            "from fedit.config import load_config; from fedit.recipe import setup_run; "
            f"cfg = load_config({config!r}, {[*overrides, f'partition.num_clients={n}']!r}); "
            "run = setup_run(cfg); run.server.run_round(1, run.engine); "
            "print(json.dumps({'num_clients': run.server.num_clients, "
            "'peak_rss_gib': perf.rss_gib()}))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument("--repeats", type=int, default=3, help="alternating fedit / floor runs")
    ap.add_argument("--server-memory", default="", help="comma-separated partition sizes")
    args = ap.parse_args()
    if args.server_memory:
        sizes = [int(s) for s in args.server_memory.split(",")]
        result: Any = server_memory(args.config, args.overrides, sizes)
        for r in result:
            n, rss = r["num_clients"], r["peak_rss_gib"]
            print(f"{n:>6} clients in the partition: peak RSS {rss:.3f} GiB")
    else:
        result = measure(args.config, args.overrides, args.repeats)
        width = max(len(k) for k in result)
        for k, v in result.items():
            shown = f"{v:.4g}" if isinstance(v, float) else str(v)
            print(f"{k:<{width}}  {shown}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
