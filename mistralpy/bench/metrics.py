"""Per-request timings of a load run and their summary, shared by the engine-level and the
HTTP benchmark so both report the same figures under the same names.

Names and definitions follow vLLM's benchmark_serving: TTFT (request sent → first token),
TPOT ((E2E − TTFT) / (output tokens − 1), per request), ITL (gap between consecutive token
deliveries, per token), E2E latency; throughputs over the wall time of the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestResult:
    """What one request measured; times in seconds from the moment it was sent."""

    prompt_tokens: int  # as the server/engine counted them (usage), else as we asked
    output_tokens: int  # real tokens (usage.completion_tokens), not chunks
    ttft_s: float | None  # None: no token arrived (failed or empty)
    e2e_s: float
    itl_s: list[float] = field(default_factory=list)  # one per token after the first delivery
    error: str | None = None  # set when the request failed; its figures are left out
    counted: bool = True  # False: the server sent no usage, output_tokens counts chunks
    cached_tokens: int = 0  # prompt tokens the prefix cache served (0 when unreported)

    @property
    def ok(self) -> bool:
        return self.error is None


def spread_itl(times: list[float], tokens_per_delivery: list[float]) -> list[float]:
    """Inter-token latencies from delivery times (monotonic seconds) and the tokens each
    delivery carried: a gap before a delivery of k tokens counts as k gaps of gap / k, so a
    chunk carrying 2 tokens gives two half-gaps, not one long "token" (fractional k, an
    average over the request, gives one sample of gap / k)."""
    out: list[float] = []
    for i in range(1, len(times)):
        k = tokens_per_delivery[i]
        gap = (times[i] - times[i - 1]) / k if k > 0 else times[i] - times[i - 1]
        out.extend([gap] * (int(k) if k >= 1 and float(k).is_integer() else 1))
    return out


def percentile(values: list[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _stats_ms(prefix: str, values_s: list[float]) -> dict[str, float]:
    ms = [v * 1e3 for v in values_s]
    return {
        f"{prefix}_ms_mean": _mean(ms),
        f"{prefix}_ms_p50": percentile(ms, 50),
        f"{prefix}_ms_p99": percentile(ms, 99),
    }


def tpot_s(r: RequestResult) -> float | None:
    """Mean time per output token after the first; None below 2 tokens."""
    if r.ttft_s is None or r.output_tokens < 2:
        return None
    return (r.e2e_s - r.ttft_s) / (r.output_tokens - 1)


def summarize(results: list[RequestResult], wall_s: float) -> dict[str, float | int]:
    """The run's figures: counts, throughputs over `wall_s`, and TTFT / TPOT / ITL / E2E
    latency mean, p50 and p99 in milliseconds over the successful requests."""
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    tpots = [t for t in map(tpot_s, done) if t is not None]
    summary: dict[str, float | int] = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "wall_s": wall_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(done) / wall_s if wall_s > 0 else 0.0,
        "output_tok_per_s": out_tokens / wall_s if wall_s > 0 else 0.0,
        "total_tok_per_s": (in_tokens + out_tokens) / wall_s if wall_s > 0 else 0.0,
        "chunk_counted": sum(not r.counted for r in done),  # should be 0: see RequestResult
        "cached_prompt_tokens": sum(r.cached_tokens for r in done),  # fresh prompts: 0
    }
    summary.update(_stats_ms("ttft", [r.ttft_s for r in done if r.ttft_s is not None]))
    summary.update(_stats_ms("tpot", tpots))
    summary.update(_stats_ms("itl", [g for r in done for g in r.itl_s]))
    summary.update(_stats_ms("e2e", [r.e2e_s for r in done]))
    return summary


def first_errors(results: list[RequestResult], limit: int = 3) -> list[str]:
    """A few distinct error messages, for the report (all failures look alike usually)."""
    seen: list[str] = []
    for r in results:
        if r.error is not None and r.error not in seen:
            seen.append(r.error)
    return seen[:limit]
