"""Activation model of the memory estimator: what autograd keeps for backward, per decoder layer.

It mirrors what the transformers decoder code (llama, qwen2, mistral, gemma3_text, phi3) and our
method modules save, op by op, and counts unique storages (a view costs nothing; a cast is a copy):

- RMSNorm of the supported families (studio/fused_norm.py, one autograd op): its input in its own
  dtype and rsqrt (rows x 1) when its input needs grad or its weight trains. Other norm classes
  (transformers' code): the fp32 copy of the input (fp32 models: the input itself) and rsqrt when
  the input needs grad; the normalised output when the weight trains (gemma: in fp32).
- Linear: its input when its weight trains (shared inputs such as q/k/v counted once); nothing when
  frozen (the input grad needs only the weight). 4-bit bases save nothing either.
- LoRA: per module the adapter's input and A's output (rows x r). Without DoRA over a 16/32-bit
  base, one fused op (studio/methods/lora_fused.py) keeps the shared input itself, plus (CPU) a bool
  keep-mask when dropout > 0; nothing for an input that is a fused norm's output (q/k/v, gate/up: it keeps
  the norm's input, which the norm keeps anyway, and rebuilds the output; studio/rebuilt_inputs.py). DoRA's A
  product keeps its input the same way (methods/dropped_input.py; AdaLoRA's too) and adds the sum it rescales
  (rows x out; methods/rescaled_product.py). AdaLoRA's products also keep A ⊙ E and B · scaling (r-sized), DyLoRA's
  A times its rank mask. Else (8-bit bases, DyLoRA) the dropout output (+ on the CPU its noise) when dropout > 0,
  or the shared input.
  On CUDA dropout draws from the run's seed (studio/seeded_dropout.py) and keeps no mask.
- RoPE: cos and sin (once per rope type, shared by all layers); gemma3 q/k norms as RMSNorm, where their
  projection's output needs grad.
- SDPA (flash / CPU flash): q, k, v (k, v at kv-head width; repeated to all heads when a mask is
  materialised on a grouped-query model), the output and the fp32 logsumexp; a materialised mask
  is converted per layer to the activation dtype and saved (efficient-attention kernel).
- MLP: the gate output and up output (rows x intermediate each; transformers' own MLP code also
  keeps act(gate), the fused one in studio/fused_mlp.py recomputes it); down's input only when down
  trains or carries an adapter, and not under the fused MLP for a fused LoRA or IA3 on down (one op that
  recomputes it) or an adapter op that keeps its input (it keeps gate and up instead: studio/rebuilt_inputs.py;
  a layer then holds the rebuilt act(gate)·up in its backward).
- Gradient checkpointing (non-reentrant, per layer): only each layer's input is kept; backward
  recomputes one layer at a time (that layer's activations are the `transient` item).
- Nothing is saved below the first point where something requires grad (frozen bottom layers of
  methods whose inputs need no grad), and nothing at all through a backbone that runs without grad
  (Ladder Side-Tuning: its side network's activations and the backbone states its ladders read instead).

Other methods' modules (fp32 parameters: their activations in fp32, or in the activations' dtype under autocast):
- VeRA: per module x Aᵀ (rows x r) and its product through B (rows x out); under autocast also the 16-bit copies
  of the shared A and B slices its products keep.
- BitFit: a trained bias keeps nothing, but its output needs grad, so the layers above keep what they keep.
- SSF: the output its scale multiplies. IA3: the output it scales (keys, values), or the input (the FFN's down
  projection; nothing under the fused MLP, whose op, or IA3's own over a 4-bit base, rebuilds it from gate and up).
- Diff pruning: the shared input, three weight-sized fp32 tensors of the hard-concrete gates and W + diff.
  Child-Tuning: the shared input and W + the sparse update (under autocast also its 16-bit values). W + Δ (and
  rank dropout's W + ΔW, with its keep vector) only where the product's input needs grad.
- Bottleneck adapters (Houlsby, Pfeiffer, parallel, AdaptFormer, AdaMix, MAM; UniPELT's gated one): the adapter's
  input and the bottleneck's activation (rows x m; gelu/silu keep its input too); gated, also the adapter's
  output; AdaMix, its step's routed copies of down and up. AdapterFusion: x, its query, the frozen components'
  bottlenecks (where x needs grad), their outputs, keys and values. The soft prompts' encoders (P-tuning's,
  prefix tuning's projection): what their own forward keeps, run on the meta device (studio/memory.py).
- UniPELT's gated LoRA: B's output and the gate, beside what LoRA keeps.
- Unknown future modules: a wrapper around a projection with trainable parameters (DyLoRA, ...) is assumed to
  save its input and the delta weight it builds (fp32; under autocast 16-bit); where a full-size delta weight
  is rebuilt in backward (LoHa, LoKr, GLoRA, Compacter: methods/delta_product.py), only the input, which its
  neighbours share (for a fused norm's output, nothing: it keeps the norm's input, as LoRA's fused op does).
  A trainable Linear elsewhere in a layer is assumed to save one copy of its input.
Under autocast the 16-bit copies of fp32 trained weights that the products keep are one item (studio/memory.py
_autocast_kept: the weights autocast casts as they are, not those used elementwise first or cast by our ops).
tests/test_memory.py checks every method's saved bytes and whole-step peak against autograd on tiny models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from .fused_mlp import FUSED_ACTIVATIONS, FUSED_MLP_MODEL_TYPES
from .fused_norm import FUSED_NORM_MODEL_TYPES

SITES_ATTN = ("q_proj", "k_proj", "v_proj", "qkv_proj")
SITES_ALL = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
             "down_proj")


@dataclass
class Site:
    """One projection of a layer as the method left it."""
    name: str
    din: int
    dout: int
    base_trainable: bool = False
    bias_trainable: bool = False  # only its bias trains (BitFit): its output needs grad, it keeps nothing
    lora_r: int = 0          # > 0: a LoRA-like adapter (lora_A / lora_B) wraps the base
    lora_dropout: float = 0.0
    dora: bool = False
    lora_gated: bool = False  # UniPELT: the update times σ(gate(x)), which keeps B's output and the gate
    lora_fused: bool = False  # LoRA as one autograd op (lora_fused.py): saves the input it was given
    drops_in_op: bool = False  # DoRA's / AdaLoRA's dropout and A product as ops (dropped_input.py): the same
    rank_masked: bool = False  # DyLoRA: A times this step's rank mask (r x in), kept when the input needs grad
    svd_factors: bool = False  # AdaLoRA: its products keep A ⊙ E (r x in) and B · scaling (out x r), built each step
    ia3: str = ""            # "out" (scales the output: k, v) or "in" (scales the input: down)
    ia3_gated: bool = False  # "in" inside the gated MLP's op (fused_mlp.GatedScaledDown): its input rebuilt
    vera_r: int = 0          # > 0: VeRA's two vectors around the shared A (r x in) and B (out x r)
    ssf: bool = False        # SSF: scale and shift of the output
    gated_diff: bool = False  # diff pruning: W + gates ⊙ w, the hard-concrete gates kept weight-sized in fp32
    other_trainable: bool = False  # an unknown wrapper with trainable parameters
    delta_weights: int = 1         # weight-sized tensors such a wrapper saves (its delta W; 16-bit under autocast)
    shares_input: bool = False     # it keeps the input it was given, as its neighbours do (methods/delta_product.py)
    sparse_values: int = 0         # Child-Tuning: the trained entries, cast to 16 bits under autocast (kept)
    row_keep: bool = False         # rank dropout: its keep vector (out x 1, in ΔW's dtype) times ΔW
    # ΔW built again in backward (methods/delta_product.py): weight-sized fp32 buffers its backward holds at once,
    # (fp32 run, under autocast); (0, 0) for the others
    rebuilt_buffers: tuple[float, float] = (0.0, 0.0)

    @property
    def needs_grad_out(self) -> bool:
        return self.base_trainable or self.bias_trainable or self.lora_r > 0 or bool(self.ia3) or self.vera_r > 0 \
            or self.ssf or self.gated_diff or self.other_trainable


@dataclass
class Adapter:
    """A bottleneck adapter W_up act(W_down x) added after (or beside) a block of a layer (methods/adapter.py)."""
    position: str        # "attn": after the attention output projection; "mlp": after or beside the FFN
    din: int
    m: int
    act_saves: int = 1   # rows x m tensors its activation keeps beyond up's input (relu, tanh: its output is that)
    gated: bool = False  # UniPELT: times σ(gate(x)), which keeps the adapter's output too
    fusion: int = 0      # AdapterFusion: attention of x over this many frozen adapters' outputs (m: their sum)
    routed: bool = False  # AdaMix: this step's copies of down and up (index_select's), which the products keep


@dataclass
class LayerInfo:
    sites: dict[str, Site]
    norms_trainable: bool = False
    trainable: int = 0                    # trainable parameter count of the layer
    extra_inputs: list[int] = field(default_factory=list)  # in_features of unrecognised trainable Linears
    adapters: list[Adapter] = field(default_factory=list)
    mlp_defers: bool = False  # its MLP may run in row chunks when recomputed (studio/chunked_mlp.py `defers`)


@dataclass
class Arch:
    model_type: str
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    sliding_window: int | None
    layer_types: list[str]
    softcap: float | None
    gemma_norms: bool   # gemma: sandwich norms, q/k norms, (1 + w) norms in fp32
    fused_qkv: bool     # phi3: qkv_proj / gate_up_proj
    fused_norms: bool = True  # the engine swaps in its one-op RMSNorm (studio/fused_norm.py)
    fused_mlp: bool = True    # ... and its one-op act(gate) * up (studio/fused_mlp.py)

    @classmethod
    def from_config(cls, c: Any) -> "Arch":
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        mt = c.model_type
        layer_types = list(getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers)
        sw = getattr(c, "sliding_window", None)
        if mt in ("qwen2",) and not getattr(c, "use_sliding_window", False):
            sw = None
        return cls(mt, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                   getattr(c, "num_key_value_heads", None) or c.num_attention_heads, hd, c.vocab_size, sw,
                   layer_types, getattr(c, "final_logit_softcapping", None), mt.startswith("gemma"),
                   mt in ("phi3",), mt in FUSED_NORM_MODEL_TYPES,
                   mt in FUSED_MLP_MODEL_TYPES and _activation(c) in FUSED_ACTIVATIONS)


def _activation(c: Any) -> str:
    return getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None) or ""


@dataclass
class Shape:
    batch: int
    seq: int              # query positions (incl. soft-prompt tokens)
    kv_extra: int = 0     # prefix tokens in keys/values
    labelled: int = 0     # labelled positions (<= batch * (seq - 1))
    padded: bool = False  # a padding mask is materialised


@dataclass
class Dtypes:
    act: int            # bytes of an activation (2 bf16/fp16, 4 fp32)
    autocast: bool      # 16-bit autocast: fp32 adapters get 16-bit input copies
    cuda: bool = True   # CUDA dropout keeps no mask (seeded); the CPU's keeps a bool mask or a float noise tensor


def norm_saved(rows: int, width: int, g_in: bool, w_trainable: bool, gemma: bool, dt: Dtypes,
               fused: bool = True) -> int:
    """Bytes one RMSNorm saves: (input grad needed, weight trains) -> bytes."""
    if fused:
        return rows * width * dt.act + rows * 4 if (g_in or w_trainable) else 0
    out = 0
    if g_in:
        out += rows * width * 4 + rows * 4   # fp32 input (copy or the input itself) + rsqrt
    if w_trainable:
        out += rows * width * (4 if gemma else dt.act)
    return out


def _mask_layer(arch: Arch, shape: Shape, layer: int) -> bool:
    """Whether this layer's SDPA gets a materialised mask (padding, sliding window, prefix)."""
    if shape.padded or shape.kv_extra:
        return True
    sliding = arch.layer_types[layer] == "sliding_attention" if layer < len(arch.layer_types) else False
    return bool(arch.sliding_window) and sliding and shape.seq > arch.sliding_window


