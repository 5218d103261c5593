"""Fused Langevin steps of the EMD E-step (twins: ``emd_fast.ops.langevin_eps_step`` / ``langevin_z_step``).

One kernel pass reads each input once and writes each output once; the math is fp32 whatever the input
dtype (fp32 / bf16 / fp16), outputs are in the dtype of the chain variable. The noise is either given
(``noise=``, element by element equal to the reference) or drawn in the kernel from a ``NoiseStream``
(Philox 4x32-10 keyed by the seed, counter = stream counter + element // 4; Box-Muller with polynomial
sin/cos, in the registers of the loads and stores: no shared memory, no fp64).
Layout: contiguous or channels_last inputs are read in place; others are copied once (``.contiguous()``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from emd_fast.checks import check_per_example

from ._common import (
    NUM_WARPS,
    check_gamma,
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


class NoiseStream:
    """A reproducible, never-repeating stream of standard normals for the Langevin kernels.

    The state is a device int64 tensor ``[seed, counter]``: kernels read it through a pointer and the
    counter is advanced on the device after each launch, so a step never syncs with the host and can be
    captured in a CUDA graph. A launch over n elements consumes ``cdiv(n, 4)`` Philox counters (4 normals
    each; element e takes word e % 4 of counter + e // 4, whatever the dtype or tiling), so no draw is ever
    reused; the same seed gives the same sequence of draws.
    """

    def __init__(self, seed: int, device: torch.device | str):
        if not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        self.state = torch.tensor([int(seed), 0], dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.state.device

    def advance(self, counters: int) -> None:
        """Move the counter past ``counters`` Philox counters (in place, on the device)."""
        self.state[1:].add_(counters)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"state": int64 (2,) CPU tensor [seed, counter]} for a checkpoint (syncs: not for the step)."""
        return {"state": self.state.detach().cpu().clone()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Restore in place (the device tensor keeps its address, so captured CUDA graphs stay valid)."""
        s = state_dict["state"]
        if s.shape != (2,) or s.dtype != torch.int64:
            raise ValueError(f"NoiseStream state must be an int64 tensor of shape (2,), got {s.dtype} {tuple(s.shape)}")
        self.state.copy_(s)


@triton.jit
def _cos_sin_turn(k):
    """cos and sin of 2 pi k / 2^24 for int32 k in [0, 2^24): the quadrant from the top two bits, Taylor
    polynomials of degree 12 / 11 on [0, pi/2) for the rest (truncation below 6e-8; error against float64 over
    every k: at most 2.0e-7, fp32 rounding, tested). No range-reduction slow path, no tables, no fp64."""
    q = k >> 22
    x = (k & 0x3FFFFF).to(tl.float32) * 3.745070282923929e-07  # (pi / 2) / 2^22
    x2 = x * x
    s = x + x * x2 * (-0.16666666666666666 + x2 * (0.008333333333333333 + x2 * (
        -1.984126984126984e-04 + x2 * (2.7557319223985893e-06 + x2 * -2.505210838544172e-08))))
    c = 1.0 + x2 * (-0.5 + x2 * (0.041666666666666664 + x2 * (-1.388888888888889e-03 + x2 * (
        2.48015873015873e-05 + x2 * (-2.755731922398589e-07 + x2 * 2.08767569878681e-09)))))
    odd = (q & 1) != 0
    cos = tl.where(odd, s, c)
    sin = tl.where(odd, c, s)
    return tl.where(((q + 1) & 2) != 0, -cos, cos), tl.where((q & 2) != 0, -sin, sin)


@triton.jit
def _box_muller(i, j):
    """Two uint32 blocks -> two independent N(0, 1) fp32 blocks: radius sqrt(-2 ln u) with u = (i + 1/2) 2^-32
    in (0, 1] (so |n| <= 6.77), angle 2 pi (j >> 8) 2^-24. log2 is libdevice's (1 ulp), sqrt the hardware's."""
    u = i.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
    r = tl.sqrt(-1.3862943611198906 * tl.log2(u))  # -2 ln u = -2 ln(2) log2(u)
    cos, sin = _cos_sin_turn((j >> 8).to(tl.int32))
    return r * cos, r * sin


@triton.jit
def _normals(state_ptr, starts, R: tl.constexpr, V: tl.constexpr):
    """[R, V] standard normals in the tile's own layout: element e of the flat tensor takes output word e % 4
    of Philox counter (stream counter + e // 4), whatever the tiling (starts: the [R] first elements of the
    tile rows; V a multiple of 4)."""
    seed = tl.load(state_ptr)
    counter = tl.load(state_ptr + 1) + (starts // 4).to(tl.int64)
    col = tl.arange(0, V)[None, :]
    n = tl.zeros([R, V], dtype=tl.float32)
    for j in tl.static_range(V // 4):
        c = counter + j
        lo = (c & 0xFFFFFFFF).to(tl.uint32)
        r0, r1, r2, r3 = tl.philox(seed, lo, (c >> 32).to(tl.uint32), lo * 0, lo * 0)
        n0, n1 = _box_muller(r0, r1)
        n2, n3 = _box_muller(r2, r3)
        n = tl.where(col == 4 * j, n0[:, None], n)
        n = tl.where(col == 4 * j + 1, n1[:, None], n)
        n = tl.where(col == 4 * j + 2, n2[:, None], n)
        n = tl.where(col == 4 * j + 3, n3[:, None], n)
    return n


@triton.jit
def _langevin_kernel(x_ptr, a_ptr, b_ptr, eta_ptr, g_ptr, alpha_ptr, sigma_ptr, noise_ptr, state_ptr, gamma_ptr,
                     x_out, eta_out, v_out, xt_out, numel, row_numel, gamma, keep, root,
                     SCORE: tl.constexpr, HAS_ETA: tl.constexpr, HAS_G: tl.constexpr, HAS_NOISE: tl.constexpr,
                     GAMMA_ROW: tl.constexpr, R: tl.constexpr, V: tl.constexpr, BIG: tl.constexpr,
                     PER_ROW: tl.constexpr):
    """x' = x + gamma * (target - x) + root * n over one [R, V] tile.

    SCORE: target = sigma * delta, delta = alpha * (a - b) / sigma^2 (a, b: teacher, student denoisers),
    v = alpha * delta, and optionally eta' = keep * eta + root * n, x_t' = alpha * g + sigma * x'.
    Otherwise target = a (the z-step: a = J^T v), with per-example gamma = gamma_ptr[row] if GAMMA_ROW.
    """
    first, starts, o = tile(R, V, BIG)
    mask = o < numel
    if HAS_NOISE:
        n = tl.load(noise_ptr + o, mask=mask, other=0.0).to(tl.float32)
    else:
        n = _normals(state_ptr, starts, R, V)
    x = tl.load(x_ptr + o, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + o, mask=mask, other=0.0).to(tl.float32)
    if SCORE:
        al = load_per_row(alpha_ptr, first, starts, o, numel, row_numel, 1.0, PER_ROW)
        si = load_per_row(sigma_ptr, first, starts, o, numel, row_numel, 1.0, PER_ROW)
        delta = al * (a - tl.load(b_ptr + o, mask=mask, other=0.0).to(tl.float32)) / (si * si)
        x_new = x + gamma * (si * delta - x) + root * n
        tl.store(v_out + o, al * delta, mask=mask)
        if HAS_ETA:
            eta = tl.load(eta_ptr + o, mask=mask, other=0.0).to(tl.float32)
            tl.store(eta_out + o, keep * eta + root * n, mask=mask)
        if HAS_G:
            g = tl.load(g_ptr + o, mask=mask, other=0.0).to(tl.float32)
            tl.store(xt_out + o, al * g + si * x_new, mask=mask)
    elif GAMMA_ROW:
        gm = load_per_row(gamma_ptr, first, starts, o, numel, row_numel, 1.0, PER_ROW)
        x_new = x + gm * (a - x) + tl.sqrt(2.0 * gm) * n
    else:
        x_new = x + gamma * (a - x) + root * n
    tl.store(x_out + o, x_new, mask=mask)


def _check_noise_source(ref_name, ref, noise, stream):
    if (noise is None) == (stream is None):
        raise ValueError("pass exactly one of noise (a tensor) or stream (a NoiseStream)")
    if stream is not None and stream.device != ref.device:
        raise ValueError(f"stream is on {stream.device} but {ref_name} is on {ref.device}")


def _or(x, default):
    return default if x is None else x


def _launch(ref, cl, gamma, noise, stream, x, a, b=None, eta=None, g=None, alpha=None, sigma=None):
    """Run the kernel on flat inputs; returns (x', eta', v, x_t') shaped and typed like ref (or None).
    gamma: a float, or (N,) per-example step sizes (z step only)."""
    score = alpha is not None
    gamma_row = per_example(gamma) if isinstance(gamma, torch.Tensor) else None
    gamma = 1.0 if gamma_row is not None else gamma
    numel, row_numel = x.numel(), x.numel() // ref.shape[0]
    x_new, eta_new, v, xt = (torch.empty(numel, dtype=ref.dtype, device=ref.device) if want else None
                             for want in (True, eta is not None, score, g is not None))
    dummy = x  # stands in for absent tensors; never touched (the matching constexpr flag is off)
    tiles = tiling(numel, row_numel, *(t for t in (x, a, b, eta, g, noise) if t is not None))
    launch(_langevin_kernel, tiles.grid, (
        x, a, _or(b, dummy), _or(eta, dummy), _or(g, dummy), _or(alpha, dummy), _or(sigma, dummy),
        _or(noise, dummy), stream.state if stream is not None else dummy, _or(gamma_row, dummy),
        x_new, _or(eta_new, dummy), _or(v, dummy), _or(xt, dummy),
        numel, row_numel, float(gamma), float(1 - gamma), math.sqrt(2 * gamma)),
        dict(SCORE=score, HAS_ETA=eta is not None, HAS_G=g is not None, HAS_NOISE=noise is not None,
             GAMMA_ROW=gamma_row is not None, **tiles.constexprs()), NUM_WARPS)
    if stream is not None:
        stream.advance(triton.cdiv(numel, 4))
    return tuple(None if out is None else unflat(out, ref.shape, cl) for out in (x_new, eta_new, v, xt))


def langevin_eps_step(eps, eta, d_teacher, d_student, alpha, sigma, gamma, noise=None, g=None, stream=None):
    """One fused Langevin step on eps with noise book-keeping (the math of ``ops.langevin_eps_step``).

    eps, eta, d_teacher, d_student, noise, g: (N, ...) fp32/bf16/fp16 on one device; alpha, sigma: (N,);
    gamma: float > 0. eta None: no book-keeping (eta' None); g None: no x_t' output. Noise: exactly one of
    ``noise`` (N, ...) or ``stream`` (a NoiseStream, drawn in the kernel).
    Returns (eps', eta', v, x_t'), each (N, ...) in eps.dtype (layout of eps if channels_last, else contiguous).
    """
    check_inputs("eps", eps, eta=eta, d_teacher=d_teacher, d_student=d_student, noise=noise, g=g)
    check_per_example("eps", eps, alpha=alpha, sigma=sigma)
    check_gamma("gamma_eps", gamma)
    _check_noise_source("eps", eps, noise, stream)
    cl = is_channels_last(eps)
    return _launch(eps, cl, gamma, flat(noise, cl), stream, flat(eps, cl), flat(d_teacher, cl), flat(d_student, cl),
                   flat(eta, cl), flat(g, cl), per_example(alpha), per_example(sigma))


def langevin_z_step(z, jtv, gamma, noise=None, stream=None):
    """One fused Langevin step on the latent: z' = z + gamma * (jtv - z) + sqrt(2 gamma) * noise.

    z, jtv (= J_g(z)^T v), noise: (N, ...) on one device; gamma: float > 0, or per-example step sizes (N,)
    (values not checked: no host sync); exactly one of ``noise`` or ``stream``. Returns z' (N, ...) in z.dtype.
    """
    check_inputs("z", z, jtv=jtv, noise=noise)
    if isinstance(gamma, torch.Tensor):
        check_per_example("z", z, gamma=gamma)
    else:
        check_gamma("gamma_z", gamma)
    _check_noise_source("z", z, noise, stream)
    cl = is_channels_last(z)
    return _launch(z, cl, gamma, flat(noise, cl), stream, flat(z, cl), flat(jtv, cl))[0]
