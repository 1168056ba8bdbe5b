"""DoRA's row norms ‖W + s·BA‖ without a weight-sized tensor.

‖W + s·BA‖²_row = ‖W‖²_row + 2s·⟨W, BA⟩_row + s²·‖BA‖²_row, where ⟨W, BA⟩_i = Σ_k B_ik (W Aᵀ)_ik (one GEMM,
out x r, reading W in its own dtype with an fp32 output; A split into two 16-bit parts for a 16-bit W) and
‖BA‖²_i = B_i (A Aᵀ) B_iᵀ (r x r); ‖W‖² is one more read of W. The direct way (peft's, and ours before) builds
W + s·BA in fp32 at every forward and recomputation: weight-sized fp32 writes and reads and an fp32 copy of a
16-bit weight, several times the time of this on the CPU for a 4096 x 4096 layer.
"""
from __future__ import annotations

import torch
from torch import nn

from .rescaled_product import base_weight, fp32_product


@torch.no_grad()
def dora_row_norms(module: nn.Module) -> torch.Tensor:
    """‖W + scaling·B A‖ per output row (fp32) of a LoraLinear."""
    a, b, s = module.lora_A.weight.float(), module.lora_B.weight.float(), module.scaling
    w = base_weight(module.base_layer)
    # read again at every call rather than cached: a cache filled in a checkpointed layer's forward and read in its
    # recomputation would make the two compiled graphs differ (train.compile)
    w_sq = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square_()
    if w.dtype == torch.float32:
        wa = a @ w.t()                                          # (W Aᵀ)ᵀ: r x out
    else:  # A as a 16-bit pair (high part + the rest), one GEMM of 2r rows: A's rounding would show in the norm
        high = a.to(w.dtype)
        wa = fp32_product(torch.cat([high, (a - high.float()).to(w.dtype)]), w).view(2, *a.shape[:1], -1).sum(0)
    cross = torch.einsum("or,ro->o", b, wa)
    ba_sq = ((b @ (a @ a.t())) * b).sum(1)
    return (w_sq + 2 * s * cross + s * s * ba_sq).clamp_min_(0).sqrt_()
