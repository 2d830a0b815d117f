"""Why ISQ greedy agreement is low on the random `small` preset: logit gaps vs quantization noise.

    PYTHONPATH=. python benchmarks/isq_quality_floor.py [--formats q8_0,q6k,q4k] [--prompts 3]

Builds the float32 `small` checkpoint (random weights, real vocabulary) in a temp dir, runs
random-token prompts through the float model and each ISQ model (one prefill each), and prints per
format: top-1 agreement with the float model, the RMS logit error (also as a share of the logits'
spread), and the share of positions whose float top-1/top-2 gap is below twice that error. Then
the control: the float model with Gaussian noise added to each quantized weight, of the same RMS
as that format's quantization error (no quantizer involved). If the control agrees as often as
the quantized model, the shortfall comes from the model's flat logits, not from the quantizer.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mistralpy.checkpoint.loader import load_model  # noqa: E402
from mistralpy.quant.isq import QuantizedLinear  # noqa: E402
from mistralpy.testing.probes import prefill_logits  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="q8_0,q6k,q4k")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "small"
        cmd = [sys.executable, "-m", "mistralpy.testing.tiny_checkpoint", str(path),
               "--preset", "small", "--dtype", "float32"]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
        g = torch.Generator().manual_seed(args.seed)
        prompts = [torch.randint(1000, 131072, (args.tokens,), generator=g).tolist()
                   for _ in range(args.prompts)]  # fmt: skip
        ref = torch.cat(
            [prefill_logits(load_model(path, torch.float32, "cpu"), p) for p in prompts]
        )
        top2 = ref.topk(2, -1).values
        gap = top2[:, 0] - top2[:, 1]
        print(f"float: logit std over the vocabulary {ref.std(-1).mean():.3f}; top-1/top-2 gap "
              f"median {gap.median():.4f}, mean {gap.mean():.4f} ({len(gap)} positions)")  # fmt: skip
        for fmt in args.formats.split(","):
            quant = load_model(path, torch.float32, "cpu", isq=fmt)
            out = torch.cat([prefill_logits(quant, p) for p in prompts])
            rms = (out - ref).pow(2).mean().sqrt()
            agree = (out.argmax(-1) == ref.argmax(-1)).float().mean()
            noisy = load_model(path, torch.float32, "cpu")
            with torch.no_grad():
                for name, mod in quant.named_modules():
                    if isinstance(mod, QuantizedLinear):
                        w = noisy.get_submodule(name).weight
                        err_rms = (mod.dequantized_weight() - w).pow(2).mean().sqrt()
                        w.add_(torch.randn(w.shape, generator=g) * err_rms)
            control = torch.cat([prefill_logits(noisy, p) for p in prompts])
            agree_noise = (control.argmax(-1) == ref.argmax(-1)).float().mean()
            print(f"{fmt}: agreement {agree:.3f}; logit error rms {rms:.4f} "
                  f"({rms / ref.std():.1%} of the logit spread); positions with gap < 2 x rms "
                  f"{(gap < 2 * rms).float().mean():.3f}; control (float + Gaussian weight "
                  f"noise of {fmt}'s RMS error) agreement {agree_noise:.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
