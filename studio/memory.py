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
The estimate also makes the trainer's choice of layers to recompute, where the settings leave one: fitted to
train.checkpoint_budget_gb, or every layer but the top one when keeping that costs no more (checkpoint_share).
"""
from __future__ import annotations

import dataclasses
import math
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import gpus
from .checkpointing import checkpointed_layers
from .chunked_mlp import DEFERRED_MODEL_TYPES, defers, mlp_chunks
from .config import with_changes
from .errors import ConfigError
from .losses import WEIGHT_GRAD_LOGITS, decoder_body, vocab_block
from .memory_act import (SITES_ALL, Adapter, Arch, Dtypes, LayerInfo, Shape, Site, backward_transient, layer_saved,
                         norm_saved, rope_saved, side_network_saved)
from .memory_report import human
from .step_graph import captured_length, config_captures

# CUDA context, cuBLAS/cuDNN handles and workspaces, loaded kernels: what a training process holds outside
# torch's allocator (version and card dependent; configurable). An H200 with torch 2.11 / CUDA 13 held 0.81 GB
# (bench --memory --methods, 2026-11-29): cards with fewer multiprocessors hold less, so this errs on the safe side
CUDA_CONTEXT_BYTES = 800 * 2**20
# Blocks torch's caching allocator keeps beyond those in use (freed ones it has not given back, the unused ends of
# split ones): not in the estimate, which counts what is allocated. On an H200 (2026-11-29/30) the 7B rows reserved
# 0.24-1.37 GB over their allocated peak, the 0.5B rows 0.1-0.6 GB. A run estimated within this much of a card's
# memory is shown as a tight fit: the allocator may have to give blocks back while it runs, or run out.
ALLOCATOR_ROOM_BYTES = 2**30
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

    @property
    def recomputed_share(self) -> float:
        """The share of layers the estimated run recomputes (what the trainer checkpoints)."""
        layers = self.details.get("layers") or 0
        return self.details.get("checkpointed_layers", 0) / layers if layers else 0.0

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
    fp32_trainable: int                        # trainable fp32 numel whose 16-bit copies are kept (_autocast_kept)
    max_linear: int                            # largest decoder Linear (numel) - 4-bit dequantization buffer
    host_copy_bytes: int = 0                   # full FT keep_base_copy
    fused_head: bool = False                   # plain Linear head: losses.FusedLinearCrossEntropy
    head_trainable: bool = False               # ... whose weight trains (whole-vocabulary chunks + fp32 grad)
    max_rebuilt_delta: tuple[int, int] = (0, 0)  # bytes a ΔW rebuilt in backward holds at most (fp32; autocast)
    side_network: tuple[int, int, int] | None = None  # LST: (width, FFN width, blocks) of the side network
    prompt_encoder_saved: int = 0              # bytes a soft prompt's encoder keeps (in its parameters' dtype)


def allocator_room(device: str) -> int:
    """Bytes a plan leaves free beside its estimate on `device`: the caching allocator's (ALLOCATOR_ROOM_BYTES) on a
    GPU, none on the CPU, which has no such cache."""
    return 0 if device == "cpu" else ALLOCATOR_ROOM_BYTES


def tight_fit(total: int, capacity: int, device: str) -> bool:
    """Whether a run estimated at `total` fits a device of `capacity` bytes with less than allocator_room to spare."""
    return capacity - allocator_room(device) < total <= capacity


def model_dtype(name: str, device: str) -> torch.dtype:
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
    from .methods import get_method
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
    cast = _autocast_kept(model)
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
            if p.dtype == torch.float32 and id(p) in cast:
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
    layer_infos = [_layer_info(lay, nf4) for lay in layers_mod]
    final_norm = getattr(decoder_body(model), "norm", None)
    if isinstance(final_norm, nn.Module):  # not, say, LST's side network's norms
        final_norm_tr = any(p.requires_grad for p in final_norm.parameters())
    else:
        final_norm_tr = any(p.requires_grad for n, p in model.named_parameters()
                            if layer_index(n) is None and "norm" in n)
    host_copy = 0
    cfg = run_cfg.method
    kept = get_method(cfg.name).base_copy if getattr(cfg, "keep_base_copy", True) else None
    if kept:  # full fine-tuning's copy of every weight, or the selective methods' copy of what they train
        host_copy = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
                        if kept == "all" or p.requires_grad)
    fused = type(head) is nn.Linear and head.bias is None
    head_tr = head is not None and any(p.requires_grad for p in head.parameters())
    return Facts(arch, layer_infos, total, trainable, by_dtype, weights + buffers, buffers, grad, grad_layer,
                 grad_outside, tensors, any(p.requires_grad for p in embed.parameters()) if embed else False,
                 final_norm_tr, outside_tr, fp32_tr, max_linear, host_copy, fused, head_tr,
                 _max_rebuilt_delta(layer_infos), _side_network(model), _prompt_encoder_saved(model))


def _max_rebuilt_delta(infos: list[LayerInfo]) -> tuple[int, int]:
    """Bytes the largest rebuilt ΔW's backward holds (fp32 run, under autocast)."""
    sites = [s for info in infos for s in info.sites.values()]
    return tuple(int(max((s.rebuilt_buffers[k] * s.dout * s.din * 4 for s in sites), default=0)) for k in (0, 1))


