"""Fused weighted-MSE losses of EMD as autograd Functions (twins: ``ops.generator_loss`` / ``ops.dsm_loss``).

Both losses are ``c * sum_i w[row_i] * r_i^2`` of a residual r = p - q: the forward pass is one read of
p and q with per-program fp32 partial sums written to a buffer and summed by ``torch.sum`` (deterministic,
no atomics); the backward pass is one read of p and q and one write of the gradient, whose scale factor
(grad_output) is read from device memory (no host sync). Layout: contiguous or channels_last in place,
anything else copied once (``.contiguous()``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from emd_fast.checks import check_per_example

from ._common import (
    NUM_WARPS,
    check_inputs,
    flat,
    is_channels_last,
    launch,
    load_per_row,
    per_example,
    tile,
    tiling,
    unflat,
)


@triton.jit
def _residual(p_ptr, q_ptr, w_ptr, numel, row_numel, HAS_Q: tl.constexpr, R: tl.constexpr, V: tl.constexpr,
              BIG: tl.constexpr, PER_ROW: tl.constexpr):
    """(first, starts, o, mask, r, w) of this program: its tile as ``tile`` gives it, r = p - q (q absent: r = p)
    and the rows' weights w, fp32. (A flat tuple: triton 3.6 cannot assign nested tuples.)"""
    first, starts, o = tile(R, V, BIG)
    mask = o < numel
    r = tl.load(p_ptr + o, mask=mask, other=0.0).to(tl.float32)
    if HAS_Q:
        r -= tl.load(q_ptr + o, mask=mask, other=0.0).to(tl.float32)
    return first, starts, o, mask, r, load_per_row(w_ptr, first, starts, o, numel, row_numel, 0.0, PER_ROW)


@triton.jit
def _loss_fwd_kernel(p_ptr, q_ptr, w_ptr, partial_ptr, numel, row_numel, scale, HAS_Q: tl.constexpr,
                     R: tl.constexpr, V: tl.constexpr, BIG: tl.constexpr, PER_ROW: tl.constexpr):
    """partial[pid] = scale * sum over this tile of w * r^2."""
    _, _, _, _, r, w = _residual(p_ptr, q_ptr, w_ptr, numel, row_numel, HAS_Q, R, V, BIG, PER_ROW)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(w * r * r) * scale)


@triton.jit
def _loss_bwd_kernel(p_ptr, q_ptr, w_ptr, alpha_ptr, sigma_ptr, grad_ptr, out_ptr, numel, row_numel, scale,
                     HAS_Q: tl.constexpr, SNR: tl.constexpr, R: tl.constexpr, V: tl.constexpr, BIG: tl.constexpr,
                     PER_ROW: tl.constexpr):
    """out = scale * grad * w * r (SNR: times alpha / sigma of the row)."""
    first, starts, o, mask, r, w = _residual(p_ptr, q_ptr, w_ptr, numel, row_numel, HAS_Q, R, V, BIG, PER_ROW)
    coef = w * (scale * tl.load(grad_ptr).to(tl.float32))
    if SNR:
        coef = coef * load_per_row(alpha_ptr, first, starts, o, numel, row_numel, 0.0, PER_ROW)
        coef = coef / load_per_row(sigma_ptr, first, starts, o, numel, row_numel, 1.0, PER_ROW)
    tl.store(out_ptr + o, coef * r, mask=mask)


def _tiling(p, q, w, out=None):
    """(tiling, numel, row_numel) of a loss kernel over flat p (and q, out) with per-example w."""
    numel = p.numel()
    row_numel = numel // w.shape[0]
    return tiling(numel, row_numel, *(t for t in (p, q, out) if t is not None)), numel, row_numel


def _loss_value(p, q, w, scale):
    """scale * sum w r^2 as an fp32 0-dim tensor (p, q flat)."""
    tiles, numel, row_numel = _tiling(p, q, w)
    partial = torch.empty(tiles.grid[0], dtype=torch.float32, device=p.device)
    launch(_loss_fwd_kernel, tiles.grid, (p, q if q is not None else p, w, partial, numel, row_numel, scale),
           dict(HAS_Q=q is not None, **tiles.constexprs()), NUM_WARPS)
    return partial.sum()


