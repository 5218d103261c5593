"""``aot_check.py`` in CI: every launch the wrappers make (the CI set: see ``aot_check.wrapper_calls``) compiles for
sm_80 and sm_90 without a GPU, with no stack frame or spill, no fp64 instruction, 128-bit per-element loads and
stores, and at least 8 blocks per SM; and the checker itself reads the compiler's output right.

The compilations run once, in one child process without TRITON_INTERPRET (this process has the interpreter's
patched triton.language); the launches are listed here from the wrappers too, and each must have its result."""
import json
import os
import subprocess
import sys

import pytest
import torch

from emd_fast.kernels import langevin
from emd_fast.kernels._common import recording_launches

import aot_check

VARIANTS = aot_check.variants()  # recorded from the wrappers on meta tensors: nothing is compiled or run here


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """aot_check.py's rows by id: the CI set for every arch."""
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, aot_check.__file__, "--json", str(out)], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
    return {row["id"]: row for row in json.loads(out.read_text())["rows"]}


@pytest.mark.parametrize("arch", aot_check.ARCHS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v.name}-{v.dtype}")
def test_launch_compiles_lean(variant, arch, compiled):
    row = compiled[f"{variant.id}-sm{arch}"]
    assert not row["failures"], f"{variant.name} {variant.dtype} sm_{arch} ({variant.calls[0]}): " \
                                f"{'; '.join(row['failures'])}"


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
        out = langevin.langevin_z_step(z, z, 0.1, stream=langevin.NoiseStream(0, "meta"))
    assert out.device.type == "meta" and len(launches) == 1 and launches[0].grid == (512,)
    assert {"HAS_NOISE": False, "V": 4, "R": 128}.items() <= launches[0].constexprs.items()


SASS = """
 Function _k:
  REG:40 STACK:32 SHARED:0 LOCAL:8 CONSTANT[0]:600
        /*0000*/                   LDC R1, c[0x0][0x28] ;                /* 0x00000a00ff017b82 */
        /*0010*/                   LDG.E.128 R4, desc[UR6][R2.64] ;      /* 0x0000000602047981 */
        /*0020*/               @P0 DMUL R8, R6, R8 ;                     /* 0x0000000806087228 */
        /*0030*/                   F2F.F64.F32 R10, R4 ;                 /* 0x000000040a0a7310 */
        /*0040*/                   STL [R1], R4 ;                        /* 0x0000000401007387 */
        /*0050*/                   NOP ;                                 /* 0x0000000000007918 */
"""


def test_sass_is_read_and_judged():
    usage, ops = aot_check.read_dump(SASS)
    assert usage == {"REG": 40, "STACK": 32, "LOCAL": 8}
    assert ops == ["LDC", "LDG.E.128", "DMUL", "F2F.F64.F32", "STL"]
    assert [op for op in ops if aot_check.F64_OP.match(op)] == ["DMUL", "F2F.F64.F32"]
    bad = aot_check.Compiled(regs=72, stack=32, local=8, spills=1, shared=2048, sass=5, vec=64, other=3, f64=2,
                             blocks_per_sm=aot_check._blocks_per_sm(72, 2048, 4, 90), f64_ops=["DMUL", "F2F.F64.F32"])
    failures = bad.failures()
    assert len(failures) == 4 and "7 blocks per SM" in failures[3] and "64 bits (want 128)" in failures[2]
    assert aot_check._blocks_per_sm(64, 0, 4, 90) == 8 and aot_check._blocks_per_sm(32, 0, 4, 80) == 16


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