def _side_network(model: nn.Module) -> tuple[int, int, int] | None:
    side = getattr(model, "lst_side", None)
    if side is None or not len(side.blocks):
        return None
    return side.up.in_features, side.blocks[0].gate_proj.out_features, len(side.blocks)


def _autocast_kept(model: nn.Module) -> set[int]:
    """Ids of the parameters whose 16-bit copies autocast makes and the products keep for backward (the fused LoRA
    op's step copies, under the trainer): the weights of trained Linears (LoRA's A and B, the prompt encoders', LST's),
    an LSTM's weights and biases (P-tuning's), a bottleneck adapter's down and up weights, LoHa/LoKr factors
    multiplied at full width (rank dropout). Not biases (cast, not kept), nor parameters used elementwise first or
    cast by our own ops: IA3, SSF, VeRA's vectors, DoRA's magnitude and A (dropped_input.py), AdaLoRA, DyLoRA's
    masked A, diff pruning, Child-Tuning, AdaMix's banks (the step's routed copy is cast instead), the ΔW rebuilt by
    LoHa/LoKr/GLoRA/Compacter, LST's ladders (their inputs need no grad), a soft prompt's table without an encoder."""
    kept: set[int] = set()
    elementwise: set[int] = set()
    for mod in model.modules():
        if isinstance(getattr(mod, "lora_E", None), torch.Tensor):  # AdaLoRA: A ⊙ E, B · s
            elementwise.update(id(p) for p in mod.parameters(recurse=False))
        elif isinstance(getattr(mod, "rank_mask", None), torch.Tensor) or \
                getattr(mod, "drops_in_op", lambda: False)():  # DyLoRA's masked A; DoRA's A in its own op
            elementwise.add(id(mod.lora_A.weight))
        ladders = getattr(mod, "ladders", None)  # LST: they read backbone states, which need no grad
        if isinstance(ladders, nn.ModuleList):
            elementwise.update(id(p) for p in ladders.parameters())
        table, encoder = getattr(mod, "table", None), getattr(mod, "encoder", None)
        if isinstance(table, nn.Module) and isinstance(encoder, nn.Module):  # the encoder's input: the table
            kept.update(id(p) for p in table.parameters())
        if type(mod) is nn.Linear:
            kept.add(id(mod.weight))
        elif isinstance(mod, nn.LSTM):  # P-tuning's LSTM encoder: autocast casts its weights and biases, all kept
            kept.update(id(p) for p in mod.parameters())
        elif _bottleneck(mod) is mod and mod.down_weight.shape[0] == 1:
            kept.update((id(mod.down_weight), id(mod.up_weight)))
        elif getattr(mod, "full_width", lambda: False)() and not mod.rebuilds_delta():
            kept.update(id(p) for p in mod.parameters(recurse=False))
    return kept - elementwise


