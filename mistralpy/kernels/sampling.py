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

from array import array
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
        top_ks = [min(p.top_k if p.top_k > 0 else vocab_size, vocab_size) for p in params]
        # All per-row scalars cross to the device in one (8, B) float32 copy (top_k <= V < 2^24
        # is exact in float32).
        rows = _to_device(
            torch.tensor(
                [
                    [1.0 if p.greedy else p.temperature for p in params],
                    [float(p.greedy) for p in params],
                    top_ks,
                    [p.top_p for p in params],
                    [p.min_p for p in params],
                    [p.presence_penalty for p in params],
                    [p.frequency_penalty for p in params],
                    [p.repetition_penalty for p in params],
                ],
                dtype=torch.float32,
            ),
            device,
        )
        use_freq = any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params)
        use_rep = any(p.repetition_penalty != 1.0 for p in params)
        outputs = [(ids,) for ids in output_ids]
        seen = list(zip(prompt_ids, output_ids)) if use_rep else None
        return cls(
            temperatures=rows[0],
            greedy=rows[1] > 0,
            top_k=rows[2].long(),
            top_p=rows[3],
            min_p=rows[4],
            presence_penalties=rows[5],
            frequency_penalties=rows[6],
            repetition_penalties=rows[7],
            output_counts=_token_counts(outputs, vocab_size, device) if use_freq else None,
            seen_mask=_token_counts(seen, vocab_size, device) > 0 if seen is not None else None,
            **_sparse_bias(params, device),
            all_greedy=all(p.greedy for p in params),
            any_greedy=any(p.greedy for p in params),
            max_top_k=max((k for k in top_ks if k < vocab_size), default=0),
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
    rows: Sequence[Sequence[Sequence[int]]], vocab_size: int, device: torch.device | str
) -> torch.Tensor:
    """(B, V) float32 occurrences of each token in the id lists of each row (rows[b] = lists).

    Histories can be long (prompt + output for every row, every step), so ids go to a tensor
    through `array` buffers (several times faster than torch.tensor of Python lists).
    """
    chunks, lengths = [], []
    for lists in rows:
        chunks += [torch.frombuffer(array("q", ids), dtype=torch.int64) for ids in lists if ids]
        lengths.append(sum(len(ids) for ids in lists))
    counts = torch.zeros(len(rows) * vocab_size, dtype=torch.float32, device=device)
    if chunks:
        row_of = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(lengths))
        flat = _to_device(row_of * vocab_size + torch.cat(chunks), device)
        counts.index_add_(0, flat, torch.ones(flat.shape, dtype=torch.float32, device=device))
    return counts.view(len(rows), vocab_size)


def _sparse_bias(
    params: Sequence[SamplingParams], device: torch.device | str
) -> dict[str, torch.Tensor | None]:
    """The logit_bias entries of all rows as (row, token, value) triples, or Nones if none.

    Token ids must be < vocab_size (`SamplingParams.check_vocab`, run when a request is added).
    """
    entries = [(row, t, v) for row, p in enumerate(params) for t, v in p.logit_bias.items()]
    if not entries:
        return {"bias_rows": None, "bias_ids": None, "bias_values": None}
    rows, ids, values = zip(*entries)
    index = _to_device(torch.tensor([rows, ids], dtype=torch.int64), device)
    return {
        "bias_rows": index[0],
        "bias_ids": index[1],
        "bias_values": _to_device(torch.tensor(values, dtype=torch.float32), device),
    }


