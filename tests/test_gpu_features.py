"""Training features for GPU-scale runs, checked on the CPU where they can be: gradient
checkpointing, quantization's refusal without CUDA, random full-size architectures, workers
placed on GPUs, and the memory estimate for each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedit.config import ConfigError, variant
from fedit.engines.pool import worker_device
from fedit.lora import get_adapter, load_lora_model
from fedit.models import ModelError, random_architecture
from fedit.recipe import run_federation
from fedit.resources import estimate_memory
from tests.conftest import client_runtime, tiny_config


def _batch(rt):  # type: ignore[no-untyped-def]
    ex = rt.examples(0)[:4]
    width = max(len(e.input_ids) for e in ex)
    pad = rt.lm.pad_id
    ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in ex])
    labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in ex])
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in ex])
    return ids, labels, mask


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(data_file: Path) -> None:
    """With LoRA dropout on, so the recomputation must replay the same dropout mask."""
    grads, losses, calls = [], [], []
    for on in (False, True):
        cfg = tiny_config(data_file, model={"gradient_checkpointing": on, "autocast": "off"},
                          lora={"dropout": 0.1})  # fmt: skip
        rt = client_runtime(cfg)
        model = rt.lm.model
        layer = model.base_model.model.model.layers[0].self_attn.q_proj  # inside layer 0
        count = [0]
        layer.register_forward_hook(lambda *_, n=count: n.__setitem__(0, n[0] + 1))
        ids, labels, mask = _batch(rt)
        model.train()
        torch.manual_seed(7)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        calls.append(count[0])
    assert calls == [1, 2]  # checkpointing really ran: layer 0 computed again in backward
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_run_equals_the_plain_run(data_file: Path) -> None:
    cfg = tiny_config(data_file, model={"autocast": "off"}, federation={"rounds": 1})
    plain = run_federation(cfg).adapter
    ckpt = run_federation(variant(cfg, model={"gradient_checkpointing": True})).adapter
    for k, v in plain.items():
        torch.testing.assert_close(ckpt[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantization_is_refused_clearly_without_cuda(data_file: Path, bits: str) -> None:
    cfg = tiny_config(data_file, model={"quantization": bits, "device": "cpu"})
    with pytest.raises(ModelError, match=f"model.quantization='{bits}' needs a CUDA GPU"):
        load_lora_model(cfg)


def test_a_bad_quantization_value_names_the_key(data_file: Path) -> None:
    with pytest.raises(ConfigError, match="model.quantization"):
        tiny_config(data_file, model={"quantization": "3bit"})


def test_random_presets_are_the_published_architectures() -> None:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # full size, no memory
        llama = AutoModelForCausalLM.from_config(random_architecture("fedit/random:llama-7b"))
        smol = AutoModelForCausalLM.from_config(random_architecture("fedit/random:smollm2-135m"))
    assert sum(p.numel() for p in llama.parameters()) == 6_738_415_616  # LLaMA-7B
    assert sum(p.numel() for p in smol.parameters()) == 134_515_008  # SmolLM2-135M
    with pytest.raises(ModelError, match="neither a preset"):
        random_architecture("fedit/random:llama-9b")


def test_a_random_model_from_a_config_folder_trains_and_is_seeded(
    tmp_path: Path, data_file: Path
) -> None:
    """A config.json folder (as a hub model's), SmolLM2's tokenizer: dolly's real tokens on a
    random architecture; the same seed gives the same weights and adapter."""
    folder = tmp_path / "arch"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 1000}))  # fmt: skip
    cfg = tiny_config(data_file, model={"name": f"fedit/random:{folder}"},
                      federation={"rounds": 1})  # fmt: skip
    lm = load_lora_model(cfg)
    assert lm.model.config.vocab_size == len(lm.tokenizer) == 49152  # grown to the tokenizer
    again = load_lora_model(cfg)
    base = {k: v for k, v in lm.model.state_dict().items() if "lora_" not in k}
    other = again.model.state_dict()
    assert all(torch.equal(v, other[k]) for k, v in base.items())
    a = run_federation(cfg).adapter
    b = run_federation(cfg).adapter
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in get_adapter(lm.model).items())


def test_workers_each_take_their_own_gpu(data_file: Path) -> None:
    cfg = tiny_config(data_file)
    assert [worker_device(cfg, i, 4) for i in range(5)] == [
        "cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0"]  # fmt: skip
    assert worker_device(cfg, 1, 1) == "auto"  # one GPU or none: as configured
    pinned = tiny_config(data_file, model={"device": "cuda:1"})
    assert worker_device(pinned, 0, 4) == "cuda:1"


def test_memory_estimate_follows_quantization_and_checkpointing(data_file: Path) -> None:
    arch = random_architecture("fedit/random:llama-7b")
    cfg = tiny_config(data_file, model={"dtype": "bfloat16"}, data={"cutoff_len": 512},
                      client={"micro_batch_size": 4})  # fmt: skip
    bf16 = estimate_memory(arch, cfg)
    q4 = estimate_memory(arch, variant(cfg, model={"quantization": "4bit"}))
    gc = estimate_memory(arch, variant(cfg, model={"gradient_checkpointing": True}))
    assert 12.5e9 < bf16.weights < 14e9  # 6.7B weights in bf16
    assert 3.5e9 < q4.weights < 4.5e9  # NF4 layers, bf16 embeddings
    assert gc.activations < bf16.activations / 10
