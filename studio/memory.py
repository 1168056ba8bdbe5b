"""Memory estimator: pure functions of (model config, method, data shape, train settings, device).

`estimate(run_cfg, device)` returns itemised bytes as data (see `Estimate`). Counts that can be exact
are exact: the model is built on the meta device from its config (no weights, no GPU) with the
method applied, so parameter counts, weight, gradient and optimizer bytes are those of the very
modules the trainer will allocate, for every method, present or future. Activations follow the
op-by-op model in memory_act.py (validated against what autograd saves in tests/test_memory.py).

How the trainer runs (and so what is modelled): base weights in the model dtype (auto = bf16 on
CUDA, fp32 on CPU) or NF4 (bitsandbytes, double quantization, blocksize 64, decoder Linears only);
adapter parameters fp32; gradients in the parameter's dtype; torch AdamW (2 states per trainable
parameter in its dtype, fused on CUDA, foreach on CPU), bitsandbytes 8-bit AdamW (1 byte per state
for tensors of >= 4096 elements, fp32 below), paged = states in host-side managed memory; bf16
autocast on CUDA; non-reentrant per-layer gradient checkpointing; sdpa attention; the chunked loss
of studio/losses.py; gradients set to None after each optimizer step.

The peak of a step: static (context + weights + optimizer states) plus the largest of
(a) the start of backward: all activations + the loss chunk's logits + head gradients,
(b) any layer's backward: activations still held + gradients produced so far + that layer's
    backward buffers (with checkpointing: the recomputed layer),
(c) the optimizer step: all gradients + the optimizer's temporary buffers.
So `total` can be less than the sum of the items; `not_concurrent` says by how much.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import yaml
from torch import nn

from .checkpointing import checkpointed_layers
from .errors import ConfigError, StudioError
from .losses import WEIGHT_GRAD_LOGITS, vocab_block
from .memory_act import (SITES_ALL, Arch, Dtypes, LayerInfo, Shape, Site, backward_transient, layer_saved,
                         norm_saved, rope_saved)
from .step_graph import captured_length, config_captures

ROOT = Path(__file__).resolve().parents[1]
GPUS_FILE = ROOT / "presets" / "gpus.yaml"
CUDA_CONTEXT_BYTES = 500 * 2**20   # CUDA context + cuBLAS/cuDNN workspaces (version dependent; configurable)
NF4_BLOCK = 64                     # NF4 block size (one absmax per 64 weights)
DQ_BLOCK = 256                     # double quantization: the absmax values in blocks of 256
BNB_MIN_8BIT = 4096                # bitsandbytes keeps 32-bit states for smaller tensors
BNB_BLOCK = 256                    # blockwise 8-bit optimizer state: one fp32 absmax per 256 values
SGD_STATES = 1                     # the trainer's SGD uses momentum 0.9: one buffer per param
ITEMS = ("context", "weights", "gradients", "optimizer", "activations", "logits", "method_extra", "transient")


@dataclass
class Estimate:
    """Itemised bytes at the peak of a training step (all ints, bytes), plus counts and details."""
    context: int = 0
    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    logits: int = 0
    method_extra: int = 0
    transient: int = 0
    total: int = 0
    trainable_params: int = 0
    total_params: int = 0
    device: str = "cuda"
    details: dict = field(default_factory=dict)

    @property
    def items(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ITEMS}

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["not_concurrent"] = sum(self.items.values()) - self.total
        return out


# ------------------------------------------------------------------------------------------ model facts
@dataclass
class Facts:
    """What the meta-device model with the method applied tells the estimator."""
    arch: Arch
    layers: list[LayerInfo]
    total_params: int
    trainable_params: int
    weights_by_dtype: dict[str, int]
    weights_bytes: int
    buffers_bytes: int
    grad_bytes: int
    grad_layer: list[int]
    grad_outside: int
    trainable_tensors: list[tuple[int, int]]   # (numel, element size) of each trainable tensor
    embeddings_trainable: bool
    final_norm_trainable: bool
    outside_trainable: int                     # trainable params outside the layers, not embeddings/head
    fp32_trainable: int                        # trainable fp32 numel (autocast keeps bf16 copies of them)
    max_linear: int                            # largest decoder Linear (numel) - 4-bit dequantization buffer
    host_copy_bytes: int = 0                   # full FT keep_base_copy
    fused_head: bool = False                   # plain Linear head: losses.FusedLinearCrossEntropy
    head_trainable: bool = False               # ... whose weight trains (whole-vocabulary chunks + fp32 grad)


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def nf4_bytes(numel: int) -> int:
    """Bytes of one NF4 weight: packed 4-bit values, uint8 absmax per 64 (double quantized) + constants."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2) + blocks + math.ceil(blocks / DQ_BLOCK) * 4 + 4 + 16 * 4


def _cfg_key(run_cfg: Any, dtype: torch.dtype) -> tuple:
    m = run_cfg.model
    return (m.name, m.trust_remote_code, m.attn_implementation, str(dtype), repr(dataclasses.asdict(run_cfg.method)))


_FACTS: dict[tuple, Facts] = {}