def _adapter_input(site: Site, rows: int, dt: Dtypes, shared_saved: bool, g_in: bool,
                   rebuilt: bool = False) -> tuple[int, bool]:
    """Bytes a LoRA-like adapter saves for its input; returns (bytes, uses the shared input itself). rebuilt: the
    input is rebuilt from what its producer keeps (studio/rebuilt_inputs.py)."""
    n = rows * site.din
    # on CUDA dropout draws from the run's seed (studio/seeded_dropout.py) and keeps no mask
    mask = n if site.lora_dropout > 0 and not dt.cuda else 0
    keeps_input = site.lora_fused or site.drops_in_op
    if keeps_input and rebuilt:  # nothing of its own but the CPU's bool keep-mask
        return mask, False
    if keeps_input:  # the input it was given (shared by the projections that read it), a bool keep-mask
        return (0 if shared_saved else n * dt.act) + mask, True
    if site.lora_dropout > 0:
        # the CPU's dropout keeps its noise tensor (in its input's dtype) when its input needs grad; A keeps the
        # dropout output; both in the activations' dtype under autocast, else in the adapter's (fp32)
        width = dt.act if dt.autocast else 4
        mask = width * n if g_in and not dt.cuda else 0
        return mask + n * width, False
    return (0 if shared_saved else n * dt.act), True             # the input itself, shared


