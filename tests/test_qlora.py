"""QLoRA: a 4-bit NF4 base (bitsandbytes, double quantization) with LoRA on top, on the CPU."""
from __future__ import annotations

import pytest
import torch

from training import fit
from studio.checkpoint import load_adapter, save_adapter
from studio.config import ModelConfig, load_config
from studio.errors import ConfigError
from studio.methods import applied, apply_method, method_config
from studio.models import load_model
from studio.rundir import RunDir
from studio.runner import execute


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model, tok = load_model(ModelConfig(name="tiny-llama", device="cpu"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_nf4_base_with_lora_trains_and_saves(tiny_folder, tmp_path):
    import bitsandbytes as bnb
    model, tok = load_model(ModelConfig(name=str(tiny_folder), quantization="nf4", device="cpu"))
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_state.nested  # double quantization
    assert model.model.embed_tokens.weight.dtype == torch.float32  # embeddings stay 16/32-bit
    apply_method(model, method_config({"name": "qlora", "r": 4}))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    losses, _ = fit(model, batch, 6, 1e-2)
    assert losses[-1] < losses[0]
    save_adapter(model, tmp_path / "adapter")
    # The adapter is plain LoRA: it loads onto the 16/32-bit base too, close to the 4-bit outputs.
    full, _ = load_model(ModelConfig(name=str(tiny_folder), device="cpu"))
    load_adapter(full, tmp_path / "adapter")
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = full(input_ids=ids).logits
    assert (a - b).abs().mean() < 0.05
    with pytest.raises(Exception, match="4-/8-bit base"):
        applied(model).method.merge(model)


def test_qlora_run_end_to_end_with_8bit_optimizer_or_clear_error(tiny_folder, tmp_path):
    cfg = load_config(None, [f"model.name={tiny_folder}", "model.quantization=nf4", "model.device=cpu",
                             "method.name=qlora", "data.limit=32", "data.max_length=48", "train.max_steps=3",
                             "train.batch_size=2"])
    run = RunDir.create(tmp_path / "runs", cfg)
    execute(run, cfg)
    assert run.status()["state"] == "done" and run.adapter() is not None


def test_a_random_preset_loads_in_4bit_and_trains(tmp_path):
    """model.quantization=nf4 on a random test preset: its decoder Linears become bitsandbytes' 4-bit ones, as a
    4-bit load of real weights gives (bench --trainer's QLoRA rows, a demo run); 8-bit stays a clear error."""
    import bitsandbytes as bnb
    model, _ = load_model(ModelConfig(name="tiny-llama", quantization="nf4", device="cpu"))
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, bnb.nn.Linear4bit) and isinstance(layer.mlp.down_proj, bnb.nn.Linear4bit)
    assert layer.self_attn.q_proj.weight.quant_state.nested and model.lm_head.weight.dtype == torch.float32
    cfg = load_config(None, ["model.name=tiny-llama", "model.quantization=nf4", "model.device=cpu", "method.name=qlora",
                             "data.limit=32", "data.max_length=48", "train.max_steps=3", "train.batch_size=2"])
    run = RunDir.create(tmp_path / "runs", cfg)
    execute(run, cfg)
    assert run.status()["state"] == "done" and len(run.metrics()) == 3
    with pytest.raises(ConfigError, match="4-bit only"):
        load_model(ModelConfig(name="tiny-llama", quantization="int8", device="cpu"))


def test_lora_on_a_4bit_base_trains_as_one_op_like_the_module_path(tiny_folder, monkeypatch):
    """QLoRA takes the fused LoRA op (the base dequantized for its GEMMs, forward and backward): the outputs
    and gradients of bitsandbytes' own path; generation (no grad) keeps bitsandbytes' 4-bit kernels."""
    from studio.methods.lora import LoraLinear
    model, _ = load_model(ModelConfig(name=str(tiny_folder), quantization="nf4", device="cpu"))
    apply_method(model, method_config({"name": "qlora", "r": 4, "lora_dropout": 0.0}))
    q = model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(q.lora_B.weight, std=0.1)  # a non-zero update
    x = torch.randn(2, 7, q.base_layer.in_features, generator=torch.Generator().manual_seed(0))
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(LoraLinear, "uses_fused_op", lambda self: False)
        xi = x.clone().requires_grad_()
        y = q(xi)
        assert (type(y.grad_fn).__name__ == "FusedLoraLinearBackward") == fused
        grads = torch.autograd.grad(y.square().sum(), [xi, q.lora_A.weight, q.lora_B.weight])
        results.append((y.detach(), *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    monkeypatch.undo()
    with torch.no_grad():
        assert q.fused_parts(x) is None  # generation: bitsandbytes' path
    q.base_layer.compute_dtype = torch.bfloat16  # a base computing in another dtype than the fused op would
    assert q.fused_parts(x.requires_grad_()) is None


def test_a_4bit_model_step_on_the_fused_ops_equals_the_module_path(tiny_folder, monkeypatch):
    """The whole model: attention projections and the gated MLP with its 4-bit down_proj (fused_mlp.py); q/k/v and
    gate/up each as one op over their 4-bit bases (sibling_lora.py)."""
    from studio.methods.lora import LoraLinear
    from studio.memory_bench import random_batch
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(LoraLinear, "uses_fused_op", lambda self: False)
        model, _ = load_model(ModelConfig(name=str(tiny_folder), quantization="nf4", device="cpu"))
        model.train()  # as training runs it: in eval mode bitsandbytes repacks for its CPU inference kernel
        torch.manual_seed(0)  # A's initialisation
        apply_method(model, method_config({"name": "qlora", "r": 4, "lora_dropout": 0.0}))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
        out = model(**random_batch(model.config.vocab_size, 2, 12))
        out.loss.backward()
        names = {type(n).__name__ for n in _grad_fns(out.loss)}
        assert ({"GatedDownLoraBackward", "FusedLoraLinearBackward", "SiblingLoraBackward"} <= names) == fused
        runs.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = runs
    torch.testing.assert_close(l0, l1, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], atol=1e-5, rtol=1e-3)


def _grad_fns(t: torch.Tensor) -> list:
    seen, todo = [], [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.append(fn)
        todo += [nxt for nxt, _ in fn.next_functions]
    return seen


def test_an_evaluation_pass_leaves_the_4bit_training_steps_as_they_were(tiny_folder):
    """On a CPU with AVX512-BF16 bitsandbytes repacks 4-bit weights for its inference kernel at an eval-mode
    no-grad forward, and that kernel has no backward: a run that evaluates between steps would then train on
    wrong gradients (seen: the step after the first evaluation 2e-5 off). A training model keeps its layout."""
    import warnings

    from studio.trainer import train

    def losses(eval_every: int) -> list[float]:
        sets = {"model.name": str(tiny_folder), "model.quantization": "nf4", "model.device": "cpu", "data.path": "arith",
                "data.max_length": 48, "data.limit": 96, "data.eval_fraction": 0.2, "train.eval_every": eval_every,
                "train.batch_size": 4, "train.max_steps": 5, "train.lr": 1e-2, "method.name": "qlora",
                "method.lora_dropout": 0.0}
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*autograd kernel was not registered.*")
            events = list(train(load_config(None, [f"{k}={v}" for k, v in sets.items()])))
        return [e["loss"] for e in events if e["type"] == "step"]

    assert losses(eval_every=1) == pytest.approx(losses(eval_every=100), rel=1e-6)


def test_qdora_generates_as_it_trains(tiny_folder):
    """DoRA reads its 4-bit base weight for the row norms; bitsandbytes' CPU inference repack (AVX512-BF16)
    must not change that layout under it: before, a chat on such a CPU scaled by garbage norms (logits
    0.07 off the training forward's, against 0.002 for plain LoRA)."""
    model, _ = load_model(ModelConfig(name=str(tiny_folder), quantization="nf4", device="cpu"))
    apply_method(model, method_config({"name": "lora", "r": 4, "use_dora": True, "lora_dropout": 0.0}))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.randint(5, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = model.train()(input_ids=ids).logits
        chat = model.eval()(input_ids=ids).logits
    q = model.model.layers[0].self_attn.q_proj.base_layer
    assert not getattr(q.weight.quant_state, "packing_format_for_cpu", False)
    assert (trained - chat).abs().max() < 0.01


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4, "use_dora": True, "lora_dropout": 0.0},
                                    {"name": "ia3"}], ids=["dora", "ia3"])
def test_rescaled_adapters_train_over_a_4bit_base(tiny_folder, method):
    """DoRA and IA3 rescale a product they make themselves (methods/rescaled_product.py): over a 4-bit base it
    is the dequantized weight's, forward and backward, as over the same weight in a 16-bit Linear."""
    model, _ = load_model(ModelConfig(name=str(tiny_folder), quantization="nf4", device="cpu"))
    apply_method(model, method_config(method))
    ids = torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in params.items():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)

    def grads():
        model.train()(input_ids=ids, labels=ids).loss.backward()
        out = {n: p.grad.clone() for n, p in params.items()}
        model.zero_grad(set_to_none=True)
        return out

    import bitsandbytes.functional as bnbf
    quantized = grads()
    for module in list(model.modules()):
        base = getattr(module, "base_layer", None)
        if base is not None and hasattr(base.weight, "quant_state"):
            dense = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                    dtype=base.weight.quant_state.dtype)
            with torch.no_grad():
                dense.weight.copy_(bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state))
                if base.bias is not None:
                    dense.bias.copy_(base.bias)
            module.base_layer = dense.requires_grad_(False)
    dense_grads = grads()
    assert len(quantized) > 0
    for name, g in quantized.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, dense_grads[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", [{"name": "qlora"}, {"name": "dora"}, {"name": "ia3"}, {"name": "adapter"}],
                         ids=lambda m: m["name"])
