"""Ahead-of-time compile check of the Triton kernels: what the compiler makes of every launch the wrappers make.

    python benchmarks/aot_check.py                     # the CI set, sm_80 and sm_90: table; exit 1 if a check fails
    python benchmarks/aot_check.py --all               # every option combination of every wrapper, + 2^31 elements
    python benchmarks/aot_check.py --all --arch 90 --out aot.txt

No GPU is needed: the launches come from the public wrappers of ``emd_fast.kernels`` themselves, called on ``meta``
tensors inside ``kernels._common.recording_launches()`` (a new kernel, flag or launch rule in a wrapper is covered
as soon as the wrapper makes it), and each distinct launch is compiled with ``triton.compile`` for
``GPUTarget("cuda", arch, 32)``, specialised as the JIT specialises a real launch (Triton's own
``native_specialize_impl``: 16-byte aligned pointers, sizes divisible by 16), with the ptxas of the Triton wheel.
The cubin is read with the wheel's ``cuobjdump`` (registers, stack frame, SASS); the vector width comes from the PTX
(each global access is traced back to the kernel parameter its address is computed from). The compiler needs the
kernels as JIT functions: the script unsets TRITON_INTERPRET, and ``test_aot_check.py`` runs it as one child
process (under the interpreter triton.language is patched, and triton 3.9 leaves some of those patches behind).

Checks, for every launch and arch:
- it compiles; no stack frame, no local memory, no spill instruction (LDL/STL);
- no fp64 instruction in the SASS;
- every load and store of a per-element tensor (numel elements) is 128 bits wide;
- at least 8 blocks fit on one SM by registers (65,536 per SM, allocated per warp in units of 256) and by shared
  memory (164 KiB on sm_80, 228 KiB on sm_90, 1 KiB reserved per block).
Table columns: regs (per thread), stack (bytes), spill (LDL/STL count), smem (bytes, Triton's launch request), sass
(instructions, NOPs excluded), vec (narrowest per-element access, bits), other (global accesses not to a
per-element tensor: per-row scalars, noise state, constant tables), f64 (fp64 instructions), blk/SM.

Another Triton version (the GPU machines pin triton 3.6): make a venv with it and run the same command there, e.g.
    python -m venv v36 && v36/bin/pip install torch==2.13.0 triton==3.6.0 -e . && v36/bin/python benchmarks/aot_check.py
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __name__ == "__main__":  # the compiler needs the kernels as JIT functions, not as the interpreter's
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, native_specialize_impl  # noqa: E402

from emd_fast.kernels import langevin, losses  # noqa: E402
from emd_fast.kernels._common import Launch, recording_launches  # noqa: E402

ARCHS = (80, 90)
SHAPES = {"4096x64": (4096, 64), "128x3x128x128": (128, 3, 128, 128)}
BIG_SHAPES = {"32768x65536": (32768, 65536)}  # 2^31 elements: int64 offsets (--all only)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_BLOCKS_PER_SM = 8
REGS_PER_SM = 65536
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
F64_OP = re.compile(r"^(D(ADD|MUL|FMA|SETP|MNMX|SET)\b|\S*\.F64\b|MUFU\.\w+64H)")


# ---- the launches, from the wrappers ---------------------------------------------------------------------------

def wrapper_calls(shape, dtype, full: bool):
    """(name, call) pairs: each call runs one public wrapper on meta tensors (losses: forward and backward).
    full: every combination of the optional inputs; else (the CI set) the calls training makes: the eps step with
    eta and g, in-kernel noise or a noise tensor, the z step with per-example gamma, both losses."""
    def t():
        return torch.empty(shape, dtype=dtype, device="meta")

    def ex():
        return torch.empty(shape[0], device="meta")

    def eps_step(eta, g, stream):
        return lambda: langevin.langevin_eps_step(
            t(), t() if eta else None, t(), t(), ex(), ex(), 0.1, g=t() if g else None,
            **({"stream": langevin.NoiseStream(0, "meta")} if stream else {"noise": t()}))

    def z_step(per_example, stream):
        return lambda: langevin.langevin_z_step(
            t(), t(), ex() if per_example else 0.1,
            **({"stream": langevin.NoiseStream(0, "meta")} if stream else {"noise": t()}))

    def loss(fn, *args):
        def call():
            inp = t().requires_grad_(True)
            torch.autograd.grad(fn(inp, *args), inp)
        return call

    calls = {}
    for eta, g, stream in itertools.product((True, False), repeat=3):
        if full or (eta and g):
            calls[f"eps_step(eta={eta:d},g={g:d},stream={stream:d})"] = eps_step(eta, g, stream)
    for per_example, stream in itertools.product((True, False), repeat=2):
        if full or (per_example and stream):
            calls[f"z_step(per_example_gamma={per_example:d},stream={stream:d})"] = z_step(per_example, stream)
    calls["generator_loss(eta=1)"] = loss(losses.generator_loss, t(), t(), ex(), ex(), ex())
    if full:
        calls["generator_loss(eta=0)"] = loss(losses.generator_loss, t(), None, ex(), ex(), ex())
    calls["dsm_loss"] = loss(losses.dsm_loss, t(), ex())
    return calls


@dataclass
class Variant:
    """One distinct compilation: a kernel with its specialised signature, constexprs and num_warps."""
    kernel: object  # the wrapper's triton.jit function
    signature: dict
    constexprs: dict
    attrs: dict
    num_warps: int
    per_element: frozenset  # names of the pointer parameters to tensors of numel elements
    dtype: str
    calls: list = field(default_factory=list)  # (shape name, call name) that launch it

    @property
    def key(self):
        return (self.kernel.fn.__name__, tuple(self.signature.items()), tuple(sorted(self.constexprs.items())),
                self.num_warps)

    @property
    def id(self) -> str:
        """Names this variant alike in every process (the test compiles in a child process)."""
        return f"{self.name}-{self.dtype}-{hashlib.sha1(repr(self.key).encode()).hexdigest()[:8]}"

    @property
    def name(self):
        flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items()
                         if not (isinstance(v, bool) and not v) and v is not None)
        return f"{self.kernel.fn.__name__.strip('_')}[{flags}]"


def variant_of(launch: Launch, numel: int, dtype: str) -> Variant:
    """The launch specialised as the JIT would specialise it."""
    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", ARCHS[-1], 32))
    runtime = iter(launch.args)
    signature, constexprs, attrs, per_element = {}, {}, {}, set()
    for i, name in enumerate(kernel.arg_names):
        if name in launch.constexprs:
            signature[name], constexprs[name] = "constexpr", launch.constexprs[name]
            continue
        value = next(runtime)
        ty, attr = native_specialize_impl(backend, value, False, True, True)
        signature[name] = ty
        if ty == "constexpr":  # an int equal to 1
            constexprs[name] = attr
        elif isinstance(attr, str) and attr:
            attrs[(i,)] = backend.parse_attr(attr)
        if isinstance(value, torch.Tensor) and value.numel() == numel:
            per_element.add(name)
    return Variant(kernel, signature, constexprs, attrs, launch.num_warps, frozenset(per_element), dtype)


def variants(full: bool = False) -> list[Variant]:
    """Every distinct launch the wrappers make for the calls (full: all of them, and at BIG_SHAPES too), shapes
    and dtypes, in first-seen order."""
    found = {}
    shapes = SHAPES | (BIG_SHAPES if full else {})
    for (shape_name, shape), (dtype_name, dtype) in itertools.product(shapes.items(), DTYPES.items()):
        numel = torch.Size(shape).numel()
        for call_name, call in wrapper_calls(shape, dtype, full).items():
            with recording_launches() as launches:
                call()
            for launch in launches:
                v = variant_of(launch, numel, dtype_name)
                found.setdefault(v.key, v).calls.append((shape_name, call_name))
    return list(found.values())


# ---- compile and read what came out -------------------------------------------------------------------------

@dataclass
class Compiled:
    regs: int
    stack: int
    local: int
    spills: int
    shared: int
    sass: int
    vec: int  # narrowest per-element global access, bits
    other: int  # global accesses not to a per-element tensor
    f64: int
    blocks_per_sm: int
    f64_ops: list

    def failures(self) -> list[str]:
        out = []
        if self.stack or self.local or self.spills:
            out.append(f"stack {self.stack} B, local {self.local} B, {self.spills} spill instructions")
        if self.f64:
            out.append(f"{self.f64} fp64 instructions ({', '.join(sorted(set(self.f64_ops)))})")
        if self.vec != 128:
            out.append(f"per-element loads/stores of {self.vec} bits (want 128)")
        if self.blocks_per_sm < MIN_BLOCKS_PER_SM:
            out.append(f"{self.blocks_per_sm} blocks per SM (regs {self.regs}, smem {self.shared} B; "
                       f"want >= {MIN_BLOCKS_PER_SM})")
        return out


_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)\s+(.*);")
_REG = re.compile(r"%[a-z]+\d+")


def global_accesses(ptx: str) -> list[tuple[int, set[int]]]:
    """(bits, kernel parameter indices its address derives from) of every ld/st.global in the PTX."""
    origin: dict[str, set[int]] = {}
    lines = [re.sub(r"^@!?%p\d+\s+", "", ln.split("//")[0].strip()) for ln in ptx.splitlines()]
    accesses = []
    for sweep in range(2):  # a second sweep settles registers assigned after their first use (loops)
        accesses = []
        for ln in lines:
            if m := re.search(r"ld\.param\.\w+\s+(%\w+),\s*\[\w+_param_(\d+)\]", ln):
                origin[m.group(1)] = {int(m.group(2))}
            elif m := _ACCESS.search(ln):
                ops = m.group(2).split(".")
                vec = next((int(o[1:]) for o in ops if re.fullmatch(r"v\d", o)), 1)
                bits = next(int(o[1:]) for o in reversed(ops) if re.fullmatch(r"[bfsu]\d+", o))
                addr = re.search(r"\[([^\]]*)\]", m.group(3)).group(1)
                accesses.append((vec * bits, set().union(*(origin.get(r, set()) for r in _REG.findall(addr)))))
            elif regs := _REG.findall(ln):
                dst, *src = regs
                origin.setdefault(dst, set()).update(*(origin.get(r, set()) for r in src))
    return accesses


def _blocks_per_sm(regs: int, shared: int, num_warps: int, arch: int) -> int:
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = REGS_PER_SM // (per_warp * num_warps)
    by_smem = SMEM_PER_SM[arch] // (shared + 1024) if shared else 32
    return min(by_regs, by_smem, 64 // num_warps, 32)


_COMPILED: dict[tuple, Compiled] = {}


def compile_variant(v: Variant, arch: int) -> Compiled:
    """Compile (once per process) and read the cubin and PTX."""
    if (v.key, arch) not in _COMPILED:
        _COMPILED[v.key, arch] = _compile(v, arch)
    return _COMPILED[v.key, arch]


def read_dump(dump: str) -> tuple[dict[str, int], list[str]]:
    """({REG, STACK, LOCAL}, SASS opcodes without NOPs) of ``cuobjdump -res-usage -sass`` output."""
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", dump)}
    ops = [op for op in re.findall(r"^\s*/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", dump, re.M)
           if op != "NOP"]
    return usage, ops


def _compile(v: Variant, arch: int) -> Compiled:
    if not isinstance(v.kernel, JITFunction):
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET=1 when they were imported): run "
                           "aot_check.py in a process without it")
    kernel = triton.compile(ASTSource(v.kernel, v.signature, v.constexprs, v.attrs),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": v.num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        dump = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    usage, ops = read_dump(dump)
    f64_ops = [op for op in ops if F64_OP.match(op)]
    runtime_params = [n for n, ty in v.signature.items() if ty != "constexpr"]
    element_params = {i for i, n in enumerate(runtime_params) if n in v.per_element}
    accesses = global_accesses(kernel.asm["ptx"])
    element = [bits for bits, params in accesses if params & element_params]
    regs, shared = usage["REG"], kernel.metadata.shared
    return Compiled(regs=regs, stack=usage["STACK"], local=usage["LOCAL"],
                    spills=sum(op.startswith(("LDL", "STL")) for op in ops), shared=shared, sass=len(ops),
                    vec=min(element, default=0), other=len(accesses) - len(element), f64=len(f64_ops),
                    blocks_per_sm=_blocks_per_sm(regs, shared, v.num_warps, arch), f64_ops=f64_ops)


# ---- report ----------------------------------------------------------------------------------------------------

COLUMNS = ("regs", "stack", "spills", "shared", "sass", "vec", "other", "f64", "blocks_per_sm")


def table(rows: list[tuple[Variant, int, Compiled]]) -> str:
    head = ["kernel", "dtype", "sm", "regs", "stack", "spill", "smem", "sass", "vec", "other", "f64", "blk/SM",
            "launched by"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, arch, c in rows:
        shapes = sorted({s for s, _ in v.calls})
        calls = sorted({n for _, n in v.calls})
        by = f"{' '.join(shapes)}: {calls[0]}" + (f" +{len(calls) - 1}" if len(calls) > 1 else "")
        lines.append("| " + " | ".join([v.name, v.dtype, str(arch), *(str(getattr(c, k)) for k in COLUMNS), by])
                     + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--all", action="store_true", help="every option combination of every wrapper (slower)")
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--out", type=Path, help="also write the table here")
    p.add_argument("--json", type=Path, help="also write every row (figures, failures) here")
    args = p.parse_args(argv)
    rows, failed = [], []
    for v in variants(full=args.all):
        for arch in args.arch:
            c = compile_variant(v, arch)
            rows.append((v, arch, c))
            failed += [f"{v.name} {v.dtype} sm_{arch}: {f}" for f in c.failures()]
    text = (f"triton {triton.__version__}, SASS from cuobjdump, vector widths from PTX; "
            f"{len(rows)} compilations\n\n{table(rows)}\n")
    text += "\nall checks pass\n" if not failed else "\nFAILED:\n" + "\n".join(failed) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "rows": [
            {"id": f"{v.id}-sm{arch}", "calls": v.calls, **asdict(c), "failures": c.failures()}
            for v, arch, c in rows]}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
