"""Compiled networks under bf16, and resumes. A run's backward passes run outside autocast, so the backward graphs of
compiled networks are traced without it too (``compile_networks``; torch's default traces them under the forward's
autocast, and under bf16 the fp32 matrix products of the CPU's math attention backward became bf16 ones). Compiled
code still need not compute eager's bits (inductor fuses; even aot_eager sums the gradient of a tensor used both
inside and outside a compiled region in another order), and --compile, like the other execution options, is given
anew to each resume: a checkpoint records them, a resume with the same ones continues bit for bit
(tests/test_edm2_lora.py: bf16 + --compile), and one with other ones says that it need not."""
import copy
import shutil

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F

from emd_fast import train
from emd_fast.emd import EMDConfig
from emd_fast.execution.compiled import compile_networks
from emd_fast.nets.unet import UNetBlock
from emd_fast.training.checkpoint import load_checkpoint
from emd_fast.training.distiller import Distiller

from helpers import small_problem

SMALL = ["--teacher-fit-steps", "10", "--batch", "8", "--hidden", "16", "--depth", "1", "--eval-every", "0",
         "--eval-samples", "50", "--ckpt-every", "2", "--K", "1", "--quiet", "--device", "cpu", "--precision", "bf16"]
RESUME = ["--resume", "--steps", "3", "--quiet", "--device", "cpu"]


def resume_notes(capsys, out, *flags) -> list[str]:
    """The notes on stderr of ``--resume`` of the run ``out`` to step 3 with ``flags``."""
    capsys.readouterr()
    assert train.main(["--out", str(out), *RESUME, *flags]) == 0
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]


def test_resume_with_other_execution_options_says_it_need_not_be_bit_for_bit(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EMD_COMPILE_BACKEND", "aot_eager")
    run = tmp_path / "run"
    assert train.main(["--out", str(run), *SMALL, "--steps", "2", "--compile"]) == 0
    _, state = load_checkpoint(run / "checkpoints" / "step_0000002.json")
    assert state["execution"] == {"backend": "reference", "kernel_noise": True, "precision": "bf16",
                                  "channels_last": False, "finite_check": "sync", "compile": "default",
                                  "compile_backend": "aot_eager", "cuda_graph": False, "device": "cpu"}
    copies = [shutil.copytree(run, tmp_path / name) for name in ("eager", "other_backend")]
    assert resume_notes(capsys, run, "--compile") == []  # the same options: nothing to say

    [note] = resume_notes(capsys, copies[0])
    assert note.startswith("note: step_0000002.json was computed with other execution options than this resume "
                           "has (compile: checkpoint 'default', run None, compile_backend: checkpoint 'aot_eager', "
                           "run None)") and "need not continue it bit for bit" in note, note
    monkeypatch.setenv("EMD_COMPILE_BACKEND", "eager")
    [note] = resume_notes(capsys, copies[1], "--compile", "--finite-check", "deferred")
    assert "(finite_check: checkpoint 'sync', run 'deferred', compile_backend: checkpoint 'aot_eager', run 'eager')" \
        in note, note


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