def test_memory_estimate_of_what_a_4bit_step_keeps(tiny_folder, method, compute):
    """What autograd keeps over a 4-bit base, byte for byte what the estimate says (IA3's feed-forward scale
    takes bitsandbytes' product there, not the gated MLP's op, and keeps down's input: it was 18% under)."""
    from studio.memory import estimate
    from studio.memory_bench import random_batch, saved_tensor_bytes
    cfg = load_config(None, [f"model.name={tiny_folder}", "model.quantization=nf4", "model.device=cpu",
                             f"model.compute_dtype={compute}", f"method.name={method['name']}", "data.max_length=64",
                             "train.batch_size=2", "train.loss_chunk=64"])
    model, _ = load_model(cfg.model)
    apply_method(model, method_config(method))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute == "bfloat16"):
        measured = saved_tensor_bytes(model, random_batch(model.config.vocab_size, 2, 64), chunk=64)
    details = estimate(cfg, "cpu", padding=False).details  # under autocast also the adapters' 16-bit copies
    predicted = details["saved_for_backward"] + details["autocast_copies"]
    # over by at most the 16-bit copy of a weight whose input needs no grad (cast, not kept: the first adapter's)
    assert -0.002 * measured <= predicted - measured <= 0.03 * measured, (predicted, measured)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_ia3_over_a_4bit_base_keeps_no_copy_of_downs_input(tiny_folder, monkeypatch, compute):
    """IA3's feed-forward scale before a 4-bit down_proj (ia3.ScaledInput) keeps the gated MLP's gate and up, which
    it keeps anyway, instead of act(gate)·up, and rebuilds that in backward: gradients bitwise autograd's, one
    rows x intermediate tensor a layer fewer kept."""
    from studio.memory_bench import random_batch, saved_tensor_bytes
    from studio.methods import ia3
    model, _ = load_model(ModelConfig(name=str(tiny_folder), quantization="nf4", device="cpu", compute_dtype=compute))
    apply_method(model, method_config({"name": "ia3"}))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in params.items():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    batch = random_batch(model.config.vocab_size, 2, 16)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute == "bfloat16")

    def run():
        with autocast:
            kept = saved_tensor_bytes(model.train(), batch, chunk=64, backward=False)
        model.zero_grad(set_to_none=True)
        with autocast:
            model(**batch).loss.backward()
        return kept, {n: p.grad.clone() for n, p in params.items()}

    kept, grads = run()
    monkeypatch.setattr(ia3.ScaledInput, "apply", staticmethod(lambda x, s: x * s))
    kept_plain, want = run()
    layers, rows, inter = model.config.num_hidden_layers, 2 * 16, model.config.intermediate_size
    itemsize = 2 if compute == "bfloat16" else 4
    assert kept_plain - kept == layers * rows * inter * itemsize
    for name, g in grads.items():
        assert torch.equal(g, want[name]), name


