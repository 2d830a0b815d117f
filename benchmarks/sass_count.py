"""Instruction counts of the q4k GEMV kernels, compiled for sm_90 without a GPU.

    PYTHONPATH=. python benchmarks/sass_count.py

Triton compiles to a cubin with its bundled ptxas on any machine; cuobjdump (bundled too)
disassembles it. The main loop's SASS instructions per weight tell, before any device run,
whether a kernel can stream at the H100's bandwidth: at 2.96 TB/s and 0.5625 bytes per
q4_K weight, the 132 SMs issue about 5.6 warp-lane instructions per weight at most, so a
kernel near that is instruction-bound. Pointer arguments are compiled as 16-byte aligned and
N, K and the strides as multiples of 16, as Triton specializes them at a real launch.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mistralpy.kernels import triton_quant as tq

_ALIGNED_INTS = ("N", "K", "stride_xm", "stride_ym")
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)([^;]*);")


def _tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} (this Triton build has no CUDA toolchain)")
    return path


def compile_sm90(fn, signature: dict[str, str], constexprs: dict, num_warps: int):
    """triton.compile for an H100 target; signature maps argument names to Triton types."""
    sig = dict(signature, **{name: "constexpr" for name in constexprs})
    aligned = [
        i for i, (name, ty) in enumerate(sig.items()) if ty.startswith("*") or name in _ALIGNED_INTS
    ]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def main_loop_sass(cubin: bytes, scratch: str = "/tmp/mistralpy_sass.cubin") -> list[str]:
    """Opcodes of the longest backward-branch loop in the cubin's SASS."""
    with open(scratch, "wb") as f:
        f.write(cubin)
    sass = subprocess.run(
        [_tool("cuobjdump"), "-sass", scratch], capture_output=True, text=True, check=True
    ).stdout
    lines = [(int(a, 16), op, rest) for a, op, rest in _SASS_LINE.findall(sass)]
    loops = []
    for addr, op, rest in lines:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    if not loops:
        return []
    lo, hi = max(loops, key=lambda span: span[1] - span[0])
    return [op for addr, op, _ in lines if lo <= addr <= hi]


DP4A_SIGNATURE = {
    "x_ptr": "*bf16", "xq_ptr": "*i32", "xs_ptr": "*fp32", "wi_ptr": "*i32", "y_ptr": "*bf16",
    "ws_ptr": "*fp32", "cnt_ptr": "*i32", "N": "i32", "K": "i32", "stride_xm": "i32",
    "stride_ym": "i32", "split_blocks": "i32",
}  # fmt: skip


def _per_weight(compiled, bn: int, bb: int, warps: int) -> tuple[float, collections.Counter]:
    ops = main_loop_sass(compiled.asm["cubin"])
    weights_per_lane = bn * bb * 256 / (32 * warps)  # one loop step
    return len(ops) / weights_per_lane, collections.Counter(op.split(".")[0] for op in ops)


def dp4a_instructions_per_weight(tq_config=(16, 1, 1), x_inline: bool = False) -> float:
    """Main-loop SASS instructions per weight of `_q4k_gemv_dp4a_kernel` (bn, bb, warps)."""
    bn, bb, warps = tq_config
    const = {"BN": bn, "BB": bb, "PARTIAL": False, "STAGES": 1, "X_INLINE": x_inline,
             "ASM": True}  # fmt: skip
    compiled = compile_sm90(tq._q4k_gemv_dp4a_kernel, DP4A_SIGNATURE, const, warps)
    return _per_weight(compiled, bn, bb, warps)[0]


def main() -> None:
    for bn, bb, warps in ((8, 1, 1), (16, 1, 1), (32, 1, 2), (16, 2, 1)):
        for inline in (False, True):
            const = {"BN": bn, "BB": bb, "PARTIAL": False, "STAGES": 1, "X_INLINE": inline,
                     "ASM": True}  # fmt: skip
            compiled = compile_sm90(tq._q4k_gemv_dp4a_kernel, DP4A_SIGNATURE, const, warps)
            per_weight, ops = _per_weight(compiled, bn, bb, warps)
            print(f"GEMV x_inline={inline!s:5} bn={bn:<3} bb={bb} "
                  f"warps={warps}: {per_weight:.2f} instr/weight "
                  f"{dict(ops.most_common(8))}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