def _prompt_encoder_saved(model: nn.Module) -> int:
    """Bytes the virtual tokens' encoder (P-tuning's MLP or LSTM, prefix tuning's projection, UniPELT's gated
    prefix) keeps for backward in one training forward, measured on a CPU copy of it (its few MB of weights: an
    LSTM's meta kernel would keep no workspace) by memory_bench.saved_bytes, its parameters not counted."""
    from .memory_bench import saved_bytes  # the measuring module imports nothing of the estimator's
    hook = (getattr(getattr(model, "studio_adapter", None), "extra", None) or {}).get("hook")
    source = getattr(hook, "source", None)  # what the method's hook calls each forward (methods/soft_prompt_common.py)
    if not isinstance(source, nn.Module) or not any(p.requires_grad for p in source.parameters()):
        return 0
    cpu_copy = deepcopy(source).to_empty(device="cpu").train()
    try:
        with torch.enable_grad():
            return saved_bytes(cpu_copy, cpu_copy)[0]
    except (RuntimeError, NotImplementedError):  # an op the CPU cannot run: the encoder's few KB left out
        return 0


def _layer_info(layer: nn.Module, nf4: bool = False) -> LayerInfo:
    sites: dict[str, Site] = {}
    site_paths: list[str] = []
    for path, mod in layer.named_modules():
        short = path.rsplit(".", 1)[-1]
        if short not in SITES_ALL or any(path.startswith(sp + ".") for sp in site_paths):
            continue
        site_paths.append(path)
        sites[short] = _site(short, mod, nf4)
    norms_tr = any(p.requires_grad for n, p in layer.named_parameters() if "norm" in n)
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    adapter_sites = [(path, mod) for path, mod in layer.named_modules() if _is_adapter_site(mod)]
    adapters = [_adapter(path, mod) for path, mod in adapter_sites]
    inside = site_paths + [f"{path}.adapter" for path, _ in adapter_sites]
    extra: list[int] = []
    for path, mod in layer.named_modules():
        if any(path == sp or path.startswith(sp + ".") for sp in inside):
            continue
        if isinstance(mod, nn.Linear) and any(p.requires_grad for p in mod.parameters(recurse=False)):
            extra.append(mod.in_features)
    mlp = getattr(layer, "mlp", None)
    return LayerInfo(sites, norms_tr, trainable, extra, adapters, isinstance(mlp, nn.Module) and defers(layer, mlp))


def _bottleneck(adapter: nn.Module | None) -> nn.Module | None:
    """The bottleneck (methods/adapter.py Bottleneck) of an adapter, plain or gated (UniPELT); None for others."""
    inner = getattr(adapter, "bottleneck", adapter)
    return inner if isinstance(getattr(inner, "down_weight", None), torch.Tensor) else None


def _components(adapter: nn.Module | None) -> list[nn.Module]:
    """AdapterFusion's frozen component bottlenecks (methods/adapter_fusion.py); [] for other adapters."""
    parts = getattr(adapter, "adapters", None)
    return [a for a in parts if _bottleneck(a) is not None] if isinstance(parts, nn.ModuleList) else []


def _is_adapter_site(mod: nn.Module) -> bool:
    """An AdapterSite (methods/adapter.py): a module wrapped with an adapter after or beside it."""
    adapter = getattr(mod, "adapter", None)
    return hasattr(mod, "parallel") and hasattr(mod, "base_layer") and \
        (_bottleneck(adapter) is not None or bool(_components(adapter)))


def _adapter(path: str, site: nn.Module) -> Adapter:
    position = "attn" if "attn" in path or "attention" in path else "mlp"
    parts = _components(site.adapter)
    if parts:  # the component outputs (m each, relu as trained) and the attention over them
        return Adapter(position, parts[0].down_weight.shape[-1], sum(p.down_weight.shape[-2] for p in parts),
                       fusion=len(parts))
    bottleneck = _bottleneck(site.adapter)
    copies, m, din = bottleneck.down_weight.shape
    name = getattr(getattr(bottleneck, "act", None), "__name__", "")
    return Adapter(position, din, m, act_saves=1 if name in ("relu", "tanh") else 2,
                   gated=bottleneck is not site.adapter, routed=copies > 1)


