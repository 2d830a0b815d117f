"""The fp8-KV attention kernels compile for sm_90 (Triton's own ptxas, no GPU needed).

The CPU interpreter runs the kernels' Python, not Triton's code generator: it lets through what
only a compile catches (a non-constexpr global, an fp8 conversion with no lowering). Compiled
in a fresh process without TRITON_INTERPRET (other test modules set it). Also compares the
decode main loop's SASS with the bf16 cache's: e4m3 loads widen in registers, which must stay
a small share of the loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import collections, json
from benchmarks.sass_count import compile_sm90, main_loop_sass
from mistralpy.kernels import triton_attention as ta

def kv(fp8):
    return "*fp8e4nv" if fp8 else "*bf16"

def decode(fp8, single):
    names = ["q_ptr", "kc_ptr", "vc_ptr", "bt_ptr", "seq_lens_ptr", "out_ptr", "part_out_ptr",
             "part_lse_ptr", "arrivals_ptr", "kv_scale_ptr", "qk_scale", "num_splits", "stride_qb",
             "stride_qh", "stride_ob", "stride_oh", "stride_c_blk", "stride_c_row", "stride_c_h",
             "stride_bt_b"]
    types = ["*bf16", kv(fp8), kv(fp8), "*i32", "*i32", "*bf16", "*fp32", "*fp32", "*i32",
             "*fp32", "fp32"] + ["i32"] * 9
    cx = dict(GROUP=4, GROUP_PAD=16, GROUP_P2=4, HEAD_DIM=128, PAGE=16, BLOCK_N=64,
              MERGE_CHUNK=8, SINGLE_SPLIT=single, F32_DOT=False, FP8=fp8)
    return compile_sm90(ta._decode_split_kernel, dict(zip(names, types)), cx, 4)

def store(fp8):
    names = ["k_ptr", "v_ptr", "kc_ptr", "vc_ptr", "slot_ptr", "stride_kt", "stride_vt",
             "stride_c_blk", "stride_c_row", "kv_scale_ptr"]
    types = ["*bf16", "*bf16", kv(fp8), kv(fp8), "*i64", "i32", "i32", "i32", "i32", "*fp32"]
    cx = dict(PAGE=16, ROW=1024, ROW_PAD=1024, FP8=fp8)
    return compile_sm90(ta._store_kv_kernel, dict(zip(names, types)), cx, 4)

def rope_store(fp8):
    names = ["q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "kc_ptr", "vc_ptr", "slot_ptr",
             "kv_scale_ptr", "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt",
             "stride_vh", "stride_ct", "stride_st", "stride_c_blk", "stride_c_row", "stride_c_h"]
    types = ["*bf16"] * 5 + [kv(fp8), kv(fp8), "*i64", "*fp32"] + ["i32"] * 11
    cx = dict(PAGE=16, HQ=32, HK=8, HQ_PAD=32, HK_PAD=8, D=128, FP8=fp8)
    return compile_sm90(ta._rope_store_kv_kernel, dict(zip(names, types)), cx, 4)

def prefill(fp8):
    names = ["q_ptr", "k_ptr", "v_ptr", "out_ptr", "qsl_ptr", "seq_lens_ptr", "bt_ptr",
             "kv_scale_ptr", "qk_scale", "stride_qt", "stride_qh", "stride_ot", "stride_oh",
             "stride_k_blk", "stride_k_row", "stride_k_h", "stride_v_blk", "stride_v_row",
             "stride_v_h", "stride_bt_b"]
    types = ["*bf16", kv(fp8), kv(fp8), "*bf16", "*i32", "*i32", "*i32", "*fp32", "fp32"]
    cx = dict(GROUP=4, HEAD_DIM=128, PAGE=16, BLOCK_M=64, BLOCK_N=64, PAGED=True, CAUSAL=True,
              F32_DOT=False, FP8=fp8)
    return compile_sm90(ta._flash_kernel, dict(zip(names, types + ["i32"] * 11)), cx, 4)

def loop(compiled):
    ops = main_loop_sass(compiled.asm["cubin"])
    return {"ops": len(ops), "loads": sum(o.startswith("LDG") for o in ops)}

out = {"store": bool(store(True).asm["cubin"]), "prefill": loop(prefill(True)),
       "rope_store": all(rope_store(f).asm["cubin"] for f in (False, True)),
       "split": bool(decode(True, False).asm["cubin"]),
       "decode_fp8": loop(decode(True, True)), "decode_bf16": loop(decode(False, True))}
print("RESULT " + json.dumps(out))
"""


def test_fp8_kernels_compile_for_hopper():
    from benchmarks.sass_count import _tool

    try:
        _tool("ptxas")
    except FileNotFoundError as e:  # a Triton build without the CUDA toolchain
        pytest.skip(str(e))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default, without 3.9's warning
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, res.stdout[-3000:] + res.stderr[-6000:]
    out = json.loads(line.removeprefix("RESULT "))
    assert out["store"] and out["rope_store"] and out["split"] and out["prefill"]["ops"] > 0
    fp8, bf16 = out["decode_fp8"], out["decode_bf16"]
    # e4m3 -> bf16 widening (unpack + convert) adds ~6% of the bf16 loop; loads never grow
    assert fp8["loads"] <= bf16["loads"], out
    assert fp8["ops"] <= 1.15 * bf16["ops"], out
