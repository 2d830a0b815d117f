"""Batched token sampling with per-row parameters: pure functions, no host sync inside.

Each row b of the logits is processed in this order (the contract):

  1. logit_bias          l[t] += bias[t]
  2. grammar mask        l[t] = -inf where allowed_mask[b, t] is False
  3. repetition penalty  HF semantics, tokens seen in prompt or output: l / r if l > 0 else l * r
  4. presence/frequency  OpenAI semantics: l[t] -= frequency * count[t] + presence * (count[t] > 0),
                         counting the OUTPUT tokens only
  5. temperature         T == 0: greedy, the token is argmax of (4); else l / T
  6. top_k               keep l >= the k-th largest value (all ties at the boundary are kept)
  7. top_p               keep the most likely tokens until their mass reaches p: token t is kept
                         iff the mass of tokens strictly more likely than t is < p (ties kept)
  8. min_p               keep p(t) >= min_p * max p (computed as l >= max l + log min_p)
  9. sample              inverse CDF of softmax(l): one uniform u per row, the token is the
                         first whose cumulative probability exceeds u. u comes from the row's
                         own torch.Generator when it has one (exactly one draw per step), so a
                         seeded request draws the same tokens whatever else is in the batch.
                         One number per row, rather than V (exponential race / Gumbel noise),
                         keeps seeded rows cheap: a CPU generator costs no device kernel at all.

Reported log-probabilities are log_softmax of the logits after steps 1, 3 and 4: the model's
distribution with the request's bias and penalties, before temperature, truncation and the
grammar mask (so a grammar does not renormalise what the model believed; OpenAI likewise reports
the model's distribution, not the sampling one).

Which steps run is decided once per batch on the host (`SamplingTensors` flags), so a batch in
which no row uses, say, penalties pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mistralpy.params import SamplingParams


@dataclass
class SamplingTensors:
    """Per-row sampling parameters of a batch of B rows over a vocabulary of V tokens."""

    temperatures: torch.Tensor  # (B,) float32; greedy rows hold 1.0 so nothing divides by 0
    greedy: torch.Tensor  # (B,) bool: temperature == 0
    top_k: torch.Tensor  # (B,) int64 in [1, V]; V where disabled
    top_p: torch.Tensor  # (B,) float32 in (0, 1]
    min_p: torch.Tensor  # (B,) float32 in [0, 1]
    presence_penalties: torch.Tensor  # (B,) float32
    frequency_penalties: torch.Tensor  # (B,) float32
    repetition_penalties: torch.Tensor  # (B,) float32
    output_counts: torch.Tensor | None  # (B, V) float32 occurrences in the output; None: unused
    seen_mask: torch.Tensor | None  # (B, V) bool: in prompt or output; None: no repetition penalty
    bias_rows: torch.Tensor | None  # (N,) int64 row of each logit-bias entry; None: no bias
    bias_ids: torch.Tensor | None  # (N,) int64 token of each entry
    bias_values: torch.Tensor | None  # (N,) float32 value added
    # Host-side flags, decided once per batch.
    all_greedy: bool
    any_greedy: bool
    max_top_k: int  # largest enabled top_k (0: no row uses top_k)
    use_top_p: bool
    use_min_p: bool
    need_logprobs: bool  # some row wants logprobs
    num_top_logprobs: int  # max top_logprobs over rows (0: none)

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingTensors:
        """Gather B rows of parameters (and token histories for penalties) into tensors.

        prompt_ids / output_ids are only read when some row uses a penalty that needs them.
        Token ids in logit_bias must be < vocab_size (`SamplingParams.check_vocab`).
        """
        assert len(params) == len(prompt_ids) == len(output_ids)

        def floats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        top_ks = [p.top_k if p.top_k > 0 else vocab_size for p in params]
        top_ks = [min(k, vocab_size) for k in top_ks]
        enabled_ks = [k for k in top_ks if k < vocab_size]
        use_freq = any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params)
        use_rep = any(p.repetition_penalty != 1.0 for p in params)
        seen = [list(a) + list(b) for a, b in zip(prompt_ids, output_ids)] if use_rep else None
        return cls(
            temperatures=floats([p.temperature if not p.greedy else 1.0 for p in params]),
            greedy=torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device),
            top_k=torch.tensor(top_ks, dtype=torch.int64, device=device),
            top_p=floats([p.top_p for p in params]),
            min_p=floats([p.min_p for p in params]),
            presence_penalties=floats([p.presence_penalty for p in params]),
            frequency_penalties=floats([p.frequency_penalty for p in params]),
            repetition_penalties=floats([p.repetition_penalty for p in params]),
            output_counts=_token_counts(output_ids, vocab_size, device) if use_freq else None,
            seen_mask=_token_counts(seen, vocab_size, device) > 0 if seen is not None else None,
            **_sparse_bias(params, vocab_size, device),
            all_greedy=all(p.greedy for p in params),
            any_greedy=any(p.greedy for p in params),
            max_top_k=max(enabled_ks, default=0),
            use_top_p=any(p.top_p < 1.0 for p in params),
            use_min_p=any(p.min_p > 0.0 for p in params),
            need_logprobs=any(p.logprobs or p.top_logprobs > 0 for p in params),
            num_top_logprobs=max((p.top_logprobs for p in params), default=0),
        )


@dataclass
class SamplerOutput:
    """What `sample` chose for each of the B rows."""

    token_ids: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor | None  # (B,) float32 log-prob of the chosen token; None: none asked
    top_logprob_ids: torch.Tensor | None  # (B, K) int64, K = max top_logprobs, most likely first
    top_logprob_values: torch.Tensor | None  # (B, K) float32


def _token_counts(
    rows: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str
) -> torch.Tensor:
    """(B, V) float32 number of occurrences of each token in each row's list."""
    width = max((len(r) for r in rows), default=0)
    # Pad with an extra column V that is dropped afterwards, so padding counts nowhere.
    padded = [list(r) + [vocab_size] * (width - len(r)) for r in rows]
    ids = torch.tensor(padded, dtype=torch.int64, device=device).reshape(len(rows), width)
    counts = torch.zeros(len(rows), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def _sparse_bias(
    params: Sequence[SamplingParams], vocab_size: int, device: torch.device | str
) -> dict[str, torch.Tensor | None]:
    """The logit_bias entries of all rows as (row, token, value) triples, or Nones if none."""
    entries = [(row, t, v) for row, p in enumerate(params) for t, v in p.logit_bias.items()]
    if not entries:
        return {"bias_rows": None, "bias_ids": None, "bias_values": None}
    assert all(t < vocab_size for _, t, _ in entries), "logit_bias not checked against vocab"
    rows, ids, values = zip(*entries)
    return {
        "bias_rows": torch.tensor(rows, dtype=torch.int64, device=device),
        "bias_ids": torch.tensor(ids, dtype=torch.int64, device=device),
        "bias_values": torch.tensor(values, dtype=torch.float32, device=device),
    }


def apply_penalties(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Steps 1, 3, 4 (bias, repetition, presence/frequency) on a copy; (B, V) float32."""
    logits = logits.clone()
    if st.bias_rows is not None:
        logits.index_put_((st.bias_rows, st.bias_ids), st.bias_values, accumulate=True)
    if st.seen_mask is not None:
        r = st.repetition_penalties[:, None]
        penalised = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(st.seen_mask, penalised, logits)
    if st.output_counts is not None:
        counts = st.output_counts
        logits -= st.frequency_penalties[:, None] * counts
        logits -= st.presence_penalties[:, None] * (counts > 0).to(logits.dtype)
    return logits


def truncation_threshold(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """(B, 1) float32 smallest logit kept by top_k, top_p and min_p (steps 6-8); -inf: all.

    `logits` (B, V) float32 are already temperature-scaled.
    """
    neg_inf = torch.full_like(logits[:, :1], float("-inf"))
    threshold = neg_inf
    if st.use_top_p:
        sorted_logits = logits.sort(dim=-1, descending=True).values
        if st.max_top_k:
            kth = sorted_logits.gather(1, st.top_k[:, None] - 1)
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
            threshold = kth
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        num_kept = (mass_before < st.top_p[:, None]).sum(dim=-1, keepdim=True).clamp_min(1)
        top_p_threshold = sorted_logits.gather(1, num_kept - 1)
        # top_p == 1 keeps everything; the float32 cumsum could otherwise cut a tiny tail.
        top_p_threshold = torch.where(st.top_p[:, None] >= 1.0, neg_inf, top_p_threshold)
        threshold = torch.maximum(threshold, top_p_threshold)
    elif st.max_top_k:
        top_values = logits.topk(st.max_top_k, dim=-1).values
        kth = top_values.gather(1, st.top_k.clamp(max=st.max_top_k)[:, None] - 1)
        threshold = torch.where(st.top_k[:, None] > st.max_top_k, neg_inf, kth)
    if st.use_min_p:
        max_logit = logits.max(dim=-1, keepdim=True).values
        threshold = torch.maximum(threshold, max_logit + st.min_p[:, None].log())
    return threshold


def uniform_per_row(
    generators: Sequence[torch.Generator | None], device: torch.device | str
) -> torch.Tensor:
    """(B,) float32 uniforms in [0, 1): row b from generators[b] if set, else the default one.

    Each seeded row draws exactly one number per call from its own generator (CPU or device),
    so its samples depend only on its seed and its step, never on the rest of the batch.
    """
    batch = len(generators)
    if any(g is None for g in generators):
        u = torch.rand(batch, dtype=torch.float32, device=device)
    else:
        u = torch.empty(batch, dtype=torch.float32, device=device)
    seeded = [row for row, g in enumerate(generators) if g is not None]
    if seeded:
        draws = [torch.rand(1, generator=generators[row], device=generators[row].device)
                 for row in seeded]  # fmt: skip
        if all(d.device == draws[0].device for d in draws):  # usual case: one copy, not B
            u[seeded] = torch.cat(draws).to(device, non_blocking=True)
        else:
            u[seeded] = torch.cat([d.to(device) for d in draws])
    return u


def sample_from_logits(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B,) int64 draws from softmax(logits (B, V)) by inverse CDF at uniforms u (B,).

    Tokens with probability 0 (logit -inf) are never chosen: their CDF step is empty.
    """
    probs = logits.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = u[:, None] * cdf[:, -1:]
    ids = torch.searchsorted(cdf, target, right=True).clamp_(max=logits.shape[1] - 1)
    # Rounding can push the target past the last non-empty step; fall back to the mode there.
    chosen_prob = probs.gather(1, ids)
    return torch.where(chosen_prob > 0, ids, probs.argmax(dim=-1, keepdim=True)).squeeze(1)


def sample(
    logits: torch.Tensor,
    st: SamplingTensors,
    generators: Sequence[torch.Generator | None],
    allowed_mask: torch.Tensor | None = None,
) -> SamplerOutput:
    """Pick one token per row of `logits` (B, V) float32 (not modified).

    generators: B entries, each None (the default generator of the logits' device) or a
                torch.Generator on the CPU or on the logits' device.
    allowed_mask: (B, V) bool, False = forbidden by a grammar; None: no row has a grammar.
    """
    batch, vocab_size = logits.shape
    assert len(generators) == batch
    logits = apply_penalties(logits.float(), st)
    raw_logprobs = logits.log_softmax(dim=-1) if st.need_logprobs else None
    if allowed_mask is not None:
        logits = logits.masked_fill_(~allowed_mask, float("-inf"))
    token_ids = _choose(logits, st, generators)
    return _with_logprobs(token_ids, raw_logprobs, st)


def _choose(
    logits: torch.Tensor, st: SamplingTensors, generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """(B,) int64 tokens from penalised, masked logits (B, V): steps 5-9."""
    greedy_ids = logits.argmax(dim=-1) if st.any_greedy else None
    if st.all_greedy:
        return greedy_ids
    scaled = logits / st.temperatures[:, None]
    if st.max_top_k or st.use_top_p or st.use_min_p:
        threshold = truncation_threshold(scaled, st)
        scaled = scaled.masked_fill_(scaled < threshold, float("-inf"))
    sampled_ids = sample_from_logits(scaled, uniform_per_row(generators, logits.device))
    if greedy_ids is None:
        return sampled_ids
    return torch.where(st.greedy, greedy_ids, sampled_ids)


def _with_logprobs(
    token_ids: torch.Tensor, raw_logprobs: torch.Tensor | None, st: SamplingTensors
) -> SamplerOutput:
    """Attach the chosen tokens' log-probs and the top-K alternatives when any row asked."""
    if raw_logprobs is None:
        return SamplerOutput(token_ids, None, None, None)
    chosen = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
    if st.num_top_logprobs == 0:
        return SamplerOutput(token_ids, chosen, None, None)
    top = raw_logprobs.topk(st.num_top_logprobs, dim=-1)
    return SamplerOutput(token_ids, chosen, top.indices, top.values)
