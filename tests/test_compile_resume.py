"""Compiled networks under bf16 autocast: a run's backward passes run outside autocast, so the backward graphs of
compiled networks are traced without it too (``compile_networks``; torch's default traces them under the forward's
autocast, and under bf16 the fp32 matrix products of the CPU's math attention backward became bf16 ones)."""
import copy

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F

from emd_fast.emd import EMDConfig
from emd_fast.execution.compiled import compile_networks
from emd_fast.nets.unet import UNetBlock
from emd_fast.training.distiller import Distiller

from helpers import small_problem


def test_compiled_attention_block_in_bf16_computes_the_eager_bits(monkeypatch):
    """Once compile_networks has turned off the backward autocast, an attention block compiled with aot_eager under
    bf16 autocast computes the eager block's output and gradients bit for bit (under torch's default the gradients
    through the attention differ in their last bits: up to 0.5% of the largest element with torch 2.13)."""
    monkeypatch.setattr(functorch_config, "backward_pass_autocast", "same_as_forward")  # torch's default
    distiller = Distiller(*small_problem(hidden=8), EMDConfig(K=1), batch=4, lr_g=1e-3, lr_s=1e-3)
    compile_networks(distiller, backend="aot_eager")  # compiles lazily: nothing yet
    assert functorch_config.backward_pass_autocast == "off"
    torch.manual_seed(0)
    eager = UNetBlock(8, 16, 12, num_heads=2)
    for p in eager.parameters():
        torch.nn.init.normal_(p, std=0.3)  # conv1 and proj start at zero: make every path count
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="aot_eager", dynamic=False)
    x, emb = torch.randn(3, 8, 5, 7), torch.randn(3, 12)  # odd sizes
    results = []
    for block in (eager, compiled):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(xx, emb)
        F.mse_loss(out.float(), torch.ones_like(out, dtype=torch.float32)).backward()
        results.append({"out": out.detach(), "x": xx.grad, **{k: p.grad for k, p in block.named_parameters()}})
    assert [k for k, a in results[0].items() if not torch.equal(a, results[1][k])] == []
