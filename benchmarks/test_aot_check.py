"""``aot_check.py`` in CI: every launch the wrappers make (the CI set: see ``aot_check.wrapper_calls``) compiles for
sm_80 and sm_90 without a GPU, with no stack frame or spill, no fp64 instruction, 128-bit per-element loads and
stores, and at least 8 blocks per SM; and the checker itself catches what it is there to catch."""
import pytest
import torch
import triton
import triton.language as tl

import aot_check
from emd_fast import kernels
from emd_fast.kernels._common import Launch, recording_launches

VARIANTS = aot_check.variants()  # recorded from the wrappers on meta tensors: nothing is compiled or run here


@pytest.mark.parametrize("arch", aot_check.ARCHS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v.name}-{v.dtype}")
def test_launch_compiles_lean(variant, arch):
    compiled = aot_check.compile_variant(variant, arch)  # once per (variant, arch) in the run
    assert not compiled.failures(), f"{variant.name} {variant.dtype} sm_{arch} ({variant.calls[0]}): " \
                                    f"{'; '.join(compiled.failures())}"


def test_variants_come_from_the_wrappers():
    """Every kernel and flag the wrappers use shows up, and recording runs nothing (meta tensors in and out)."""
    names = {v.kernel.fn.__name__ for v in VARIANTS}
    assert names == {"_langevin_kernel", "_loss_fwd_kernel", "_loss_bwd_kernel"}
    assert {v.dtype for v in VARIANTS} == set(aot_check.DTYPES)
    flags = {(k, v.constexprs[k]) for v in VARIANTS for k in ("HAS_NOISE", "GAMMA_ROW", "SNR", "PER_ROW")
             if k in v.constexprs}
    assert {("HAS_NOISE", True), ("HAS_NOISE", False), ("GAMMA_ROW", True), ("SNR", True), ("SNR", False),
            ("PER_ROW", 0), ("PER_ROW", 1)} <= flags
    z = torch.empty(4096, 64, device="meta")
    with recording_launches() as launches:
        out = kernels.langevin_z_step(z, z, 0.1, stream=kernels.NoiseStream(0, "meta"))
    assert out.device.type == "meta" and len(launches) == 1 and launches[0].grid == (512,)
    assert {"HAS_NOISE": False, "V": 4, "R": 128}.items() <= launches[0].constexprs.items()


@triton.jit
def _wasteful_kernel(x_ptr, y_ptr, numel, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + o, mask=o < numel)
    tl.store(y_ptr + o, tl.cos(x.to(tl.float64)).to(tl.float32), mask=o < numel)


def test_checks_catch_fp64_and_narrow_accesses():
    """A kernel in fp64 over an odd size (masks not a multiple of 4: scalar accesses) fails the checks."""
    x = torch.empty(1001, device="meta")
    launch = Launch(_wasteful_kernel, (1,), (x, x, 1001), {"BLOCK": 1024}, 4)
    failures = aot_check.compile_variant(aot_check.variant_of(launch, 1001, "fp32"), 90).failures()
    assert any("fp64" in f for f in failures) and any("32 bits (want 128)" in f for f in failures), failures


def test_ptx_accesses_are_traced_to_their_parameters():
    ptx = """
    ld.param.b64 %rd1, [k_param_0];
    ld.param.b64 %rd2, [k_param_1];
    ld.param.b32 %r1, [k_param_2];
    mul.wide.s32 %rd3, %r1, 4;
    add.s64 %rd4, %rd1, %rd3;
    @%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd4 + 0 ];
    add.s64 %rd5, %rd2, %rd3;
    @%p1 st.global.v2.b32 [ %rd5 + 0 ], { %r2, %r3 };
    ld.global.nc.b32 %r6, [%rd9];
    """
    assert aot_check.global_accesses(ptx) == [(128, {0, 2}), (64, {1, 2}), (32, set())]
