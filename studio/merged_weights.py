"""Chat at base speed: the adapter merged into its own copy of each adapted weight, swapped in and out.

Unmerged, a LoRA-style adapter adds its small products (and their casts) to every adapted linear layer
for each generated token; on a GPU, where decoding waits on kernel launches, that is several launches
per layer for one. Merged (W' = W + ΔW), the tuned model decodes as fast as the base. Merging in place
and back is not exact in 16-bit weights (each round trip rounds W again), and side-by-side chat would
do it for every answer; so the merged weights live in tensors of their own and the adapted layers'
weight tensors are pointed at them or back at the originals (`.data` swaps: no copy, no rounding). The
cost is one more copy of the adapted weights, so merging happens only where that fits in memory, and
only after a probe forward shows the merged model giving the unmerged answer and the swapped-back one
the base's; anything else leaves the adapter unmerged, as before.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .errors import StudioError
from .methods.base import set_adapter_enabled
from .methods.common import WrappedLinear

HEADROOM = 0.5  # merge only when the copies take at most this share of the free memory (the rest: KV cache)

Entry = tuple["nn.Parameter | None", "torch.Tensor | None"]  # a parameter (None: unset) and the data it holds
Params = dict[nn.Module, dict[str, Entry]]  # per adapted base layer, its parameters by name


class MergedWeights:
    """A model whose adapter is merged (the adapted layers hold the tuned parameters) with the base ones
    kept beside them. A merge may write new data into a parameter (LoRA) or add one (SSF: a bias where the
    layer had none), so both the parameter entries and their data are swapped."""

    def __init__(self, model: nn.Module, originals: Params):
        self.model = model
        self.originals = originals
        self.merged = _entries(originals)

    @contextlib.contextmanager
    def base_weights(self) -> Iterator[None]:
        """Run the base model: the original parameters swapped in, every other adapter part switched off."""
        info = self.model.studio_adapter
        previous = info.enabled
        _put(self.originals)
        info.enabled = False
        set_adapter_enabled(self.model, False)
        try:
            yield
        finally:
            _put(self.merged)
            info.enabled = previous
            set_adapter_enabled(self.model, previous)


def merge_for_chat(model: nn.Module) -> tuple[MergedWeights | None, str]:
    """Merge the model's adapter for generation if it can be done exactly and fits: (merged weights or None,
    a line saying which and why)."""
    wrappers, why_not = merge_plan(model)
    if why_not:
        return None, why_not
    info = model.studio_adapter
    layers = [m.base_layer for m in wrappers]
    extra = copy_bytes(wrappers)
    device = next(model.parameters()).device
    if not layers or extra > HEADROOM * free_bytes(device):
        return None, (f"The adapter runs unmerged: a merged copy of the adapted weights ({extra / 2**30:.2f} GiB) "
                      "does not fit beside the model.")
    probe = _probe_ids(model, device)
    want_tuned = _logits(model, probe)
    with info.method.disable_adapter(model):
        want_base = _logits(model, probe)
    originals: Params = {layer: {name: (p, None if p is None else p.data.clone())
                                 for name, p in layer._parameters.items()} for layer in layers}
    try:
        info.method.merge(model)
    except StudioError as e:
        _unmerge(model, wrappers, originals)
        return None, f"The adapter runs unmerged ({e})"
    merged = MergedWeights(model, originals)
    got_tuned = _logits(model, probe)
    with merged.base_weights():
        got_base = _logits(model, probe)
    if not (_merged_matches(got_tuned, want_tuned, want_base, layers[0].weight.dtype)
            and _close(got_base, want_base, 1e-6)):
        _unmerge(model, wrappers, originals)
        return None, "The adapter runs unmerged (merged, it did not give the unmerged model's answers)."
    return merged, "The adapter is merged into a copy of the weights: tuned answers generate at the base's speed."


def merge_plan(model: nn.Module) -> tuple[list[nn.Module], str | None]:
    """The adapted layers a chat merge would copy, or (none, the line saying why the adapter stays unmerged)."""
    info = getattr(model, "studio_adapter", None)
    if info is None or not info.method.mergeable:
        return [], "The adapter runs unmerged (this method does not merge into the base weights)."
    wrappers = [m for m in model.modules() if isinstance(m, WrappedLinear) and hasattr(m, "merge")]
    if any(type(m.base_layer) is not nn.Linear for m in wrappers):  # the rule the methods' own merges follow
        return [], ("The adapter runs unmerged: its base is 4-/8-bit, and merging needs 16-bit weights "
                    "(export --merge writes a merged 16-bit model).")
    return wrappers, None


def copy_bytes(wrappers: list[nn.Module]) -> int:
    """Bytes of the merged copy: every parameter of the adapted base layers (on the meta device too)."""
    return sum(p.numel() * p.element_size() for m in wrappers for p in m.base_layer.parameters(recurse=False))


def _entries(like: Params) -> Params:
    """The parameters the layers of `like` hold now (with their data)."""
    return {layer: {name: (p, None if p is None else p.data) for name, p in layer._parameters.items()}
            for layer in like}


def _put(params: Params) -> None:
    for layer, entries in params.items():
        for name in set(layer._parameters) | set(entries):
            p, data = entries.get(name, (None, None))
            layer._parameters[name] = p
            if p is not None:
                p.data = data


def _unmerge(model: nn.Module, wrappers: list[nn.Module], originals: Params) -> None:
    """Back to the unmerged adapter: the original parameters, no module marked merged."""
    _put(originals)
    for m in wrappers:
        m.merged = False
    model.studio_adapter.merged = False


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on the device (host RAM available for the CPU); on CUDA what the driver
    has free plus what torch's allocator holds unused (a model dropped before this one left it there)."""
    if device.type == "cuda":
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0] + unused)
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with the dependencies
        return 0


def _probe_ids(model: nn.Module, device: torch.device) -> torch.Tensor:
    vocab = int(model.config.get_text_config().vocab_size)
    return (torch.arange(1, 17, device=device) * 7919 % vocab).unsqueeze(0)  # 16 tokens spread over the vocabulary


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def _merged_matches(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> bool:
    """The merged model's logits against the unmerged adapter's (and the base's, `base`). In fp32 within 1e-4 of
    the largest logit. In 16 bits each way rounds on its own (the merged weight once, the unmerged model its two
    products), and over a deep model their gap reaches a few percent of the largest logit (Qwen2.5-0.5B in bf16:
    2.2%, with each as far from the fp32 model as the other): there the gap's RMS is held to 5% of the logits'
    RMS plus a tenth of the adapter's own effect, since a wrong merge (a scale applied twice, a layer left out)
    is off by a sizeable part of that effect."""
    if dtype == torch.float32:
        return _close(got, want, 1e-4)
    return bool(torch.isfinite(got).all()) and _rms(got - want) <= 0.05 * _rms(want) + 0.1 * _rms(want - base)


def _rms(t: torch.Tensor) -> float:
    return float(t.pow(2).mean().sqrt())


def _close(got: torch.Tensor, want: torch.Tensor, relative: float) -> bool:
    """Every logit within `relative` of the largest one's size."""
    scale = float(want.abs().max()) or 1.0
    return bool(torch.isfinite(got).all()) and float((got - want).abs().max()) <= relative * scale