def _site(name: str, mod: nn.Module, nf4: bool = False) -> Site:
    """What one projection keeps, read off the meta model; nf4: its base Linear is 4-bit in the run (the meta model
    holds a plain Linear there), which takes bitsandbytes' own product instead of a fused op's."""
    if _is_adapter_site(mod):  # its adapter is counted on its own (_adapter); the site is what it wraps
        return _site(name, mod.base_layer, nf4)
    base = getattr(mod, "base_layer", mod)
    din = getattr(base, "in_features", 0) or getattr(mod, "in_features", 0)
    dout = getattr(base, "out_features", 0) or getattr(mod, "out_features", 0)
    w = getattr(base, "weight", None)
    bias = getattr(base, "bias", None)
    site = Site(name, din, dout, base_trainable=bool(isinstance(w, torch.Tensor) and w.requires_grad),
                bias_trainable=bool(isinstance(bias, torch.Tensor) and bias.requires_grad))
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
        site.lora_gated = isinstance(getattr(mod, "lora_gate", None), nn.Module)
        site.lora_fused = bool(getattr(mod, "uses_fused_op", lambda: False)())  # 4-bit bases fuse too
        site.drops_in_op = bool(getattr(mod, "drops_in_op", lambda: False)())
        site.svd_factors = isinstance(getattr(mod, "lora_E", None), torch.Tensor)
        site.rank_masked = isinstance(getattr(mod, "rank_mask", None), torch.Tensor) and not site.svd_factors
        return site
    ia3 = getattr(mod, "ia3_l", None)
    if isinstance(ia3, torch.Tensor):
        site.ia3 = "in" if (ia3.dim() == 2 and ia3.shape[0] == 1 and ia3.shape[-1] == din != dout) or \
            getattr(mod, "is_feedforward", False) else "out"
        site.ia3_gated = getattr(mod, "gated_scale_parts", lambda: None)() is not None and not nf4
        return site
    if isinstance(getattr(mod, "ssf_scale", None), torch.Tensor):
        site.ssf = True
        return site
    if isinstance(getattr(mod, "log_alpha", None), torch.Tensor) and hasattr(mod, "gates"):
        site.gated_diff = bool(mod.log_alpha.requires_grad)
        return site
    lambda_d = getattr(mod, "vera_lambda_d", None)
    if isinstance(lambda_d, torch.Tensor):
        site.vera_r = lambda_d.numel()
        site.lora_dropout = float(getattr(getattr(mod, "vera_dropout", None), "p", 0.0) or 0.0)
        return site
    base_params = {id(p) for p in base.parameters()}
    site.other_trainable = any(p.requires_grad and id(p) not in base_params for p in mod.parameters())
    hada = any(n.startswith("hada_") for n, _ in mod.named_parameters())  # LoHa: two weight-sized factors
    if getattr(mod, "rebuilds_delta", lambda: False)():  # kept: the input; built again in backward: ΔW, W + ΔW
        site.delta_weights, site.shares_input, site.rebuilt_buffers = 0, True, mod.rebuilt_buffers
    elif getattr(mod, "full_width", lambda: False)():  # rank dropout: autograd keeps ΔW (and LoHa's factors)
        site.delta_weights, site.shares_input = 3 if hada else 1, True
        site.row_keep = bool(getattr(mod, "rank_dropout", 0))
    elif isinstance(getattr(mod, "indices", None), torch.Tensor):  # Child-Tuning: F.linear(x, W + sparse Δ)
        site.delta_weights, site.shares_input, site.sparse_values = 1, True, mod.indices.numel()
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
        # prefix key/value vectors (prefix tuning, P-tuning v2, and the hybrids that carry a prefix: MAM, UniPELT)
        if "prefix" in name or "ptuning_v2" in name or "p_tuning_v2" in name or hasattr(cfg, "prefix_projection"):
            rule.update(prefix_tokens=n_virtual, rule="prefix: n key/value vectors per layer lengthen attention")
        else:
            rule.update(prompt_tokens=n_virtual, input_grad=True,
                        rule="soft prompt: n virtual tokens added to every sequence; grad flows from the input")
    if name in ("lst", "ladder", "ladder_side_tuning") or "ladder" in name:
        rule.update(no_backbone_grad=True, rule="ladder side-tuning: no backward through the backbone")
    if name in ("lora",) or cat == "reparameterised":
        rule["rule"] = "reparameterised: adapters on chosen linears; frozen bottom keeps nothing"
    if name == "full":
        rule["rule"] = "full: every weight trains"
    return rule