def _to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a CPU tensor to `device` without a host sync (pinned staging for CUDA).

    A copy from pageable memory is synchronous: it would wait for the forward pass queued
    ahead of it. The caching host allocator keeps the pinned block alive until the copy ends.
    """
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def apply_penalties(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Steps 1, 3, 4 (bias, repetition, presence/frequency) on a copy; (B, V) float32."""
    logits = logits.clone()
    if st.bias_rows is not None:
        assert st.bias_ids is not None and st.bias_values is not None  # set together
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

    Each seeded row draws exactly one number per call from its own generator, so its samples
    depend only on its seed and its step, never on the rest of the batch. CPU generators cost
    no device kernel (one pinned copy for all of them); device generators one tiny kernel each.
    """
    batch = len(generators)
    u = torch.rand(batch, dtype=torch.float32, device=device)
    on_host = [row for row, g in enumerate(generators) if g is not None and g.device.type == "cpu"]
    if on_host:
        draws = torch.cat([torch.rand(1, generator=generators[row]) for row in on_host])
        # Rows and draws in one float64 tensor (both exact), so one copy crosses to the device.
        packed = _to_device(torch.stack([torch.tensor(on_host).double(), draws.double()]), device)
        u = u.index_copy(0, packed[0].long(), packed[1].float())
    for row, g in enumerate(generators):
        if g is not None and g.device.type != "cpu":
            u[row : row + 1] = torch.rand(1, generator=g, device=g.device)
    return u


def sample_from_logits(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B,) int64 draws from softmax(logits (B, V)) by inverse CDF at uniforms u (B,).

    Tokens with probability 0 (logit -inf) are never chosen: their CDF step is empty.
    """
    return sample_from_probs(logits.softmax(dim=-1), u)


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B,) int64 draws from the rows of `probs` (B, V), each summing to > 0 (not necessarily
    1), by inverse CDF at uniforms u (B,); zero-probability tokens are never chosen."""
    cdf = probs.cumsum(dim=-1)
    target = u[:, None] * cdf[:, -1:]
    ids = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[1] - 1)
    # Rounding can push the target past the last non-empty step; fall back to the mode there.
    chosen_prob = probs.gather(1, ids)
    return torch.where(chosen_prob > 0, ids, probs.argmax(dim=-1, keepdim=True)).squeeze(1)


def sample(
    logits: torch.Tensor,
    st: SamplingTensors,
    generators: Sequence[torch.Generator | None],
    allowed_mask: torch.Tensor | None = None,
    mask_rows: torch.Tensor | None = None,
) -> SamplerOutput:
    """Pick one token per row of `logits` (B, V) float32 (not modified).

    generators: B entries, each None (the default generator of the logits' device) or a
                torch.Generator on the CPU or on the logits' device.
    allowed_mask: (B, V) bool, False = forbidden by a grammar; None: no row has a grammar.
                  With `mask_rows` (G,) int64: (G, V), the masks of those rows only (the
                  other rows have no grammar and are not touched).
    """
    batch, vocab_size = logits.shape
    assert len(generators) == batch
    logits = apply_penalties(logits.float(), st)
    raw_logprobs = logits.log_softmax(dim=-1) if st.need_logprobs else None
    if allowed_mask is not None and mask_rows is None:
        logits = logits.masked_fill_(~allowed_mask, float("-inf"))
    elif allowed_mask is not None:
        logits[mask_rows] = logits[mask_rows].masked_fill_(~allowed_mask, float("-inf"))
    token_ids = _choose(logits, st, generators)
    return _with_logprobs(token_ids, raw_logprobs, st)


def _choose(
    logits: torch.Tensor, st: SamplingTensors, generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """(B,) int64 tokens from penalised, masked logits (B, V): steps 5-9."""
    if st.all_greedy:
        return logits.argmax(dim=-1)
    greedy_ids = logits.argmax(dim=-1) if st.any_greedy else None
    scaled = _scaled_truncated(logits, st)
    sampled_ids = sample_from_logits(scaled, uniform_per_row(generators, logits.device))
    if greedy_ids is None:
        return sampled_ids
    return torch.where(st.greedy, greedy_ids, sampled_ids)


def _scaled_truncated(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Steps 5-8 for sampling rows: logits / T with the truncated tokens at -inf (B, V)."""
    scaled = logits / st.temperatures[:, None]
    if st.max_top_k or st.use_top_p or st.use_min_p:
        threshold = truncation_threshold(scaled, st)
        scaled = scaled.masked_fill_(scaled < threshold, float("-inf"))
    return scaled


def target_probs(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """(B, V) float32: the distribution `sample` draws each row's token from, given penalised,
    masked logits (B, V): steps 5-8, greedy rows one-hot at their argmax."""
    greedy = None
    if st.any_greedy:
        greedy = torch.zeros_like(logits).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        if st.all_greedy:
            return greedy
    probs = _scaled_truncated(logits, st).softmax(dim=-1)
    return probs if greedy is None else torch.where(st.greedy[:, None], greedy, probs)


def verify_drafts(
    logits: torch.Tensor,
    st: SamplingTensors,
    generator: torch.Generator | None,
    draft_ids: torch.Tensor,
    allowed_mask: torch.Tensor | None = None,
) -> tuple[SamplerOutput, int]:
    """Speculative decoding's acceptance rule for one sequence with K drafted tokens.

    logits: (K + 1, V) float32, row i predicting the token after draft i - 1 (row 0: after
    the last accepted token); st: K + 1 rows (row i's penalties count drafts [:i] as output);
    draft_ids: (K,) int64 from a deterministic drafter (q one-hot); allowed_mask: (K + 1, V).
    Draft i is accepted with probability min(1, p_i(x) / q_i(x)) = p_i(x); at the first
    rejection the token is drawn from norm(max(0, p_i - q_i)) (p_i without x); when all K
    pass, a bonus token is drawn from p_K. The emitted tokens are then distributed exactly as
    K + 1 tokens sampled one by one from the target (greedy rows: the longest prefix equal to
    the argmax, then the argmax). Returns (rows with each row's token, accepted count n): the
    emitted tokens are rows [0, n] of token_ids (draft_ids[:n], then the correction/bonus).
    """
    k = draft_ids.shape[0]
    assert logits.shape[0] == k + 1 and draft_ids.dtype == torch.int64
    logits = apply_penalties(logits.float(), st)
    raw_logprobs = logits.log_softmax(dim=-1) if st.need_logprobs else None
    if allowed_mask is not None:
        logits = logits.masked_fill_(~allowed_mask, float("-inf"))
    probs = target_probs(logits, st)
    rows = torch.arange(k, device=logits.device)
    p_draft = probs[rows, draft_ids]
    residual = probs.clone()
    residual[rows, draft_ids] = 0.0  # max(0, p - q) with q one-hot at the draft
    # p one-hot at the draft leaves nothing, but then the draft is always accepted
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, probs)
    if st.all_greedy:  # no draws: u = 0.5 decides exactly between p(x) = 0 and p(x) = 1
        u = torch.full((2 * k + 1,), 0.5, device=logits.device)
    else:
        u = uniform_per_row([generator] * (2 * k + 1), logits.device)
    accepted = u[:k] < p_draft
    num_accepted = int(accepted.long().cumprod(dim=0).sum()) if k else 0
    fallback = sample_from_probs(residual, u[k:])
    positions = torch.arange(k + 1, device=logits.device)
    padded = torch.cat([draft_ids, draft_ids.new_zeros(1)])
    token_ids = torch.where(positions < num_accepted, padded, fallback)
    return _with_logprobs(token_ids, raw_logprobs, st), num_accepted


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
