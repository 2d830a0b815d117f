"""bf16 skinny GEMM: F.linear(x, W) vs (W @ x.T).T at 24B shapes, M = 1, 2, 4, 8 (H100)."""
import torch, torch.nn.functional as F, triton.testing as tt
shapes = {"qkv": (6144, 5120), "o": (5120, 4096), "gate_up": (65536, 5120), "down": (5120, 32768)}
for name, (n, k) in shapes.items():
    copies = max(1, -(-(256 << 20) // (n * k * 2)))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    for m in (1, 2, 4, 8):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        a = tt.do_bench_cudagraph(lambda: [F.linear(x, w) for w in ws], rep=50) / copies
        b = tt.do_bench_cudagraph(lambda: [torch.mm(w, x.t()).t() for w in ws], rep=50) / copies
        err = (F.linear(x, ws[0]).float() - torch.mm(ws[0], x.t()).t().float()).abs().max().item()
        print(f"SKINNY {name} M={m}: F.linear {a*1e3:.1f} us  W@x.T {b*1e3:.1f} us  ({n*k*2/a/1e6:.0f} vs {n*k*2/b/1e6:.0f} GB/s) maxdiff {err:.2e}", flush=True)