# ------------------------------------------------------------------------------------------ the estimate
def _seq_len(run_cfg: Any, dataset_lengths: Iterable[int] | None) -> tuple[int, bool]:
    """Sequence length of the largest batch and whether a padding mask is likely: a classifier's batches only,
    as a causal LM's right-padded batches go without one (data_render.without_padding_mask)."""
    max_len = int(run_cfg.data.max_length)
    b = int(run_cfg.train.batch_size)
    if run_cfg.data.packing:
        return max_len, False
    lens = [min(int(x), max_len) for x in dataset_lengths] if dataset_lengths else []
    varied = len(set(lens)) > 1 if lens else True
    return (max(lens) if lens else max_len), run_cfg.model.task == "classification" and b > 1 and varied


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
        gpus.gpu_memory(gpu)  # validates the name

    def as_set(cfg: Any) -> Estimate:  # the layers train.checkpoint_fraction names, no choice made
        return _estimate(cfg, device, gpu, dataset_lengths, padding, context_bytes, labelled_fraction)
    tc = run_cfg.train
    if tc.gradient_checkpointing and tc.checkpoint_budget_gb > 0:
        return fitted_checkpointing(run_cfg, as_set, allocator_room(device))
    if tc.gradient_checkpointing and tc.checkpoint_fraction >= 1.0:
        return top_layer_kept_if_free(run_cfg, as_set)
    return as_set(run_cfg)


