"""Does a checkpoint's dropout replayed from a CUDA graph redraw the forward's masks? (GPU only)

    python -m baselines.graph_rng_check

train.cuda_graphs keeps runs with dropout inside checkpointed layers eager (step_graph.RECOMPUTED_DROPOUT):
the checkpoint redraws the masks by resetting the generator on the host, and the CPU stand-in for a
replay (tests/graph_replay.py) cannot say whether a captured graph repeats that reset. This answers it
on a GPU: one checkpointed dropout layer, its input gradient eager and replayed from the same seed.
Prints one JSON line: whether capture was allowed, and whether the replayed gradient equals the eager one
(equal: the block could go; different or refused: it stays).
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def main() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 256, device="cuda")
    x = torch.randn(64, 256, device="cuda", requires_grad=True)

    def step() -> torch.Tensor:
        out = checkpoint(lambda t: F.dropout(lin(t), 0.5, training=True), x, use_reentrant=False,
                         preserve_rng_state=True)
        loss = out.square().sum()
        loss.backward()
        return loss.detach()

    def eager_grad(seed: int) -> torch.Tensor:
        x.grad = None
        torch.cuda.manual_seed(seed)
        step()
        return x.grad.clone()

    want = eager_grad(1)
    row: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = torch.zeros_like(x)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except Exception as exc:  # noqa: BLE001 - the answer is that capture refuses
        row |= {"captured": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        print(json.dumps(row), flush=True)
        return
    x.grad.zero_()
    torch.cuda.manual_seed(1)
    graph.replay()
    torch.cuda.synchronize()
    got = x.grad.clone()
    row |= {"captured": True, "replayed_grad_equals_eager": bool(torch.equal(got, want)),
            "max_abs_diff": float((got - want).abs().max()),
            "eager_differs_across_seeds": not torch.equal(eager_grad(2), want)}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
