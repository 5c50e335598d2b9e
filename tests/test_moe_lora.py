"""MoE-LoRA: gates are a distribution per token, top-k really is sparse (unselected experts get no gradient), the
LoRAMoE balance loss is minimal for uniform routing, and the method runs through the harness."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_run
from torch import nn


def _method(num_tasks: int = 2, **knobs):
    from clbench.models import tiny_model
    from clbench.registry import get_method

    cls = get_method("moe-lora")
    loaded = tiny_model()
    return cls(loaded.model, loaded.tokenizer, cls.default_config(knobs), num_tasks=num_tasks)


def _batch(n: int = 3, tokens: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (n, tokens), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("top_k", [0, 1, 2])
def test_gate_weights_are_a_distribution_per_token_with_k_nonzeros(top_k):
    """If this fails, the mixture rescales the adapter update (weights not summing to 1) or top-k keeps the wrong
    number of experts per token."""
    from clbench.methods.moe_lora import SoftmaxRouter

    torch.manual_seed(0)
    router = SoftmaxRouter(16, 4, top_k)
    x = torch.randn(3, 5, 16)
    indices, weights = router(x)
    assert indices is None and weights.shape == (3, 5, 4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 5))
    assert (weights >= 0).all()
    assert ((weights > 0).sum(-1) == (top_k or 4)).all()
    # the kept experts are the k largest dense gates, renormalised (dense: the softmax itself)
    probs = router.logits(x).softmax(-1)
    keep = torch.zeros_like(probs).scatter(-1, probs.topk(top_k or 4, -1).indices, 1.0)
    torch.testing.assert_close(weights, probs * keep / (probs * keep).sum(-1, keepdim=True))


def test_top_k_gives_no_gradient_to_experts_no_token_selected():
    """If this fails, top-k routing is not sparse: experts that no token picked still learn from the batch."""
    from clbench.methods._experts import ExpertLinear
    from clbench.methods.moe_lora import SoftmaxRouter

    torch.manual_seed(0)
    layer = ExpertLinear(nn.Linear(16, 8), num_experts=4, rank=2, alpha=4.0, router=SoftmaxRouter(16, 4, top_k=2))
    with torch.no_grad():
        layer.B.normal_()  # B = 0 at init would zero every A gradient and hide the test
        # positive inputs and these rows make experts 0 and 1 the top 2 for every token
        layer.router.weight.copy_(torch.tensor([1.0, 0.5, -1.0, -2.0]).unsqueeze(1).expand(4, 16))
    x = torch.rand(3, 5, 16) + 0.1
    layer(x).pow(2).sum().backward()
    for grad in (layer.A.grad, layer.B.grad):
        assert torch.equal(grad[2:], torch.zeros_like(grad[2:]))
        assert (grad[:2].abs().sum(dim=(1, 2)) > 0).all()

    # random routing: an expert gets gradient exactly when some token selected it
    layer.zero_grad()
    with torch.no_grad():
        layer.router.weight.normal_()
    x = torch.randn(1, 2, 16)
    layer(x).pow(2).sum().backward()
    chosen = set(layer.router.logits(x).topk(2, -1).indices.flatten().tolist())
    for e in range(4):
        nonzero = bool(layer.A.grad[e].abs().sum() > 0) and bool(layer.B.grad[e].abs().sum() > 0)
        assert nonzero == (e in chosen), e


def test_balance_loss_is_zero_for_uniform_routing_and_positive_otherwise():
    """If this fails, the balance term pushes a perfectly balanced router away from balance, or ignores imbalance."""
    from clbench.methods.moe_lora import balance_loss

    mask = torch.ones(2, 6)
    mask[0, :2] = 0
    uniform = torch.full((2, 6, 4), 0.25)
    assert balance_loss(uniform, mask).item() == pytest.approx(0.0, abs=1e-7)
    skewed = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(2, 6, 4)
    assert balance_loss(skewed, mask).item() > 0.5
    torch.manual_seed(0)
    for _ in range(5):  # uniform is the minimum among random routings of the same tokens
        assert balance_loss(torch.randn(2, 6, 4).softmax(-1), mask) > balance_loss(uniform, mask)
    # padding tokens do not count: changing their gates changes nothing
    moved = uniform.clone()
    moved[0, :2] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert balance_loss(moved, mask).item() == pytest.approx(0.0, abs=1e-7)


def test_method_logs_balance_term_zero_for_uniform_routers_and_trains_only_adapters():
    """If this fails, the balance knob is silently ignored, is not logged as its own term, or training touches the
    base model."""
    method = _method(top_k=2, balance_weight=0.5)
    method.begin_task(0, None)
    method.train()
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B", "router.weight")) for n in trainable)
    batch = _batch()
    terms = method.regularizer(batch, method(batch))
    assert set(terms) == {"balance"} and terms["balance"].item() > 0  # random routers are not balanced
    with torch.no_grad():
        for router in method.routers():
            router.weight.zero_()  # uniform dense gates for every token
    terms = method.regularizer(batch, method(batch))
    assert terms["balance"].item() == pytest.approx(0.0, abs=1e-6)
    logged = {}
    method.log = lambda name, value, **kw: logged.setdefault(name, value)
    method.training_step(batch, 0)
    assert {"train/lm_loss", "train/balance"} <= set(logged)
    assert _method().regularizer(batch, None) == {}  # off by default: no term, no bookkeeping


def test_moe_lora_runs_through_the_harness_and_counts_its_parameters(tmp_path, trace_dir):
    """If this fails, `clbench run --method moe-lora` breaks, or the growth curve reports the wrong adapter size."""
    from clbench.harness import Harness

    cfg = tiny_run(tmp_path, trace_dir, method="moe-lora", zero_shot=False)
    run_dir = Harness(cfg, {"top_k": 2, "balance_weight": 0.01}).run()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # tiny model: 4 layers, q 64->64, v 64->32; 4 experts of rank 2 and a 4x64 router per target linear
    per_layer = 4 * 2 * (64 + 64) + 4 * 64 + 4 * 2 * (64 + 32) + 4 * 64
    assert metrics["params"][-1]["added"] == metrics["params"][-1]["trainable"] == 4 * per_layer


def test_bad_knobs_are_refused():
    """If this fails, a rank that the experts cannot split evenly runs silently with the wrong size."""
    from clbench.config import ConfigError
    from clbench.registry import get_method

    with pytest.raises(ConfigError, match="multiple of num_experts"):
        get_method("moe-lora").default_config({"r": 6, "num_experts": 4})