def model_facts(run_cfg: Any, dtype: torch.dtype, nf4: bool) -> Facts:
    """Facts of the run's model on the meta device (cached per model/method config)."""
    key = _cfg_key(run_cfg, dtype) + (nf4,)
    if key in _FACTS:
        return _FACTS[key]
    from .methods.common import decoder_layers
    from .params import meta_model
    base_ids: set[int] = set()

    def record(model: nn.Module) -> None:
        base_ids.clear()
        for lay in decoder_layers(model):
            for mod in lay.modules():
                if type(mod) is nn.Linear:
                    base_ids.add(id(mod.weight))

    model = meta_model(run_cfg, dtype=dtype, before_apply=record)
    facts = _collect(model, base_ids, nf4, run_cfg)
    if len(_FACTS) > 64:
        _FACTS.clear()
    _FACTS[key] = facts
    return facts


def _collect(model: nn.Module, base_ids: set[int], nf4: bool, run_cfg: Any) -> Facts:
    from .methods.common import decoder_layers, layer_index
    arch = Arch.from_config(model.config)
    layers_mod = decoder_layers(model)
    seen: set[int] = set()
    total = trainable = weights = grad = fp32_tr = 0
    by_dtype: dict[str, int] = {}
    grad_layer = [0] * len(layers_mod)
    grad_outside = outside_tr = 0
    tensors: list[tuple[int, int]] = []
    embed = model.get_input_embeddings()
    embed_ids = {id(p) for p in embed.parameters()} if embed is not None else set()
    head = model.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    max_linear = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        if nf4 and id(p) in base_ids:
            b, dt = nf4_bytes(n), "nf4"
            max_linear = max(max_linear, n)
        else:
            b, dt = n * p.element_size(), str(p.dtype).replace("torch.", "")
        weights += b
        by_dtype[dt] = by_dtype.get(dt, 0) + b
        if p.requires_grad:
            trainable += n
            gb = n * p.element_size()
            grad += gb
            tensors.append((n, p.element_size()))
            if p.dtype == torch.float32:
                fp32_tr += n
            idx = layer_index(name)
            if idx is not None and idx < len(grad_layer):
                grad_layer[idx] += gb
            else:
                grad_outside += gb
                if id(p) not in embed_ids and id(p) not in head_ids and "norm" not in name:
                    outside_tr += n
    buffers = 0
    bseen: set[int] = set()
    for _, buf in model.named_buffers(remove_duplicate=False):
        if id(buf) in bseen:
            continue
        bseen.add(id(buf))
        buffers += buf.numel() * buf.element_size()
    by_dtype["buffers"] = buffers
    layer_infos = [_layer_info(lay) for lay in layers_mod]
    final_norm_tr = any(p.requires_grad for n, p in model.named_parameters()
                        if layer_index(n) is None and "norm" in n)
    host_copy = 0
    cfg = run_cfg.method
    if getattr(cfg, "keep_base_copy", False):
        host_copy = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    fused = type(head) is nn.Linear and head.bias is None
    head_tr = head is not None and any(p.requires_grad for p in head.parameters())
    return Facts(arch, layer_infos, total, trainable, by_dtype, weights + buffers, buffers, grad, grad_layer,
                 grad_outside, tensors, any(p.requires_grad for p in embed.parameters()) if embed else False,
                 final_norm_tr, outside_tr, fp32_tr, max_linear, host_copy, fused, head_tr)


def _layer_info(layer: nn.Module) -> LayerInfo:
    sites: dict[str, Site] = {}
    site_paths: list[str] = []
    for path, mod in layer.named_modules():
        short = path.rsplit(".", 1)[-1]
        if short not in SITES_ALL or any(path.startswith(sp + ".") for sp in site_paths):
            continue
        site_paths.append(path)
        sites[short] = _site(short, mod)
    norms_tr = any(p.requires_grad for n, p in layer.named_parameters() if "norm" in n)
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    extra: list[int] = []
    for path, mod in layer.named_modules():
        if any(path == sp or path.startswith(sp + ".") for sp in site_paths):
            continue
        if isinstance(mod, nn.Linear) and any(p.requires_grad for p in mod.parameters(recurse=False)):
            extra.append(mod.in_features)
    return LayerInfo(sites, norms_tr, trainable, extra)


def _site(name: str, mod: nn.Module) -> Site:
    base = getattr(mod, "base_layer", mod)
    din = getattr(base, "in_features", 0) or getattr(mod, "in_features", 0)
    dout = getattr(base, "out_features", 0) or getattr(mod, "out_features", 0)
    w = getattr(base, "weight", None)
    site = Site(name, din, dout, base_trainable=bool(isinstance(w, torch.Tensor) and w.requires_grad))
    if base is mod:
        return site
    lora_a = getattr(mod, "lora_A", None)
    if lora_a is not None and getattr(mod, "lora_B", None) is not None:
        if isinstance(lora_a, nn.Linear):
            site.lora_r = lora_a.out_features
        elif isinstance(lora_a, torch.Tensor):
            site.lora_r = lora_a.shape[0]
        else:  # e.g. a ModuleDict per adapter name
            site.lora_r = int(getattr(mod, "r", 8) or 8)
        drop = getattr(mod, "lora_dropout", None)
        site.lora_dropout = float(getattr(drop, "p", 0.0) or 0.0)
        site.dora = bool(getattr(mod, "use_dora", False))
        site.lora_fused = bool(getattr(mod, "uses_fused_op", lambda: False)())  # 4-bit bases fuse too
        return site
    ia3 = getattr(mod, "ia3_l", None)
    if isinstance(ia3, torch.Tensor):
        site.ia3 = "in" if (ia3.dim() == 2 and ia3.shape[0] == 1 and ia3.shape[-1] == din != dout) or \
            getattr(mod, "is_feedforward", False) else "out"
        return site
    base_params = {id(p) for p in base.parameters()}
    site.other_trainable = any(p.requires_grad and id(p) not in base_params for p in mod.parameters())
    names = [n for n, _ in mod.named_parameters()]
    if any(n.startswith("hada_") for n in names):
        site.delta_weights = 2            # LoHa: both Hadamard factors are weight-sized
    elif any(n.startswith(("lokr_", "phm_", "glora_")) for n in names):
        site.delta_weights = 0            # factored forward: no weight-sized tensor kept
    else:
        site.delta_weights = 1
    return site


