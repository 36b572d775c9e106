"""Compile the SGLD kernel for a GPU architecture on a machine without one, and read ptxas's verdict.

Why: the interpreter runs the kernels' arithmetic but not Triton's compiler, so it misses what only a
GPU build checks (``tl.dot`` shapes, types, layouts) and says nothing of register pressure. Triton
ships ptxas, and compiling for an explicit target queries no driver, so CI without a GPU can still
build the real kernel and see its registers and spills:

    python -m fastllc.kernels.aot 53 8 32 64 --orthogonal   # the published workload

Run it where Triton's kernels are compiled (TRITON_INTERPRET unset).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import mlp_sgld

_POINTERS = {"w_ptr": "*fp32", "star_ptr": "*fp32", "dir_ptr": "*fp32", "coefficients_ptr": "*fp32", "ops_ptr": "*i64",
             "tgt_ptr": "*i64", "idx_ptr": "*i64", "noise_ptr": "*fp32", "trace_ptr": "*fp32", "moves_ptr": "*i8"}
_SCALARS = {"seed": "i64", "n": "i32", "chains_per_start": "i32", "total_steps": "i32", "t0": "i32", "n_steps": "i32"}


def ptxas_report(p: int, e: int, h: int, m: int, *, injected: bool = False, orthogonal: bool = False,
                 published: bool = False, restricted: bool = False, num_warps: int | None = None,
                 capability: int = 90) -> dict:
    """Compile ``_sgld_kernel`` for sm_``capability``: registers, spill bytes and shared memory per program."""
    if mlp_sgld.INTERPRETED:
        raise RuntimeError("the kernels were defined under TRITON_INTERPRET=1: nothing to compile")
    P, M = mlp_sgld.padded(p), mlp_sgld.padded(m)
    num_warps = num_warps or mlp_sgld.default_num_warps(P, M)
    constants = dict(p=p, e=e, h=h, m=m, P=P, EB=mlp_sgld.padded(e), H=mlp_sgld.padded(h), M=M,
                     **mlp_sgld.layout_constants(p, e, h),
                     INJECTED=injected, ORTHOGONAL=orthogonal, PUBLISHED=published, RESTRICTED=restricted)
    signature = {**_POINTERS, **_SCALARS, **{name: "constexpr" for name in constants}}
    log = io.StringIO()
    knobs = triton.knobs
    before = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log = knobs.compilation.always_compile = True  # a cache hit would skip ptxas
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(mlp_sgld._sgld_kernel, signature, constexprs=constants),
                                      target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = before
    text = log.getvalue()
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    return dict(registers=int(registers.group(1)) if registers else None,
                spill_store_bytes=int(spills.group(1)) if spills else None,
                shared_bytes=compiled.metadata.shared, num_warps=num_warps, log=text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("p", "e", "h", "m"):
        parser.add_argument(name, type=int)
    parser.add_argument("--injected", action="store_true")
    parser.add_argument("--orthogonal", action="store_true")
    parser.add_argument("--published", action="store_true", help="the published chain loss −log(p_y + 1e-6)")
    parser.add_argument("--restricted", action="store_true", help="a per-chain weight mask (restrict=)")
    parser.add_argument("--num-warps", type=int, default=None)
    parser.add_argument("--capability", type=int, default=90)
    args = parser.parse_args()
    report = ptxas_report(args.p, args.e, args.h, args.m, injected=args.injected, orthogonal=args.orthogonal,
                          published=args.published, restricted=args.restricted,
                          num_warps=args.num_warps, capability=args.capability)
    print({k: v for k, v in report.items() if k != "log"})


if __name__ == "__main__":
    main()