def _site_saves(site: Site, rows: int, dt: Dtypes, shared: dict, key: str, g_in: bool = True,
                rebuilt: bool = False) -> int:
    """Saved bytes of one projection whose input (id `key`) requires grad or feeds trainables; rebuilt: that input is
    the output of an op that records a graph and keeps its own inputs (a fused norm, the fused gated product),
    which the adapter ops that read it keep instead (studio/rebuilt_inputs.py)."""
    out = 0
    width = dt.act if dt.autocast else 4  # what an fp32 adapter's own products keep: 16 bits under autocast
    if site.base_trainable and not shared.get(key):
        out += rows * site.din * dt.act
        shared[key] = True
    if site.lora_r:
        b, used_shared = _adapter_input(site, rows, dt, bool(shared.get(key)), g_in, rebuilt)
        out += b
        if used_shared:
            shared[key] = True
        out += rows * site.lora_r * dt.act                     # A's output, input of B
        if site.dora:
            out += rows * site.dout * dt.act                   # the rescaled sum, for the magnitude's gradient
            out += 2 * site.dout * 4                           # the row norms and magnitude / norm (fp32)
        if site.rank_masked and g_in:
            out += site.lora_r * site.din * width
        if site.svd_factors:  # A ⊙ E as built (fp32; a 16-bit copy if autocast's product takes it), B · s cast
            a_width = 4 if site.drops_in_op or not dt.autocast else dt.act
            out += site.lora_r * site.din * a_width + site.dout * site.lora_r * width
        if site.lora_gated:
            out += rows * (site.dout + 1) * width
    # the scaled input: rebuilt from gate and up inside the gated MLP's op, or by ia3.ScaledInput from a recorded
    # act(gate)·up (over a 4-/8-bit base); else kept
    if site.ia3 == "in" and not (rebuilt and (site.ia3_gated or g_in)):
        out += rows * site.din * dt.act
    if site.ia3 == "out":
        out += rows * site.dout * dt.act
    if site.vera_r:
        out += rows * (site.vera_r + site.dout) * width        # d's input (x Aᵀ) and b's (its product through B)
        if dt.autocast:  # the 16-bit copies of the shared A and B slices the products keep for backward
            out += site.dout * site.vera_r * dt.act + (site.vera_r * site.din * dt.act if g_in else 0)
        if site.lora_dropout > 0 and g_in and not dt.cuda:
            out += rows * site.din * width                     # the CPU dropout's noise
    if site.ssf:
        out += rows * site.dout * dt.act                       # the output the scale multiplies (rescaled_product)
    if site.gated_diff:
        if not shared.get(key):
            out += rows * site.din * dt.act                    # the input (W + diff trains through it)
            shared[key] = True
        # the gates' sigmoid, their stretched value before the clamp and after it (fp32); W + diff, which the product
        # keeps for its input's gradient
        out += site.dout * site.din * (3 * 4 + (dt.act if g_in else 0))
    if site.other_trainable and not site.lora_r:
        # generic reparameterisation: its input, and the delta weight(s) it builds (out x in; under autocast
        # the products and the 16-bit copy F.linear keeps are in the activations' dtype)
        # methods/delta_product.py keeps the producer's inputs instead
        rebuilds = rebuilt and site.rebuilt_buffers[0] > 0
        if not (site.shares_input and shared.get(key)) and not rebuilds:
            out += rows * site.din * dt.act
        if site.shares_input and not rebuilds:
            shared[key] = True
        # of the recognised ones, the weight the product reads (W + ΔW) is kept only for its input's gradient
        kept = site.delta_weights - (1 if site.shares_input and site.delta_weights and not g_in else 0)
        out += kept * site.dout * site.din * width
        if site.row_keep:
            out += site.dout * width
        if dt.autocast:
            out += site.sparse_values * dt.act
    return out