# ------------------------------------------------------------------------------------------ method rules
def method_rule(run_cfg: Any) -> dict[str, Any]:
    """How the method changes the step's shape: virtual tokens, prefix KV, backbone without grad.

    Looked up by category and name; an unknown future method gets the generic rule (nothing changes
    the sequence; activations from its modules per memory_act's documented assumption).
    """
    from .methods import get_method
    cfg = run_cfg.method
    method = get_method(cfg.name)
    name, cat = method.name.lower(), method.category
    n_virtual = int(getattr(cfg, "num_virtual_tokens", 0) or getattr(cfg, "n_tokens", 0) or 0)
    rule = {"name": name, "category": cat, "prompt_tokens": 0, "prefix_tokens": 0, "no_backbone_grad": False,
            "input_grad": False, "rule": "generic: exact parameters; activations from the modules it adds"}
    if cat == "soft_prompt" or n_virtual:
        if "prefix" in name or "ptuning_v2" in name or "p_tuning_v2" in name:
            rule.update(prefix_tokens=n_virtual, rule="prefix: n key/value vectors per layer lengthen attention")
        else:
            rule.update(prompt_tokens=n_virtual, input_grad=True,
                        rule="soft prompt: n virtual tokens added to every sequence; grad flows from the input")
    if "prefix" in name and cat == "hybrid":
        rule["prefix_tokens"] = int(getattr(cfg, "prefix_tokens", 0) or getattr(cfg, "num_virtual_tokens", 0) or 0)
    if name in ("lst", "ladder", "ladder_side_tuning") or "ladder" in name:
        rule.update(no_backbone_grad=True, rule="ladder side-tuning: no backward through the backbone")
    if name in ("lora",) or cat == "reparameterised":
        rule["rule"] = "reparameterised: adapters on chosen linears; frozen bottom keeps nothing"
    if name == "full":
        rule["rule"] = "full: every weight trains"
    return rule


# ------------------------------------------------------------------------------------------ the estimate
def _seq_len(run_cfg: Any, dataset_lengths: Iterable[int] | None) -> tuple[int, bool]:
    """Sequence length of the largest batch and whether a padding mask is likely."""
    max_len = int(run_cfg.data.max_length)
    b = int(run_cfg.train.batch_size)
    if run_cfg.data.packing:
        return max_len, False
    if dataset_lengths:
        lens = [min(int(x), max_len) for x in dataset_lengths]
        return max(lens), b > 1 and len(set(lens)) > 1
    return max_len, b > 1


