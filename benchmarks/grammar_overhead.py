"""Per-token cost of grammar-constrained decoding (json_schema via llguidance) in the engine.

Runs decode steps of LLMEngine on a random demo checkpoint (CPU by default) for batches with
0, some or all rows constrained, and prints ms per step (= ms per token of each row, as every
row gains one token a step) and the overhead against the same batch without grammars. The
mixed batch (half the rows constrained) shows what unconstrained rows pay for sharing a step
with constrained ones. It also times the grammar masks themselves: `mask` is the time to
compute a step's bitmask on the worker thread, `wait` the part of it the step still waited
for after the forward pass (the rest was hidden behind the forward).

    python benchmarks/grammar_overhead.py [--preset tiny|small] [--steps 64] [--threads N] [--json out.json]

The schema asks for a long array of small objects (strings, integers, enums, booleans), so no
row finishes inside the measured steps and every step computes a real JSON mask.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 10_000,  # never satisfied within the run: the grammar never ends
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 16},
                    "count": {"type": "integer", "minimum": 0, "maximum": 10_000},
                    "kind": {"enum": ["alpha", "beta", "gamma"]},
                    "ok": {"type": "boolean"},
                },
                "required": ["name", "count", "kind", "ok"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}
CASES = [(1, 0), (1, 1), (16, 0), (16, 8), (16, 16)]  # (batch size, rows with a grammar)


@dataclass
class Row:
    """One line of the result table."""

    batch: int
    constrained: int
    ms_per_step: float  # median wall time of one decode step
    overhead_pct: float  # vs the same batch with no grammar
    cpu_ms_per_step: float  # median process CPU time of one step (all threads)
    cpu_overhead_pct: float
    mask_ms: float  # median bitmask computation per step (worker thread); 0 without grammar
    wait_ms: float  # median time the step blocked on the mask after the forward


class TimedMasker:
    """Wraps the runner's GrammarMasker: records compute time and the time spent waiting."""

    def __init__(self, masker):
        self.masker = masker
        self.compute_s: list[float] = []
        self.wait_s: list[float] = []

    def submit(self, matchers):
        def timed():
            start = time.perf_counter()
            out = self.masker.compute(matchers)
            self.compute_s.append(time.perf_counter() - start)
            return out

        return _TimedFuture(self.masker._worker.submit(timed), self.wait_s)

    def compute(self, matchers):
        return self.masker.compute(matchers)

    def close(self) -> None:
        self.masker.close()


class _TimedFuture:
    def __init__(self, future, waits: list[float]):
        self.future, self.waits = future, waits

    def result(self):
        start = time.perf_counter()
        out = self.future.result()
        self.waits.append(time.perf_counter() - start)
        return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="demo checkpoint preset: tiny | small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per case")
    p.add_argument("--repeats", type=int, default=2, help="runs per case (median of all steps)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return p.parse_args()


def build_engine(preset: str, device: str, steps: int):
    from mistralpy.engine.config import EngineConfig
    from mistralpy.engine.engine import LLMEngine
    from mistralpy.testing.tiny_checkpoint import ensure_demo_checkpoint

    path = ensure_demo_checkpoint(preset)
    cfg = EngineConfig(
        model=str(path),
        device=device,
        dtype="float32" if device == "cpu" else "auto",
        max_model_len=512,
        max_num_seqs=16,
        num_kv_blocks=16 * (512 // 16),
        enable_prefix_caching=False,
    )
    assert steps + 40 < cfg.max_model_len
    return LLMEngine.from_config(cfg)


def run_case(
    engine, batch: int, constrained: int, steps: int, seed: int
) -> tuple[list[float], list[float]]:
    """Wall and process-CPU times (s) of `steps` decode steps after the prefill, all rows alive.

    CPU time counts every thread of this process (the mask worker too) and not other
    processes, so it stays meaningful on a shared machine where wall time is noisy."""
    from types import SimpleNamespace

    from mistralpy.params import GrammarSpec, SamplingParams

    rng = random.Random(seed)
    grammar = GrammarSpec("json_schema", SCHEMA)
    for row in range(batch):
        prompt = SimpleNamespace(
            token_ids=[1] + [rng.randrange(1000, 100_000) for _ in range(24)], images=[]
        )
        params = SamplingParams(
            max_tokens=steps + 8,
            temperature=1.0,
            seed=rng.randrange(2**31),
            ignore_eos=True,
            grammar=grammar if row < constrained else None,
        )
        engine.add_request(f"r{seed}-{row}", prompt, params)
    engine.step()  # prefill + first token
    wall, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        outs = engine.step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        assert len(outs) == batch and not any(o.finished for o in outs), "a row finished early"
    engine.abort_all()
    while engine.has_unfinished_requests():
        engine.step()
    return wall, cpu


def ensure_timed_masker(engine):
    """Create the runner's masker (as its first grammar step would) wrapped for timing."""
    from mistralpy.processing.grammar import GrammarMasker

    runner = engine.runner
    if not isinstance(runner._masker, TimedMasker):
        runner._masker = TimedMasker(runner._masker or GrammarMasker(runner.vocab_size))
    return runner._masker


def make_row(case, wall, cpu, masks) -> Row:
    """Medians of one case; overheads against the unconstrained case of the same batch."""
    batch, constrained = case

    def med(values: list[float]) -> float:
        return statistics.median(values) * 1e3 if values else 0.0

    base_wall, base_cpu = med(wall[(batch, 0)]), med(cpu[(batch, 0)])
    ms, cpu_ms = med(wall[case]), med(cpu[case])
    return Row(
        batch,
        constrained,
        ms,
        100 * (ms / base_wall - 1),
        cpu_ms,
        100 * (cpu_ms / base_cpu - 1),
        med(masks[case][0]),
        med(masks[case][1]),
    )


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    engine = build_engine(args.preset, args.device, args.steps)
    timed = ensure_timed_masker(engine)
    run_case(engine, 16, 8, 8, seed=0)  # warm-up: grammar compile caches, allocator, threads
    wall: dict[tuple[int, int], list[float]] = {case: [] for case in CASES}
    cpu: dict[tuple[int, int], list[float]] = {case: [] for case in CASES}
    masks: dict[tuple[int, int], tuple[list[float], list[float]]] = {c: ([], []) for c in CASES}
    for r in range(args.repeats):  # cases interleaved, so load drift hits all of them alike
        for case in CASES:
            timed.compute_s.clear()
            timed.wait_s.clear()
            w, c = run_case(engine, *case, args.steps, seed=1 + r)
            wall[case] += w
            cpu[case] += c
            masks[case][0].extend(timed.compute_s)
            masks[case][1].extend(timed.wait_s)
    rows = [make_row(case, wall, cpu, masks) for case in CASES]
    print(
        f"grammar overhead: preset={args.preset} device={args.device} steps={args.steps}x"
        f"{args.repeats} torch_threads={torch.get_num_threads()}"
    )
    print(
        f"{'batch':>5} {'json rows':>9} {'ms/step':>8} {'overhead':>9} {'cpu ms':>8} "
        f"{'cpu ovh':>8} {'mask ms':>8} {'wait ms':>8}"
    )
    for r in rows:
        print(
            f"{r.batch:>5} {r.constrained:>9} {r.ms_per_step:>8.2f} {r.overhead_pct:>8.1f}% "
            f"{r.cpu_ms_per_step:>8.2f} {r.cpu_overhead_pct:>7.1f}% {r.mask_ms:>8.2f} "
            f"{r.wait_ms:>8.2f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    timed.close()


if __name__ == "__main__":
    main()