def test_a_4bit_model_step_through_the_kernels_equals_bitsandbytes_dequantization(tiny_folder, monkeypatch):
    """A whole QLoRA step (every 4-bit layer, the fused MLP) with the Triton kernels (on the CPU through the
    interpreter) against the torch ops and bitsandbytes' dequantization: the same loss and gradients."""
    pytest.importorskip("triton")
    from studio import kernels
    from studio.losses import causal_lm_loss
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    monkeypatch.setattr(kernels, "_verdicts", {})
    runs = []
    for routing in (kernels.disabled, kernels.forced):
        model = _qlora_model(tiny_folder)
        with routing():
            loss, _ = causal_lm_loss(model, batch)
            loss.backward()
        runs.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    assert kernels.verdicts()["nf4 cpu float32 nested"]
    (loss, grads), (want, want_grads) = runs[1], runs[0]
    torch.testing.assert_close(loss, want)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def _qlora_model(folder):
    """The tiny model in 4-bit with LoRA r4 (the same A each time, B off zero), in training mode as a run has it
    (a folder's model loads in eval mode: no checkpointing, and bitsandbytes repacks for its CPU kernel)."""
    torch.manual_seed(0)
    model, _ = load_model(ModelConfig(name=str(folder), quantization="nf4", device="cpu"))
    apply_method(model, method_config({"name": "qlora", "r": 4, "lora_dropout": 0.0}))
    model.train()
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.02)
    return model