def adapter_saved(a: Adapter, rows: int, dt: Dtypes, g_in: bool = True) -> int:
    """Bytes a bottleneck adapter keeps: its input, the bottleneck activation(s) (fp32 params: the activations'
    dtype under autocast, else fp32); gated, also its output and the gate; AdapterFusion, its attention's (and the
    frozen components' activations when its input, g_in, needs grad); AdaMix, the routed copies of up and, when
    its input needs grad, of down."""
    width = dt.act if dt.autocast else 4
    if a.fusion:  # x, its query, the components' relu outputs, their outputs (under autocast: a 16-bit copy
        # for the keys and another for the values), keys and values, the softmax
        outs = 4 if dt.autocast else 3
        out = rows * (2 * a.din + (a.m if g_in else 0) + outs * a.fusion * a.din + a.fusion) * width
        if dt.autocast and g_in:  # the frozen fp32 components' 16-bit weight copies, cast at each use
            out += 2 * a.m * a.din * dt.act
        return out
    out = rows * a.din * width + (1 + (a.act_saves > 1)) * rows * a.m * width
    if a.gated:
        out += rows * (a.din + 1) * width
    if a.routed:
        out += (2 if g_in else 1) * a.m * a.din * width
    return out


def layer_saved(arch: Arch, info: LayerInfo, shape: Shape, dt: Dtypes, layer: int, g_in: bool) -> tuple[int, bool, int]:
    """Bytes one decoder layer saves for backward (no checkpointing), whether its output needs grad, and of those
    bytes the MLP's own (its projections', the adapters on them and after it, Gemma's norm of its output: what a
    deferred MLP keeps only a chunk of, studio/chunked_mlp.py)."""
    b, s = shape.batch, shape.seq
    rows = b * s
    h, i, hd = arch.hidden, arch.inter, arch.head_dim
    nh, nkv = arch.heads, arch.kv_heads
    st = info.sites
    gemma, fused = arch.gemma_norms, arch.fused_norms
    total = 0
    shared: dict[str, bool] = {}
    # input norm
    total += norm_saved(rows, h, g_in, info.norms_trainable, gemma, dt, fused)
    g_n1 = g_in or info.norms_trainable
    # q, k, v
    attn_in = [st[n] for n in SITES_ATTN if n in st]
    if g_n1 or any(x.needs_grad_out for x in attn_in):
        for x in attn_in:  # the input norm records a graph when its input needs grad or its weight trains
            total += _site_saves(x, rows, dt, shared, "n1", g_n1, rebuilt=fused and g_n1)
    g_q = g_n1 or any(x.needs_grad_out for x in attn_in) or shape.kv_extra > 0  # (a trained prefix: the output)
    mask = _mask_layer(arch, shape, layer)
    kv_len = s + shape.kv_extra
    if g_q:
        if gemma:  # q_norm / k_norm on the projections' outputs, when those need grad
            g_proj = {n: g_n1 or (n in st and st[n].needs_grad_out) for n in ("q_proj", "k_proj")}
            total += norm_saved(rows * nh, hd, g_proj["q_proj"], info.norms_trainable, True, dt, fused)
            total += norm_saved(rows * nkv, hd, g_proj["k_proj"], info.norms_trainable, True, dt, fused)
        repeat = mask and 1 < nkv < nh                         # repeat_kv copies (one kv head: a view)
        kv_w = nh if repeat else nkv
        if arch.fused_qkv and not repeat:
            v_bytes = rows * (nh + 2 * nkv) * hd * dt.act      # v is a view of the fused qkv output
        else:
            v_bytes = b * kv_len * kv_w * hd * dt.act
        total += rows * nh * hd * dt.act                       # q after rope
        total += b * kv_len * kv_w * hd * dt.act + v_bytes     # k after rope (+prefix), v
        total += rows * nh * hd * dt.act                       # output
        lse_len = -(-s // 32) * 32 if (mask and dt.autocast) else s
        total += b * nh * lse_len * 4                          # logsumexp
        if mask:
            total += b * s * kv_len * dt.act                   # mask converted to the activation dtype
    o = st.get("o_proj")
    if o is not None and (g_q or o.needs_grad_out):
        shared["attn"] = g_q  # the SDPA output is already saved when attention needed grad
        total += _site_saves(o, rows, dt, shared, "attn", g_q)
    attn_adapters = [a for a in info.adapters if a.position == "attn"]
    g_attn = g_q or (o is not None and o.needs_grad_out)
    total += sum(adapter_saved(a, rows, dt, g_attn) for a in attn_adapters)
    g_o = g_q or (o is not None and o.needs_grad_out) or bool(attn_adapters)
    if gemma:
        total += norm_saved(rows, h, g_o, info.norms_trainable, True, dt, fused)  # post_attention_layernorm
    g_h1 = g_in or g_o
    total += norm_saved(rows, h, g_h1, info.norms_trainable, gemma, dt, fused)   # post_attention / pre_feedforward norm
    g_n2 = g_h1 or info.norms_trainable
    before_mlp = total
    mlp_in = [st[n] for n in ("gate_proj", "up_proj", "gate_up_proj") if n in st]
    if g_n2 or any(x.needs_grad_out for x in mlp_in):
        for x in mlp_in:
            total += _site_saves(x, rows, dt, shared, "n2", g_n2, rebuilt=fused and g_n2)
    g_gate = g_n2 or any(x.needs_grad_out for x in mlp_in)
    if g_gate:
        total += (2 if arch.fused_mlp else 3) * rows * i * dt.act  # gate out, up out (+ act(gate) unfused)
    down = st.get("down_proj")
    if down is not None and (g_gate or down.needs_grad_out):
        # under the fused MLP, down's input act(gate) * up is rebuilt from gate and up: by a fused LoRA's or IA3's
        # one op with the product, or by the adapter ops that read a recorded product (studio/rebuilt_inputs.py)
        rebuilt = arch.fused_mlp and (g_gate or down.lora_fused or down.ia3_gated)
        total += _site_saves(down, rows, dt, shared, "prod", g_gate, rebuilt=rebuilt)
    g_down = g_gate or (down is not None and down.needs_grad_out)
    mlp_adapters = [a for a in info.adapters if a.position == "mlp"]  # on the MLP's output, or beside the MLP
    total += sum(adapter_saved(a, rows, dt, g_down) for a in mlp_adapters)
    if gemma:  # post_feedforward_layernorm, after the adapters' sum (a deferred MLP's op runs it)
        total += norm_saved(rows, h, g_down or bool(mlp_adapters), info.norms_trainable, True, dt, fused)
    mlp = total - before_mlp
    for din in info.extra_inputs:                              # unrecognised trainable modules
        total += rows * din * dt.act
    g_out = g_h1 or g_down or bool(info.extra_inputs) or bool(mlp_adapters)
    return total, g_out, mlp


def rope_saved(arch: Arch, shape: Shape, dt: Dtypes, layer_types: Iterable[str] | None = None) -> int:
    """cos and sin, saved once per rope type (gemma3: local and global) the given layers use (default: all of
    them), shared by those layers."""
    used = set(arch.layer_types if layer_types is None else layer_types)
    kinds = len(used) if (arch.gemma_norms and len(set(arch.layer_types)) > 1) else min(1, len(used))
    return kinds * 2 * shape.seq * arch.head_dim * dt.act


def side_network_saved(rows: int, d: int, d_s: int, f_s: int, blocks: int, dt: Dtypes) -> int:
    """LST's side network (methods/lst.py; fp32, or the activations' dtype under autocast): the backbone states
    its ladders read (blocks + 1, rows x d); per block five rows x d_s (the ladder's output and the state it mixes
    with, the mix, its normalised value before and after the norm's weight; under autocast the fp32 norm output's
    16-bit copies for gate and up each) and four rows x f_s (gate, act, up, their product); the final norm's input,
    normalised value and output (up's input); each norm's rsqrt."""
    width = dt.act if dt.autocast else 4
    per_block = (6 if dt.autocast else 5) * d_s + 1 + 4 * f_s
    return width * rows * ((blocks + 1) * d + blocks * per_block + 3 * d_s + 1)


def backward_transient(arch: Arch, shape: Shape, dt: Dtypes, mlp_rows: int | None = None) -> int:
    """Largest short-lived buffers of one layer's backward (MLP intermediate grads, hidden grads); mlp_rows: the
    rows of a deferred MLP's chunk (studio/chunked_mlp.py), whose input gradient is copied into x's (None or all
    rows: a whole MLP)."""
    rows = shape.batch * shape.seq
    mlp_rows = rows if mlp_rows is None else mlp_rows
    return 3 * mlp_rows * arch.inter * dt.act + 2 * rows * arch.hidden * dt.act + \
        (mlp_rows * arch.hidden * dt.act if mlp_rows < rows else 0)
