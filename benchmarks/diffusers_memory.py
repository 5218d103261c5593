"""Computed GPU memory of an EMD run on a Stable-Diffusion-v1.5-sized UNet (teacher, generator, student), no GPU needed.

    python benchmarks/diffusers_memory.py                  # SD v1.5's UNet config, batch 1 4 8
    python benchmarks/diffusers_memory.py --batch 2 16 --no-ema

The UNet is built from its config (diffusers' UNet2DConditionModel defaults with sample_size 64 and
cross_attention_dim 768 are SD v1.5's: 4 x 64 x 64 latents, (320, 640, 1280, 1280) channels, 768-wide text
embeddings of 77 tokens, 859.5 M parameters) under torch's FakeTensorMode: shapes and dtypes only, nothing is
allocated or computed. What is counted:

* static: generator and student fp32 weights, gradients and two Adam moments (16 bytes a parameter each), the
  generator's fp32 EMA (4 bytes), the frozen teacher (2 bytes in bf16, 4 in fp32);
* activations: the bytes of every distinct tensor one UNet forward saves for its backward (weights excluded, the
  bf16 weight copies autocast makes included), with and without diffusers' activation checkpointing
  (``--grad-checkpoint``). One UNet's are alive at a time: the E-step's generator VJP, the M-step and the student
  update run one after the other; the teacher and student forwards of the E-step keep nothing.

The count is checked against real CPU forwards of a tiny UNet (tests/test_diffusers.py): equal in fp32, within 2%
under bf16 autocast (1.0% seen). Not counted: the CUDA context and caching-allocator slack, cuDNN workspaces, the
transient buffers of a backward and of the optimizer step, the E-step's few (N, 4, 64, 64) chain tensors (a few MB).
Read the figures as a lower bound of nvidia-smi's.
"""
from __future__ import annotations

import argparse

import torch

GIB = 2**30


def saved_bytes(unet, mode, batch: int, checkpoint: bool, bf16: bool, tokens: int = 77) -> int:
    """Bytes of the distinct tensors one training forward of ``unet`` (made in the FakeTensorMode ``mode``) saves for
    backward."""
    params = {p.untyped_storage()._cdata for p in unet.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    (unet.enable_gradient_checkpointing if checkpoint else unet.disable_gradient_checkpointing)()
    unet.train()
    cfg = unet.config
    with mode:
        x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, requires_grad=True)
        emb = torch.randn(batch, tokens, cfg.cross_attention_dim)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            unet(x, torch.full((batch,), 500.0), emb)
    return sum(seen.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--no-ema", action="store_true", help="a run with --ema 0")
    args = p.parse_args(argv)
    from diffusers import UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    with mode:
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the other defaults are SD v1.5's
    n = sum(p.numel() for p in unet.parameters())
    print(f"UNet parameters: {n / 1e6:.1f} M")
    for precision in ("bf16", "fp32"):
        static = n * (2 * 16 + (0 if args.no_ema else 4) + (2 if precision == "bf16" else 4))
        print(f"\n--precision {precision}: static {static / GIB:.1f} GiB (generator + student with grads and Adam, "
              f"{'no EMA' if args.no_ema else 'EMA'}, teacher in {precision})")
        print(f"{'batch':>6} {'activations':>12} {'total':>8} {'ckpt act.':>10} {'ckpt total':>11}   (GiB)")
        for b in args.batch:
            plain, ckpt = (saved_bytes(unet, mode, b, c, precision == "bf16") for c in (False, True))
            print(f"{b:>6} {plain / GIB:>12.2f} {(static + plain) / GIB:>8.1f} {ckpt / GIB:>10.2f} "
                  f"{(static + ckpt) / GIB:>11.1f}")


if __name__ == "__main__":
    main()