def estimate(run_cfg: Any, device: str = "cuda", gpu: str | None = None,
             dataset_lengths: Iterable[int] | None = None, *, padding: bool | None = None,
             context_bytes: int | None = None, labelled_fraction: float = 1.0) -> Estimate:
    """Itemised peak memory of one training step of `run_cfg` on `device` ("cuda" or "cpu").

    dataset_lengths: token lengths of the examples (the largest batch sets the sequence length);
    without them data.max_length is used. padding: whether batches carry a padding mask (default:
    batch_size > 1 with varying or unknown lengths and no packing). labelled_fraction: share of
    positions with labels (prompt masking shrinks the loss buffers). gpu: a presets/gpus.yaml name
    (T4 has no bf16: fp16, same bytes). No weights are loaded and no GPU is needed.
    """
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"estimate device must be cuda or cpu, got {device!r}.")
    if gpu is not None:
        gpu_memory(gpu)  # validates the name
    if run_cfg.train.gradient_checkpointing and run_cfg.train.checkpoint_budget_gb > 0:
        return fitted_checkpointing(run_cfg, lambda cfg: estimate(
            cfg, device, gpu, dataset_lengths, padding=padding, context_bytes=context_bytes,
            labelled_fraction=labelled_fraction))
    mc, tc = run_cfg.model, run_cfg.train
    nf4 = mc.quantization == "nf4"
    if mc.quantization == "int8":
        raise ConfigError("The estimator models 16/32-bit and NF4 bases; int8 is not modelled yet.")
    pdtype = _dtype(mc.compute_dtype if nf4 else mc.dtype, device)
    facts = model_facts(run_cfg, pdtype, nf4)
    arch = facts.arch
    rule = method_rule(run_cfg)
    act = torch.finfo(pdtype).bits // 8
    # the trainer autocasts to a 16-bit base dtype (on the CPU only to bf16): fp32 adapters then see 16-bit copies
    dt = Dtypes(act=act, autocast=act == 2 and (device == "cuda" or pdtype == torch.bfloat16), cuda=device == "cuda")
    seq, pad = _seq_len(run_cfg, dataset_lengths)
    if padding is not None:
        pad = padding
    tokens = seq
    graphs = device == "cuda" and config_captures(run_cfg, facts.total_params, pdtype, int(tc.batch_size) * seq)
    if graphs:  # train.cuda_graphs: each micro-batch padded to its graph's length (a mask only when packed)
        seq, pad = captured_length(seq, int(run_cfg.data.max_length)), False
    b = int(tc.batch_size)
    s = seq + rule["prompt_tokens"]
    labelled = max(1, int(b * max(tokens - 1, 1) * labelled_fraction))
    shape = Shape(b, s, kv_extra=rule["prefix_tokens"], labelled=labelled, padded=pad)
    gc_layers = checkpointed_layers(len(facts.layers), tc.checkpoint_fraction if tc.gradient_checkpointing else 0)
    gc = all(gc_layers) and bool(gc_layers)   # every layer recomputed
    # offloaded checkpoints: the recomputed layers' inputs wait in host memory (studio/offload.py)
    offload = device == "cuda" and bool(tc.gradient_checkpointing) and bool(tc.offload_checkpoints)
    layer_input = b * s * arch.hidden * act

    # ---- activations, per layer
    g = facts.embeddings_trainable or rule["input_grad"] or facts.outside_trainable > 0 and rule["prompt_tokens"] > 0
    per_layer: list[int] = []
    recompute: list[int] = []
    first_grad = None
    for k, info in enumerate(facts.layers):
        full, g_out = layer_saved(arch, info, shape, dt, k, g)
        if rule["no_backbone_grad"]:
            full, g_out = 0, False
        recompute.append(full)
        if first_grad is None and (g or g_out):
            first_grad = k
        per_layer.append((0 if offload else layer_input) if gc_layers[k] and not rule["no_backbone_grad"] else full)
        g = g or g_out
    rows = b * s
    rope = rope_saved(arch, shape, dt) if any(recompute) else 0   # with checkpointing held, not saved
    fixed = 0 if gc else rope
    if facts.embeddings_trainable:
        fixed += b * seq * 8                                              # input ids (embedding backward)
    fixed += norm_saved(rows, arch.hidden, g, facts.final_norm_trainable, arch.gemma_norms, dt, arch.fused_norms)
    # ---- the loss: kept hidden states of labelled positions, indices, labels; chunk logits
    logits_saved = labelled * arch.hidden * act + labelled * 8 + b * seq if (g or facts.grad_outside) else 0
    c = min(int(tc.loss_chunk), labelled)
    if facts.fused_head and facts.head_trainable:
        # Fused, trained head: the fp32 d(loss)/d(W) is saved from forward to backward; per chunk the
        # whole-vocabulary fp32 logits of a capped chunk (and their 16-bit copy) and the chunk's product
        logits_saved += arch.vocab * arch.hidden * 4
        c = min(c, max(1, WEIGHT_GRAD_LOGITS // arch.vocab))
        chunk = c * arch.vocab * (4 + (act if act < 4 else 0)) + arch.vocab * arch.hidden * act
        chunk += c * arch.vocab * 4 if arch.softcap else 0
    elif facts.fused_head:
        # Fused linear + CE over vocabulary blocks: fp32 logits of one block beside their 16-bit matmul
        # output (or 16-bit softmax copy); G, G / S and W_y (c x hidden, fp32) at the chunk's end
        vb = vocab_block(c, arch.vocab, device, arch.hidden, act)
        chunk = c * vb * (4 + (act if act < 4 else 0)) + c * arch.hidden * 12
        chunk += c * vb * 4 if arch.softcap else 0
    else:  # checkpointed chunk: logits, their gradient and the softmax, recomputed in backward
        chunk = c * arch.vocab * (4 + 4 + 4) + (c * arch.vocab * act if act < 4 else 0)
        chunk += c * arch.vocab * 4 if arch.softcap else 0
    saved = sum(per_layer) + fixed + logits_saved
    mask_bool = 0
    if pad or shape.kv_extra or any(arch.layer_types[k] == "sliding_attention" for k in range(arch.layers)) and \
            arch.sliding_window and s > arch.sliding_window:
        kinds = 2 if (arch.sliding_window and len(set(arch.layer_types)) > 1) else 1
        mask_bool = kinds * b * s * (s + shape.kv_extra)                  # the bool masks of the forward
    if run_cfg.data.packing:
        mask_bool += b * seq * seq  # the packed batch's block-diagonal mask (varlen attention's fallback)
        if graphs and dt.autocast:  # a captured step's attention reads it as one additive mask all layers share
            mask_bool += b * seq * seq * act
    # 16-bit copies of the fp32 trainable weights: autocast's cache, or the fused LoRA op's step copies
    autocast_cache = facts.fp32_trainable * 2 if dt.autocast else 0
    activations = sum(per_layer) + fixed + mask_bool + autocast_cache + (rope if gc else 0)
    logits = logits_saved + chunk

    # ---- method extras
    extra, notes = 0, []
    L = arch.layers
    if rule["prefix_tokens"]:
        extra += 2 * L * b * rule["prefix_tokens"] * arch.kv_heads * arch.head_dim * act
        notes.append("prefix keys/values expanded to the batch")
    if rule["prompt_tokens"]:
        extra += b * rule["prompt_tokens"] * arch.hidden * act
        notes.append("prompt embeddings expanded to the batch")
    host_extra = facts.host_copy_bytes
    offloaded = layer_input * sum(gc_layers) if offload and not rule["no_backbone_grad"] else 0
    if offloaded:
        notes.append(f"checkpointed layer inputs in pinned CPU RAM: {human(offloaded)}")
    if device == "cpu" and host_extra:
        extra += host_extra
        notes.append("full: CPU copy of the base weights (keep_base_copy)")
    if "child" in rule["name"]:
        extra += facts.trainable_params  # a bool mask per trainable weight
        notes.append("child-tuning gradient mask")
    if graphs:
        notes.append(f"CUDA graphs: batches padded to {seq} tokens" + (
            "; the graphs keep the step's memory reserved, so evaluation passes need room beside it (not counted)"
            if run_cfg.data.eval_fraction > 0 else ""))

    # ---- gradients and optimizer
    opt_gpu, opt_host, opt_transient = _optimizer_bytes(tc.optimizer, facts.trainable_tensors, device)
    grads = facts.grad_bytes
    context = 0 if device == "cpu" else (CUDA_CONTEXT_BYTES if context_bytes is None else int(context_bytes))
    bwd = backward_transient(arch, shape, dt)
    if nf4:
        bwd += facts.max_linear * act                                     # dequantized 4-bit weight
    phases = {"loss backward": activations + logits + facts.grad_outside + extra}
    held = fixed + mask_bool + autocast_cache + extra + facts.grad_outside + (rope if gc else 0)
    below = sum(per_layer)
    grads_done = 0
    worst_layer = ("layer backward", 0, 0)
    for k in reversed(range(len(per_layer))):
        below -= per_layer[k]
        grads_done += facts.grad_layer[k]
        tr = bwd + (recompute[k] if gc_layers[k] else 0)
        if offload and gc_layers[k] and k > 0:
            tr += layer_input                                              # the layer below, fetched ahead
        val = held + below + per_layer[k] + tr + grads_done
        if val > worst_layer[1]:
            worst_layer = (f"backward of layer {k}", val, tr)
    phases[worst_layer[0]] = worst_layer[1]
    phases["optimizer step"] = grads + opt_transient
    peak_phase = max(phases, key=phases.get)
    transient = {"loss backward": 0, "optimizer step": opt_transient}.get(peak_phase, worst_layer[2])
    static = context + facts.weights_bytes + opt_gpu
    total = static + phases[peak_phase]
    est = Estimate(context=context, weights=facts.weights_bytes, gradients=grads, optimizer=opt_gpu,
                   activations=activations, logits=logits, method_extra=extra, transient=transient, total=total,
                   trainable_params=facts.trainable_params, total_params=facts.total_params, device=device)
    est.details = {
        "model": mc.name, "method": run_cfg.method.name, "rule": rule["rule"], "batch": b, "seq": s,
        "text_seq": seq, "cuda_graphs": graphs, "labelled_positions": labelled, "loss_chunk": c, "padding_mask": pad,
        "gradient_checkpointing": gc, "checkpointed_layers": sum(gc_layers), "layers": len(gc_layers),
        "param_dtype": str(pdtype).replace("torch.", ""), "activation_bytes": act,
        "quantization": mc.quantization, "optimizer": tc.optimizer,
        "weights_by_dtype": facts.weights_by_dtype, "optimizer_host": opt_host,
        "host_only": host_extra if device == "cuda" else 0, "offloaded_to_host": offloaded,
        "activations_per_layer": per_layer, "recompute_per_layer": recompute,
        "first_layer_with_grad": first_grad,
        "saved_for_backward": saved, "logits_saved": logits_saved, "logits_chunk": chunk,
        "fixed_activations": fixed, "attention_masks": mask_bool, "autocast_copies": autocast_cache,
        "phases": phases, "peak_phase": peak_phase, "notes": notes,
        "gpu": gpu, "gpu_memory": gpu_memory(gpu) if gpu else None,
        "fits": (total <= gpu_memory(gpu)) if gpu else None,
    }
    return est


def fitted_checkpointing(run_cfg: Any, estimate_of: Callable[[Any], Estimate]) -> Estimate:
    """The estimate of run_cfg with the fewest recomputed layers (the bottom ones) whose total stays within
    train.checkpoint_budget_gb (GiB); when none fits, the count with the least total. Recomputing the top
    layer too can cost more than keeping it (its rebuilt activations come on top of every layer's input),
    so every count is tried (an estimate takes well under a millisecond once the model's facts are cached).
    details: checkpoint_budget (bytes), checkpoint_fits, checkpointed_layers (what the trainer then
    recomputes) and layers."""
    budget = int(run_cfg.train.checkpoint_budget_gb * 2**30)
    every = estimate_of(_with(run_cfg, **{"train.checkpoint_budget_gb": 0.0, "train.checkpoint_fraction": 1.0}))
    layers = every.details["layers"]
    best = None
    for k in range(layers + 1):
        trial = every if k == layers else estimate_of(_with(run_cfg, **{"train.checkpoint_budget_gb": 0.0,
                                                                        "train.checkpoint_fraction": k / layers}))
        if trial.total <= budget:
            best = trial
            break
        if best is None or trial.total < best.total:
            best = trial
    best.details.update(checkpoint_budget=budget, checkpoint_fits=best.total <= budget)
    return best


def budget_fraction(run_cfg: Any, device: str, dataset_lengths: Iterable[int] | None = None,
                    padding: bool | None = None) -> tuple[float, str]:
    """train.checkpoint_budget_gb as the share of layers a run recomputes, and a line for the user saying so
    (dataset_lengths and padding as for estimate)."""
    try:
        est = estimate(run_cfg, device, dataset_lengths=dataset_lengths, padding=padding)
    except Exception as e:  # noqa: BLE001 - no estimate: the run goes on with its fraction
        return float(run_cfg.train.checkpoint_fraction), (
            f"No memory estimate for this configuration ({e}), so train.checkpoint_budget_gb cannot pick the "
            "layers to recompute; train.checkpoint_fraction decides.")
    d = est.details
    k, n, budget = d["checkpointed_layers"], d["layers"], human(d["checkpoint_budget"])
    share = k / n if n else 1.0
    if not d["checkpoint_fits"]:
        return share, (f"The run does not fit train.checkpoint_budget_gb ({budget}) with any checkpointing: it "
                       f"recomputes {k} of {n} layers, the least memory (about {human(est.total)}). Lower "
                       "train.batch_size or data.max_length, or use model.quantization=nf4, to fit.")
    return share, f"Checkpointing fitted to {budget}: {k} of {n} layers recomputed (estimated peak {human(est.total)})."


def _optimizer_bytes(name: str, tensors: list[tuple[int, int]], device: str) -> tuple[int, int, int]:
    """(bytes on the device, bytes in host/managed memory, temporary bytes of the step)."""
    if name == "sgd":
        return sum(n * e for n, e in tensors) * SGD_STATES, 0, 0
    if name in ("adamw", "paged_adamw"):
        states = sum(2 * n * e + 4 for n, e in tensors)                   # exp_avg, exp_avg_sq, step
        # CUDA: fused, in place. CPU: torch's per-tensor loop (no foreach kernels there), whose
        # sqrt(v) and its quotient are two temporaries of the largest tensor at a time
        transient = 0 if device == "cuda" else 2 * max((n * e for n, e in tensors), default=0)
    else:
        states = 0
        for n, e in tensors:
            if n >= BNB_MIN_8BIT:
                states += 2 * n + 2 * math.ceil(n / BNB_BLOCK) * 4 + 8
            else:
                states += 2 * n * 4 + 8
        transient = 0
    if name.startswith("paged") and device == "cuda":
        return 0, states, transient
    return states, 0, transient


# ------------------------------------------------------------------------------------------ inference
def estimate_inference(model_ref_or_config: Any, context_len: int, batch: int = 1, dtype: str = "bfloat16",
                       quantization: str = "none", device: str = "cuda") -> dict[str, int]:
    """Weights + KV cache (+ context and the prefill peak) of generation, for the chat tab."""
    from transformers import AutoModelForCausalLM

    from .methods.common import decoder_layers
    from .models import hf_config_from_dict, resolve_model_config
    if isinstance(model_ref_or_config, str):
        config = resolve_model_config(model_ref_or_config)
    elif isinstance(model_ref_or_config, dict):
        config = hf_config_from_dict(model_ref_or_config)
    else:
        config = model_ref_or_config
    pdtype = _dtype(dtype, device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=pdtype)
    base = {id(m.weight) for lay in decoder_layers(model) for m in lay.modules() if type(m) is nn.Linear}
    weights = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        weights += nf4_bytes(p.numel()) if quantization == "nf4" and id(p) in base else p.numel() * p.element_size()
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    arch = Arch.from_config(model.config)
    elt = torch.finfo(pdtype).bits // 8
    kv = 0
    for k in range(arch.layers):
        sliding = k < len(arch.layer_types) and arch.layer_types[k] == "sliding_attention" and arch.sliding_window
        length = min(context_len, arch.sliding_window) if sliding else context_len
        kv += 2 * batch * length * arch.kv_heads * arch.head_dim * elt
    prefill = batch * context_len * (3 * arch.inter + 4 * arch.hidden) * elt + batch * arch.vocab * 4
    context = CUDA_CONTEXT_BYTES if device == "cuda" else 0
    return {"context": context, "weights": weights, "kv_cache": kv, "prefill": prefill,
            "total": context + weights + kv + prefill, "context_len": context_len, "batch": batch}


def estimate_chat(run_cfg: Any, context_len: int, dtype: str = "auto", device: str = "cuda") -> dict[str, int]:
    """What the chat tab holds for a run: estimate_inference of its base, plus the adapter's own weights
    ("adapter") and the merged copy of the adapted layers ("merged_copy", 0 where the chat cannot merge);
    "total" counts the adapter, "total_merged" the copy too (made only where it fits: merged_weights)."""
    from .merged_weights import copy_bytes, merge_plan
    from .params import meta_model
    pdtype = _dtype(dtype, device)
    out = dict(estimate_inference(run_cfg.model.name, context_len, 1, str(pdtype).removeprefix("torch."),
                                  run_cfg.model.quantization, device))
    base: set[int] = set()
    model = meta_model(run_cfg, dtype=pdtype, before_apply=lambda m: base.update(id(p) for p in m.parameters()))
    out["adapter"] = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
                         if id(p) not in base)
    wrappers, why_not = merge_plan(model)
    # PiSSA/OLoRA move part of the weight into the adapter: their base answers are not the original weights,
    # so the chat's probe leaves them unmerged (merged_weights)
    residual = str(getattr(run_cfg.method, "init_lora_weights", "")).lower() in ("pissa", "olora")
    out["merged_copy"] = 0 if why_not or residual or run_cfg.model.quantization != "none" else copy_bytes(wrappers)
    out["total"] += out["adapter"]
    out["total_merged"] = out["total"] + out["merged_copy"]
    return out


# ------------------------------------------------------------------------------------------ calculator
@lru_cache(maxsize=1)
def gpu_presets() -> dict[str, dict]:
    return yaml.safe_load(GPUS_FILE.read_text()) or {}


def gpu_memory(name: str) -> int:
    """Total bytes of a GPU preset (case-insensitive name), or of this machine's RAM for "CPU"."""
    if name.lower() in ("cpu", "cpu ram", "ram"):
        return cpu_ram()
    for key, val in gpu_presets().items():
        if key.lower() == name.lower() or key.lower().replace(" ", "") == name.lower().replace(" ", ""):
            return int(val["memory_mib"]) * 2**20
    raise ConfigError(f"Unknown GPU {name!r}; choose one of: {', '.join(gpu_presets())}, CPU.")


def cpu_ram() -> int:
    try:
        import psutil
        return int(psutil.virtual_memory().total)
    except ImportError:  # pragma: no cover - psutil is normally present
        import os
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fit_table(run_cfg: Any, dataset_lengths: Iterable[int] | None = None) -> list[dict]:
    """One row per GPU preset and one for this machine's RAM: {gpu, memory_bytes, total, fits}."""
    rows = []
    cuda = estimate(run_cfg, "cuda", dataset_lengths=dataset_lengths)
    for name in gpu_presets():
        mem = gpu_memory(name)
        rows.append({"gpu": name, "memory_bytes": mem, "total": cuda.total, "fits": cuda.total <= mem})
    cpu = estimate(run_cfg, "cpu", dataset_lengths=dataset_lengths)
    mem = cpu_ram()
    rows.append({"gpu": "CPU RAM", "memory_bytes": mem, "total": cpu.total, "fits": cpu.total <= mem})
    return rows


def _with(run_cfg: Any, **changes: Any) -> Any:
    """A copy of run_cfg with section.key changes, e.g. _with(cfg, **{"train.batch_size": 8})."""
    import copy
    new = copy.deepcopy(run_cfg)
    for key, value in changes.items():
        section, name = key.split(".", 1)
        setattr(getattr(new, section), name, value)
    return new


def _device_for(gpu: str) -> str:
    return "cpu" if gpu.lower() in ("cpu", "cpu ram", "ram") else "cuda"


def largest_fitting(run_cfg: Any, gpu: str, what: str = "batch_size", limit: int | None = None) -> int:
    """The largest batch_size, max_length or LoRA rank r that fits on `gpu` (0 if even 1 does not)."""
    keys = {"batch_size": "train.batch_size", "max_length": "data.max_length", "r": "method.r"}
    if what not in keys:
        raise ConfigError(f"largest_fitting answers batch_size, max_length or r, not {what!r}.")
    if what == "r" and not hasattr(run_cfg.method, "r"):
        raise ConfigError(f"Method {run_cfg.method.name} has no rank r.")
    mem, device = gpu_memory(gpu), _device_for(gpu)
    if limit is None:
        limit = {"batch_size": 4096, "max_length": 131072, "r": 4096}[what]
        if what == "max_length":
            from .models import resolve_model_config
            c = resolve_model_config(run_cfg.model.name, run_cfg.model.trust_remote_code)
            limit = int(getattr(getattr(c, "text_config", None) or c, "max_position_embeddings", limit) or limit)

    def fits(v: int) -> bool:
        return estimate(_with(run_cfg, **{keys[what]: v}), device).total <= mem

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def fewest_recomputed(run_cfg: Any, gpu: str) -> tuple[int, int] | None:
    """(recomputed layers, layers) of the fastest gradient checkpointing that fits `gpu` (0 recomputed: none
    needed), as train.checkpoint_budget_gb set to its memory would run; None when no count of recomputed
    layers fits."""
    budget = {"train.gradient_checkpointing": True, "train.checkpoint_budget_gb": gpu_memory(gpu) / 2**30}
    d = estimate(_with(run_cfg, **budget), _device_for(gpu)).details
    return (d["checkpointed_layers"], d["layers"]) if d["checkpoint_fits"] else None


def switches(run_cfg: Any) -> list[tuple[str, dict]]:
    """The memory switches that apply to this config: (label, changes)."""
    out = []
    tc, mc = run_cfg.train, run_cfg.model
    if not tc.gradient_checkpointing:
        out.append(("gradient checkpointing on", {"train.gradient_checkpointing": True}))
    if not (tc.gradient_checkpointing and tc.offload_checkpoints):
        out.append(("gradient checkpointing, layer inputs in CPU RAM",
                    {"train.gradient_checkpointing": True, "train.offload_checkpoints": True}))
    if mc.quantization == "none" and run_cfg.method.name != "full":
        out.append(("4-bit NF4 base (QLoRA)", {"model.quantization": "nf4"}))
    if tc.optimizer in ("adamw", "paged_adamw"):
        out.append(("8-bit AdamW", {"train.optimizer": tc.optimizer.replace("adamw", "adamw_8bit")}))
    if not tc.optimizer.startswith("paged") and tc.optimizer != "sgd":
        out.append(("paged optimizer (states in host memory)", {"train.optimizer": "paged_" + tc.optimizer}))
    if run_cfg.data.max_length > 64:
        half = run_cfg.data.max_length // 2
        out.append((f"shorter sequences (max_length {half})", {"data.max_length": half}))
    if tc.batch_size > 1:
        out.append((f"batch_size {max(1, tc.batch_size // 2)} (grad_accum x2)",
                    {"train.batch_size": max(1, tc.batch_size // 2), "train.grad_accum": tc.grad_accum * 2}))
    return out


def best_switch(run_cfg: Any, gpu: str) -> list[tuple[str, int]]:
    """(switch, saved bytes), switches that make the run fit first, then by bytes saved; except that
    checkpointing fitted to the card, when it makes the run fit, comes first: it recomputes only the
    layers that must be, the fastest way to fit that checkpointing has."""
    mem, device = gpu_memory(gpu), _device_for(gpu)
    base = estimate(run_cfg, device).total
    options = switches(run_cfg)
    tc = run_cfg.train
    offer_fitted = not (tc.gradient_checkpointing and tc.checkpoint_budget_gb > 0)
    if offer_fitted:
        options.insert(0, (f"gradient checkpointing fitted to {gpu}",
                           {"train.gradient_checkpointing": True, "train.checkpoint_budget_gb": mem / 2**30}))
    rows = []
    for k, (label, changes) in enumerate(options):
        try:
            est = estimate(_with(run_cfg, **changes), device)
        except StudioError:
            continue
        fits, first = est.total <= mem, offer_fitted and k == 0
        if first:
            if not fits:
                continue  # then the plain checkpointing switches below say what it can do
            label += f" (recomputes {est.details['checkpointed_layers']} of {est.details['layers']} layers)"
        rows.append((label, base - est.total, (not fits, not first, est.total - base)))
    rows.sort(key=lambda r: r[2])
    return [(label, saved) for label, saved, _ in rows]


def measured_vs_estimate(est: Estimate | dict, measured_peak_bytes: int) -> dict[str, Any]:
    """Compare an estimate with a measured peak.

    "Measured" means, on CUDA, torch.cuda.max_memory_allocated() over the training steps plus the
    CUDA context (the `context` item of the estimate, or a measured torch.cuda.mem_get_info delta);
    on CPU, the peak of the tensor bytes held during a step (e.g. sum of unique storages alive, or
    the bytes autograd saved plus weights, gradients and optimizer states). ratio = estimated /
    measured; error_percent = 100 * (estimated - measured) / measured (positive = over-estimate).
    """
    total = est.total if isinstance(est, Estimate) else int(est["total"])
    measured = int(measured_peak_bytes)
    ratio = total / measured if measured else float("inf")
    return {"estimated_bytes": total, "measured_bytes": measured, "ratio": ratio,
            "error_percent": 100.0 * (total - measured) / measured if measured else float("inf"),
            "within_5_percent": abs(total - measured) <= 0.05 * measured if measured else False}


def human(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def format_estimate(est: Estimate) -> str:
    d = est.details
    lines = [f"{d['model']} + {d['method']} on {est.device}: batch {d['batch']} x {d['seq']} tokens, "
             f"{d['param_dtype']} params ({d['quantization']}), optimizer {d['optimizer']}, "
             f"checkpointing {'on' if d['gradient_checkpointing'] else 'off'}",
             f"trainable {est.trainable_params:,} of {est.total_params:,} parameters"]
    for k in ITEMS:
        lines.append(f"  {k:<13}{human(getattr(est, k)):>12}")
    nc = sum(est.items.values()) - est.total
    if nc:
        lines.append(f"  {'not at peak':<13}{'-' + human(nc):>12}   (freed before the peak: {d['peak_phase']})")
    lines.append(f"  {'total':<13}{human(est.total):>12}   peak during {d['peak_phase']}")
    if d.get("optimizer_host"):
        lines.append(f"  (+ {human(d['optimizer_host'])} optimizer states in paged host memory)")
    if d.get("host_only"):
        lines.append(f"  (+ {human(d['host_only'])} CPU copy of the base weights)")
    return "\n".join(lines)