def _estimate(run_cfg: Any, device: str, gpu: str | None, dataset_lengths: Iterable[int] | None,
              padding: bool | None, context_bytes: int | None, labelled_fraction: float) -> Estimate:
    mc, tc = run_cfg.model, run_cfg.train
    nf4 = mc.quantization == "nf4"
    if mc.quantization == "int8":
        raise ConfigError("The estimator models 16/32-bit and NF4 bases; int8 is not modelled yet.")
    pdtype = model_dtype(mc.compute_dtype if nf4 else mc.dtype, device)
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
    rows = b * s
    # a recomputed layer's MLP in row chunks that keep only its input (studio/chunked_mlp.py): rows per chunk
    chunks = mlp_chunks(rows, arch.inter)
    chunk_rows = -(-rows // chunks)
    defer_ok = chunks > 1 and arch.fused_mlp and arch.model_type in DEFERRED_MODEL_TYPES \
        and not graphs and not tc.compile
    deferred: list[bool] = []
    first_grad = None
    for k, info in enumerate(facts.layers):
        full, g_out, mlp = layer_saved(arch, info, shape, dt, k, g)
        if rule["no_backbone_grad"]:
            full, g_out, mlp = 0, False, 0
        deferred.append(defer_ok and gc_layers[k] and info.mlp_defers and mlp > 0)
        if deferred[-1]:  # the layer's recomputation keeps the MLP's input instead; its backward what one chunk keeps
            chunk = dataclasses.replace(shape, batch=1, seq=chunk_rows)  # (16-bit weight copies: each chunk's)
            full += rows * arch.hidden * act - mlp + layer_saved(arch, info, chunk, dt, k, g)[2]
        recompute.append(full)
        if first_grad is None and (g or g_out):
            first_grad = k
        per_layer.append((0 if offload else layer_input) if gc_layers[k] and not rule["no_backbone_grad"] else full)
        g = g or g_out
    rope = rope_saved(arch, shape, dt) if any(recompute) else 0   # with checkpointing held, not saved
    kept_types = [arch.layer_types[k] for k, on in enumerate(gc_layers) if not on]
    fixed = rope_saved(arch, shape, dt, kept_types) if rope and not gc else 0  # saved by the kept layers
    if facts.side_network:
        fixed += side_network_saved(b * s, arch.hidden, *facts.side_network, dt)
    # once per forward, whatever the batch; in 16 bits under autocast
    fixed += facts.prompt_encoder_saved * act // 4 if dt.autocast else facts.prompt_encoder_saved
    if facts.embeddings_trainable:
        fixed += b * seq * 8                                              # input ids (embedding backward)
    fixed += norm_saved(rows, arch.hidden, g, facts.final_norm_trainable, arch.gemma_norms, dt, arch.fused_norms)
    # ---- the loss: kept hidden states of labelled positions (the fused head: their gradient), the label mask, the
    # token count; the checkpointed chunks keep their labels too (the fused head takes none to its backward)
    ids = 0 if facts.fused_head else labelled * 8
    logits_saved = labelled * arch.hidden * act + ids + b * seq + 8 if (g or facts.grad_outside) else 0
    c = min(int(tc.loss_chunk), labelled)
    if facts.fused_head and facts.head_trainable:
        # Fused, trained head: the fp32 d(loss)/d(W) is saved from forward to backward; per chunk the
        # whole-vocabulary fp32 logits of a capped chunk (and their 16-bit copy) and, in 16 bits, the chunk's
        # d(W) product and its fp32 copy added into the saved one (in fp32 it is added in place)
        logits_saved += arch.vocab * arch.hidden * 4
        c = min(c, max(1, WEIGHT_GRAD_LOGITS // arch.vocab))
        chunk = c * arch.vocab * (4 + (act if act < 4 else 0))
        chunk += arch.vocab * arch.hidden * (act + 4) if act < 4 else 0
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
    if any(deferred):
        notes.append(f"long sequence: each recomputed layer's MLP runs in {chunks} row chunks of up to "
                     f"{chunk_rows:,} (keeping only its input)")
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
    persistent = 0  # of the extras, those that live through the optimizer step too
    if device == "cpu" and host_extra:
        persistent += host_extra
        notes.append("full: CPU copy of the base weights (keep_base_copy)")
    if "child" in rule["name"]:
        persistent += facts.trainable_params  # a bool mask per trainable weight
        notes.append("child-tuning gradient mask")
    extra += persistent
    if graphs:
        notes.append(f"CUDA graphs: batches padded to {seq} tokens" + (
            "; the graphs keep the step's memory reserved, so evaluation passes need room beside it (not counted)"
            if run_cfg.data.eval_fraction > 0 else ""))

    # ---- gradients and optimizer
    opt_gpu, opt_host, opt_transient = _optimizer_bytes(tc.optimizer, facts.trainable_tensors, device)
    grads = facts.grad_bytes
    context = 0 if device == "cpu" else (CUDA_CONTEXT_BYTES if context_bytes is None else int(context_bytes))

    def layer_bwd(mlp_rows: int) -> int:
        """A layer's backward buffers, its MLP's in chunks of mlp_rows rows (all of them: a whole MLP)."""
        if rule["no_backbone_grad"]:  # only the side network's backward runs: its FFN's and the output's gradients
            _, f_s, _ = facts.side_network or (0, 0, 0)
            return (3 * rows * f_s + 2 * rows * arch.hidden) * (dt.act if dt.autocast else 4)
        bwd = backward_transient(arch, shape, dt, mlp_rows)
        if nf4:
            bwd += facts.max_linear * act                                     # dequantized 4-bit weight
        bwd += facts.max_rebuilt_delta[dt.autocast]                          # a full-size ΔW built again
        if rebuilds_gated:  # act(gate)·up rebuilt for down's adapter beside its gradients (rebuilt_inputs)
            bwd += mlp_rows * arch.inter * act
        return bwd
    rebuilds_gated = arch.fused_mlp and any(_rebuilds_gated(info) for info in facts.layers)
    bwd_by_rows = {r: layer_bwd(r) for r in {rows, chunk_rows}}  # whole MLPs, chunked ones: once each
    if facts.fused_head:
        # the fused loss runs its chunks in forward, filling the gradient buffers it keeps (logits_saved); its
        # backward scales those in place, an fp32 head's gradient buffer becoming the weight's gradient itself
        shared = arch.vocab * arch.hidden * 4 if facts.head_trainable and act == 4 else 0
        phases = {"loss forward": activations + logits + extra,
                  "loss backward": activations + logits_saved + facts.grad_outside - shared + extra}
    else:  # checkpointed chunks: recomputed in backward
        phases = {"loss backward": activations + logits + facts.grad_outside + extra}
    # LST's side forward under autocast: the backbone states it reads live beside the 16-bit copies its ladders
    # keep (in fp32 the ladders keep the states themselves) and autocast's copies of the ladders' weights; at its
    # end the final norm's output, up's output and their sum
    if facts.side_network and dt.autocast:
        d_s, _, blocks = facts.side_network
        side_forward = rows * arch.hidden * ((blocks + 1) * act + 3 * act) + (blocks + 1) * arch.hidden * d_s * act
    else:
        side_forward = 0
    if side_forward:
        phases["side network forward"] = activations + extra + side_forward
    held = fixed + mask_bool + autocast_cache + extra + facts.grad_outside + (rope if gc else 0)
    below = sum(per_layer)
    grads_done = 0
    worst_layer = ("layer backward", 0, 0)
    for k in reversed(range(len(per_layer))):
        below -= per_layer[k]
        grads_done += facts.grad_layer[k]
        tr = bwd_by_rows[chunk_rows if deferred[k] else rows] + (recompute[k] if gc_layers[k] else 0)
        if offload and gc_layers[k] and k > 0:
            tr += layer_input                                              # the layer below, fetched ahead
        val = held + below + per_layer[k] + tr + grads_done
        if val > worst_layer[1]:
            worst_layer = (f"backward of layer {k}", val, tr)
    phases[worst_layer[0]] = worst_layer[1]
    phases["optimizer step"] = grads + opt_transient + persistent
    peak_phase = max(phases, key=phases.get)
    transient = {"loss forward": 0, "loss backward": 0, "optimizer step": opt_transient,  # the chunk: in logits
                 "side network forward": side_forward}.get(peak_phase, worst_layer[2])
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
        "gpu": gpu, "gpu_memory": gpus.gpu_memory(gpu) if gpu else None,
        "fits": (total <= gpus.gpu_memory(gpu)) if gpu else None,
    }
    return est


def _rebuilds_gated(info: LayerInfo) -> bool:
    """Whether this layer's down_proj carries an adapter op that rebuilds its input in backward beside the
    gradients of its own products (DoRA's, AdaLoRA's; studio/rebuilt_inputs.py)."""
    down = info.sites.get("down_proj")
    return down is not None and down.drops_in_op


def top_layer_kept_if_free(run_cfg: Any, estimate_of: Callable[[Any], Estimate]) -> Estimate:
    """The estimate of a run that recomputes every layer, or every layer but the top one where keeping that
    layer's activations costs no more. Backward starts at the top layer: recomputed, its rebuilt activations sit
    beside every layer's input, and kept from forward they are the same bytes, less its input; only where the
    end of the forward (the loss's chunks beside them) is the peak does keeping them cost more (a large vocabulary
    on a small model). Keeping it saves the top layer's recomputation (a 28th of a checkpointed Qwen2.5-7B
    step's). details: top_layer_kept."""
    every = estimate_of(run_cfg)
    layers = every.details["layers"]
    kept = estimate_of(with_changes(run_cfg, **{"train.checkpoint_fraction": (layers - 1) / layers})) \
        if layers > 1 else every
    best = kept if kept.total <= every.total else every
    best.details["top_layer_kept"] = best is not every
    if best is not every:
        best.details["notes"].append("the top layer's activations kept from forward: recomputing them would not "
                                     "lower the peak")
    return best


def fitted_checkpointing(run_cfg: Any, estimate_of: Callable[[Any], Estimate], room: int = 0) -> Estimate:
    """The estimate of run_cfg with the fewest recomputed layers (the bottom ones) whose total stays within
    train.checkpoint_budget_gb (GiB) less `room` (on CUDA the caching allocator's, ALLOCATOR_ROOM_BYTES: a plan
    fitted to the last byte of a card would be a tight fit); when none fits, the count with the least total
    (and checkpoint_fits False when that is over the budget itself, not just the room). Recomputing the top
    layer too can cost more than keeping it (its rebuilt activations come on top of every layer's input),
    so every count is tried (an estimate takes well under a millisecond once the model's facts are cached).
    details: checkpoint_budget (bytes), checkpoint_fits, checkpoint_room, checkpointed_layers (what the trainer
    then recomputes) and layers."""
    budget = int(run_cfg.train.checkpoint_budget_gb * 2**30)
    within = budget - room
    every = estimate_of(with_changes(run_cfg, **{"train.checkpoint_budget_gb": 0.0,
                                                 "train.checkpoint_fraction": 1.0}))
    layers = every.details["layers"]
    best = None
    for k in range(layers + 1):
        share = {"train.checkpoint_budget_gb": 0.0, "train.checkpoint_fraction": k / layers}
        trial = every if k == layers else estimate_of(with_changes(run_cfg, **share))
        if trial.total <= within:
            best = trial
            break
        if best is None or trial.total < best.total:
            best = trial
    best.details.update(checkpoint_budget=budget, checkpoint_fits=best.total <= budget, checkpoint_room=room)
    return best


def checkpoint_share(run_cfg: Any, device: str, dataset_lengths: Iterable[int] | None = None,
                     padding: bool | None = None) -> tuple[float, str | None]:
    """The share of layers a checkpointed run recomputes, as its estimate chose them (fitted to
    train.checkpoint_budget_gb, or every layer but a top one kept for free: top_layer_kept_if_free), and a line
    for the user saying so (dataset_lengths and padding as for estimate); train.checkpoint_fraction where the
    estimate makes no choice or there is none."""
    t = run_cfg.train
    fraction = float(t.checkpoint_fraction)
    if not t.gradient_checkpointing or (t.checkpoint_budget_gb <= 0 and fraction < 1.0):
        return fraction, None
    try:
        est = estimate(run_cfg, device, dataset_lengths=dataset_lengths, padding=padding)
    except Exception as e:  # noqa: BLE001 - no estimate: the run goes on with its fraction
        return fraction, (
            f"No memory estimate for this configuration ({e}), so train.checkpoint_budget_gb cannot pick the "
            "layers to recompute; train.checkpoint_fraction decides.") if t.checkpoint_budget_gb > 0 else None
    d = est.details
    k, n, share = d["checkpointed_layers"], d["layers"], est.recomputed_share
    if t.checkpoint_budget_gb <= 0:
        return share, (f"Checkpointing {k} of {n} layers: the top layer's activations are kept from forward, as "
                       "recomputing them would not lower the peak." if d.get("top_layer_kept") else None)
    budget = human(d["checkpoint_budget"])
    if not d["checkpoint_fits"]:
        return share, (f"The run does not fit train.checkpoint_budget_gb ({budget}) with any checkpointing: it "
                       f"recomputes {k} of {n} layers, the least memory (about {human(est.total)}). Lower "
                       "train.batch_size or data.max_length, or use model.quantization=nf4, to fit.")
    room = f", {human(d['checkpoint_room'])} left for the allocator's cache" if d.get("checkpoint_room") else ""
    return share, (f"Checkpointing fitted to {budget}: {k} of {n} layers recomputed (estimated peak "
                   f"{human(est.total)}{room}).")


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