def _loss_grad(meta, p, q, w, grad_output, scale, alpha=None, sigma=None):
    """scale * grad_output * w r (* alpha / sigma), shaped, typed and laid out as meta = (shape, dtype, cl)."""
    shape, dtype, cl = meta
    out = torch.empty(p.numel(), dtype=dtype, device=p.device)
    tiles, numel, row_numel = _tiling(p, q, w, out)
    launch(_loss_bwd_kernel, tiles.grid, (p, q if q is not None else p, w, alpha if alpha is not None else w,
                                    sigma if sigma is not None else w, grad_output, out, numel, row_numel, scale),
           dict(HAS_Q=q is not None, SNR=alpha is not None, **tiles.constexprs()), NUM_WARPS)
    return unflat(out, shape, cl)


class _GeneratorLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, eps, eta, alpha, sigma, weight):
        cl = is_channels_last(g)
        eps, eta, alpha, sigma, weight = flat(eps, cl), flat(eta, cl), *map(per_example, (alpha, sigma, weight))
        ctx.save_for_backward(eps, eta, alpha, sigma, weight)
        ctx.meta = g.shape, g.dtype, cl
        return _loss_value(eps, eta, weight, 0.5 / g.numel())

    @staticmethod
    def backward(ctx, grad_output):
        eps, eta, alpha, sigma, weight = ctx.saved_tensors
        grad = _loss_grad(ctx.meta, eps, eta, weight, grad_output, -1.0 / eps.numel(), alpha, sigma)
        return grad, None, None, None, None, None


class _DSMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, d, x, weight):
        cl = is_channels_last(d)
        d_flat, x_flat, weight = flat(d, cl), flat(x, cl), per_example(weight)
        ctx.save_for_backward(d_flat, x_flat, weight)
        ctx.meta, ctx.x_dtype = (d.shape, d.dtype, cl), x.dtype
        return _loss_value(d_flat, x_flat, weight, 1.0 / d.numel())

    @staticmethod
    def backward(ctx, grad_output):
        d_flat, x_flat, weight = ctx.saved_tensors
        grad = _loss_grad(ctx.meta, d_flat, x_flat, weight, grad_output, 2.0 / d_flat.numel())
        grad_x = -grad.to(ctx.x_dtype) if ctx.needs_input_grad[1] else None
        return grad if ctx.needs_input_grad[0] else None, grad_x, None


def generator_loss(g, eps, eta, alpha, sigma, weight):
    """M-step loss mean(w * r^2) / 2 with r = eps - eta (eta None: r = eps), differentiable in g.

    g, eps, eta: (N, ...) fp32/bf16/fp16; alpha, sigma, weight: (N,). Returns an fp32 scalar equal to
    ``ops.generator_loss``; backward gives dL/dg = -w * alpha * r / (sigma * numel) * grad_output in
    g.dtype (eps, eta get none, as under the reference's stop-gradient; alpha, sigma, weight are constants).
    """
    check_inputs("g", g, eps=eps, eta=eta)
    check_per_example("g", g, alpha=alpha, sigma=sigma, weight=weight)
    return _GeneratorLoss.apply(g, eps, eta, alpha, sigma, weight)


def dsm_loss(d, x, weight):
    """Student denoising score-matching loss mean(w * (d - x)^2), equal to ``ops.dsm_loss``.

    d, x: (N, ...) fp32/bf16/fp16; weight: (N,). Returns an fp32 scalar; backward gives
    dL/dd = 2 * w * (d - x) / numel * grad_output in d.dtype (and its negative for x if x requires grad).
    """
    check_inputs("d", d, x=x)
    check_per_example("d", d, weight=weight)
    return _DSMLoss.apply(d, x, weight)
