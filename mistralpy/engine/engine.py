"""LLMEngine (synchronous step loop) and AsyncEngine (background thread + asyncio streams).

One `step()`: schedule -> build the runner batch -> run the model -> mark tokens computed ->
append sampled tokens, detokenize incrementally, apply stop strings / stop tokens / EOS /
max_tokens / context limit -> one RequestOutput per user request that changed.

A user request with n > 1 is n sequences sharing the prompt (see `request.py`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import random
import threading
from collections import OrderedDict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistralpy.engine.block_manager import BlockManager
from mistralpy.engine.config import EngineConfig, resolve_model_path
from mistralpy.engine.errors import (
    DuplicateRequestError,
    EmptyPromptError,
    EngineDeadError,
    PromptTooLongError,
    RequestFailedError,
)
from mistralpy.engine.scheduler import Scheduler, SchedulerOutput
from mistralpy.engine.sequence import (
    CompletionOutput,
    RequestMetrics,
    RequestOutput,
    Sequence,
    SequenceStatus,
    TokenLogprob,
    now,
)
from mistralpy.engine.speculative import (
    SHADOW_AFTER_MISSES,
    Drafter,
    Speculation,
    draft_pause,
)
from mistralpy.engine.stop import StopChecker
from mistralpy.engine.stream import OutputStream
from mistralpy.params import GrammarSpec, InvalidParameter, SamplingParams
from mistralpy.processing.tokenizer import IncrementalDetokenizer, Tokenizer
from mistralpy.runner.batch import ImageSlice, SampleSpec, ScheduledBatch, SeqWork
from mistralpy.runner.errors import RunnerDeadError
from mistralpy.runner.kv_cache import KVCacheTooSmallError
from mistralpy.runner.model_runner import (
    ModelOutput,
    ModelRunner,
    RunnerConfig,
    SampledToken,
    resolve_device,
    resolve_dtype,
)

if TYPE_CHECKING:
    import torch

    from mistralpy.engine.draft_model import DraftModelDrafter
    from mistralpy.processing.chat_template import ProcessedPrompt
    from mistralpy.processing.grammar import CompiledGrammar, GrammarMatcher

logger = logging.getLogger(__name__)

# Outputs a request's reader may leave unread before it is cut off (a stalled client): at
# one output per step, minutes of generation, while memory stays one merged output.
DEFAULT_MAX_UNREAD_OUTPUTS = 4096
GRAMMAR_CACHE_SIZE = 64  # compiled grammars kept (clients repeat their schemas)

_FINISH_STATUS = {
    "stop": SequenceStatus.FINISHED_STOPPED,
    "length": SequenceStatus.FINISHED_LENGTH,
    "abort": SequenceStatus.FINISHED_ABORTED,
    "error": SequenceStatus.FINISHED_ERROR,
}


@dataclass
class EngineStats:
    """Counters since the engine started (for metrics and tests)."""

    num_computed_tokens: int = 0  # tokens run through the model (prefill chunks + decodes)
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    num_draft_tokens: int = 0  # drafted tokens verified
    num_accepted_tokens: int = 0  # of those, accepted


@dataclass
class _SeqState:
    """Output-side state of one sequence: text so far and what the next output carries."""

    request: _Request  # the user request it is one of the n sequences of
    seq: Sequence
    detok: IncrementalDetokenizer
    stop: StopChecker
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    delta_text: str = ""
    delta_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    grammar: GrammarMatcher | None = None  # restricts this sequence's tokens


@dataclass
class _Request:
    """One user request: its n sequences and metrics."""

    request_id: str
    seqs: list[_SeqState]
    metrics: RequestMetrics
    error: str | None = None

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.seqs[0].seq.prompt_token_ids

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


class LLMEngine:
    """Synchronous engine core. Not thread-safe: one thread calls all methods."""

    def __init__(
        self,
        config: EngineConfig,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        max_model_len: int,
        draft_model: Drafter | None = None,  # the loaded drafter of method "draft_model"
    ):
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        if runner.num_blocks * config.block_size < max_model_len:
            raise KVCacheTooSmallError(
                f"max_model_len {max_model_len} does not fit in the KV cache "
                f"({runner.num_blocks} blocks of {config.block_size} tokens)"
            )
        self.block_manager = BlockManager(
            runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens
        )
        self.image_token_id: int | None = runner.model.config.image_token_index
        self.eos_token_ids = frozenset([tokenizer.eos_token_id])
        self._requests: dict[str, _Request] = {}
        self._states: dict[str, _SeqState] = {}  # by seq_id, of the requests in _requests
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self._rng = random.Random(config.seed)  # seeds requests that bring no seed
        self._pending: list[RequestOutput] = []  # outputs produced outside step() (aborts)
        self.model_path: Path | None = None  # set by from_config; grammars need its tokenizer
        self._ll_tokenizer: Any = None  # llguidance tokenizer, built once (grammar_tokenizer)
        self._ll_lock = threading.Lock()  # grammars compile on other threads (AsyncEngine)
        self._grammars: OrderedDict[str, CompiledGrammar] = OrderedDict()  # by spec key
        self.stats = EngineStats()
        spec = config.speculative_config
        self.default_speculation = spec.speculation(draft_model) if spec is not None else None

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        """Resolve the model, load weights and tokenizer, size the KV cache."""
        from mistralpy.model.config import read_config

        path = resolve_model_path(config.model, config.revision)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        max_pos = read_config(path, config.mmproj).text_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > max_pos:
            raise InvalidParameter(
                "max_model_len", f"max_model_len {config.max_model_len} > the model's {max_pos}"
            )
        draft = _load_draft_model(config, path, device, dtype)  # first: see draft_model.py
        runner = _load_runner(config, path, device, dtype)
        try:
            max_model_len = _fit_context(
                config.max_model_len, max_pos, runner.num_blocks * config.block_size
            )
            engine = cls(config, runner, Tokenizer.from_dir(path), max_model_len, draft)
        except BaseException:
            runner.shutdown()  # tensor-parallel workers must not outlive a failed start
            raise
        engine.model_path = path
        return engine

    def shutdown(self) -> None:
        """Release the runner's resources (stops tensor-parallel workers); idempotent."""
        self.runner.shutdown()

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        request_id: str,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        matchers: list[GrammarMatcher] | None = None,
        speculation: Speculation | None = None,
    ) -> None:
        """Queue a request. Raises a ValueError subclass for a prompt or parameter the engine
        cannot serve (too long, empty, image/token mismatch, duplicate id, bad token ids).
        matchers: `grammar_matchers(params)` made ahead on another thread (None: made here).
        speculation: this request's drafter and k (None: the engine's speculative_config)."""
        if request_id in self._requests:
            raise DuplicateRequestError(request_id)
        prompt_ids = list(prompt.token_ids)
        if not prompt_ids:
            raise EmptyPromptError()
        if len(prompt_ids) >= self.max_model_len:
            raise PromptTooLongError(len(prompt_ids), self.max_model_len)
        _check_prompt_ids(prompt_ids, self.runner.vocab_size)
        params.check_vocab(self.runner.vocab_size)
        if matchers is None:
            matchers = self.grammar_matchers(params)
        room = self.max_model_len - len(prompt_ids)
        max_tokens = min(params.max_tokens or room, room)
        arrival = next(self._arrivals)
        speculation = speculation or self.default_speculation
        metrics = RequestMetrics(arrival_time=now(), num_prompt_tokens=len(prompt_ids))
        request = _Request(request_id, [], metrics)
        for index in range(params.n):
            seed = params.seed + index if params.seed is not None else self._rng.getrandbits(63)
            seq = Sequence(
                f"seq{next(self._seq_ids)}",
                prompt_ids,
                params,
                arrival=arrival,
                images=list(prompt.images),
                image_token_id=self.image_token_id,
                max_tokens=max_tokens,
                seed=seed,
                parent_id=request_id,
                index=index,
                drafter=speculation.drafter if speculation is not None else None,
                num_speculative_tokens=speculation.num_speculative_tokens if speculation else 0,
                max_draft_pause=speculation.max_pause if speculation else 0,
            )
            if index > 0 and self.config.enable_prefix_caching:
                seq.wait_for = request.seqs[0].seq
            matcher = matchers[index] if matchers else None
            request.seqs.append(self._seq_state(request, seq, matcher))
        self._requests[request_id] = request
        for s in request.seqs:
            self._states[s.seq.seq_id] = s
            self.scheduler.add(s.seq)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks; its final output (finish_reason "abort")
        comes out of the next step(). Unknown or finished ids are ignored."""
        request = self._requests.get(request_id)
        if request is None:
            return
        for s in request.seqs:
            if s.finish_reason is None:
                s.delta_text += s.stop.finish()
                self._finish(s, "abort", None)
        self._pending.append(self._output(request))
        self._forget(request)

    def abort_all(self) -> list[str]:
        """Abort every unfinished request, dropping their final outputs; returns their ids."""
        ids = list(self._requests)
        for rid in ids:
            self.abort_request(rid)
        self._pending.clear()
        return ids

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending)

    # ------------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return an output for every request that changed."""
        outputs, self._pending = self._pending, []
        self._propose_drafts()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return outputs
        touched = self._note_scheduled(sched)
        self.stats.num_computed_tokens += sched.total_tokens
        self.stats.num_preemptions += len(sched.preempted_ids)
        self.stats.num_generated_tokens += len(sched.sample_ids)
        result, failed = self._execute_isolated(self._batch(sched), touched)
        outputs += failed
        self.scheduler.on_step_done(sched)  # skips the sequences of failed requests
        changed = []
        for sid, token in result.sampled.items():
            s = self._states.get(sid)
            if s is None:  # its request failed at a sibling's token earlier in this loop
                continue
            request = s.request
            try:
                self._on_tokens(s, [*result.accepted.get(sid, []), token])
            except Exception as exc:  # e.g. a detokenizer bug: only this request fails
                logger.exception("request %s failed", request.request_id)
                outputs += self._fail_requests([request], exc)
                continue
            if request not in changed:
                changed.append(request)
        for request in changed:
            if request.request_id in self._requests:
                outputs.append(self._output(request))
                if request.finished:
                    self._forget(request)
        return outputs

    def _execute_isolated(
        self, batch: ScheduledBatch, requests: list[_Request]
    ) -> tuple[ModelOutput, list[RequestOutput]]:
        """Run the step; if it fails, run each request's share alone, so that only the
        requests whose own share fails are failed (one bad request never fails the others).
        Returns the merged results and the failed requests' final outputs."""
        try:
            return self.runner.execute(batch), []
        except RunnerDeadError:  # no request's fault, and no later step can run
            raise
        except Exception as exc:  # noqa: BLE001 - isolated below, never fatal to the engine
            if len(requests) == 1:
                logger.exception("model step failed for request %s", requests[0].request_id)
                return ModelOutput({}), self._fail_requests(requests, exc)
            logger.warning("model step failed (%s); retrying request by request", exc)
        merged = ModelOutput({})
        failed: list[RequestOutput] = []
        for request in requests:
            ids = {s.seq.seq_id for s in request.seqs}
            share = ScheduledBatch([w for w in batch.seqs if w.seq_id in ids])
            try:
                result = self.runner.execute(share)
            except Exception as exc:  # noqa: BLE001 - only this request fails
                logger.exception("model step failed for request %s", request.request_id)
                failed += self._fail_requests([request], exc)
                continue
            merged.sampled.update(result.sampled)
            merged.accepted.update(result.accepted)
        return merged, failed

    def generate(
        self, prompts: list[ProcessedPrompt], params: SamplingParams | list[SamplingParams]
    ) -> list[RequestOutput]:
        """Run `prompts` to completion (offline use); final outputs in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen{next(self._seq_ids)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, plist):
            self.add_request(rid, prompt, p)
        final: dict[str, RequestOutput] = {}
        while any(rid not in final for rid in ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[rid] for rid in ids]

    # ------------------------------------------------------------------ helpers

    def grammar_matchers(self, params: SamplingParams) -> list[GrammarMatcher] | None:
        """One fresh GrammarMatcher per sequence of the request (None without a grammar).
        Seconds for a large schema (llguidance builds the matcher's parser), though without
        the GIL: AsyncEngine calls this off the engine thread; raises GrammarError."""
        compiled = self.compile_grammar(params)
        return None if compiled is None else [compiled.matcher() for _ in range(params.n)]

    def compile_grammar(self, params: SamplingParams) -> CompiledGrammar | None:
        """The request's compiled grammar (None without one), from a small LRU keyed by the
        spec; raises GrammarError (ValueError). Thread-safe: AsyncEngine calls it off the
        engine thread, so a slow compile pauses no running stream."""
        if params.grammar is None:
            return None
        from mistralpy.processing.grammar import compile_grammar

        key = _grammar_key(params.grammar)
        with self._ll_lock:
            if key is not None and key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
        compiled = compile_grammar(params.grammar, self.grammar_tokenizer())
        if key is not None:
            with self._ll_lock:
                self._grammars[key] = compiled
                while len(self._grammars) > GRAMMAR_CACHE_SIZE:
                    self._grammars.popitem(last=False)
        return compiled

    def grammar_tokenizer(self) -> Any:
        """llguidance's tokenizer of this model, built on first use. The build holds the GIL
        for seconds (a full vocabulary), pausing every thread: servers call this at start-up
        (`api.runner.load_engine`), before any stream runs."""
        from mistralpy.processing.grammar import ll_tokenizer_from_hf

        with self._ll_lock:
            if self._ll_tokenizer is None:
                if self.model_path is None:
                    raise InvalidParameter("grammar", "this engine has no tokenizer for grammars")
                self._ll_tokenizer = ll_tokenizer_from_hf(
                    _hf_tokenizer_json(self.model_path),
                    sorted(self.eos_token_ids),
                    self.runner.vocab_size,
                )
            return self._ll_tokenizer

    def _seq_state(
        self, request: _Request, seq: Sequence, matcher: GrammarMatcher | None
    ) -> _SeqState:
        p = seq.params
        return _SeqState(
            request=request,
            grammar=matcher,
            seq=seq,
            detok=IncrementalDetokenizer(
                self.tokenizer, seq.prompt_token_ids, p.skip_special_tokens
            ),
            stop=StopChecker(p, self.eos_token_ids, self.max_model_len),
            logprobs=[] if (p.logprobs or p.top_logprobs > 0) else None,
        )

    def _note_scheduled(self, sched: SchedulerOutput) -> list[_Request]:
        """Groups in this step; sets their first-scheduled time and prefix-hit count."""
        requests = []
        for sid in sched.num_new_tokens:
            request = self._states[sid].request
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now()
                request.metrics.num_cached_tokens = request.seqs[0].seq.num_cached_tokens or 0
            if request not in requests:
                requests.append(request)
        return requests

    def _batch(self, sched: SchedulerOutput) -> ScheduledBatch:
        """The runner's view of this step (plain data)."""
        sampling = set(sched.sample_ids)
        seqs = []
        for sid, n in sched.num_new_tokens.items():
            seq = self.scheduler.requests[sid]
            start = seq.num_computed_tokens
            real = n - len(seq.draft_ids)  # the rest are drafts to verify
            spec = None
            if sid in sampling:
                grammar = self._states[sid].grammar
                # a request without a seed of its own samples from the device's default
                # generator: no per-sequence generator to create and draw from
                seed = seq.seed if seq.params.seed is not None else None
                spec = SampleSpec(
                    seq.params,
                    seq.prompt_token_ids,
                    seq.output_token_ids,
                    seed,
                    grammar,
                    draft_ids=list(seq.draft_ids),
                    speculative=seq.verifies_drafts,
                )
            seqs.append(
                SeqWork(
                    seq_id=sid,
                    token_ids=seq.all_token_ids[start : start + real] + seq.draft_ids,
                    start_pos=start,
                    block_table=list(self.block_manager.block_table(sid)),
                    images=self._image_slices(seq, start, start + real),
                    sample=spec,
                )
            )
        return ScheduledBatch(seqs)

    def _image_slices(self, seq: Sequence, start: int, end: int) -> list[ImageSlice]:
        """Encoder-output rows for the image tokens in positions [start, end); image-token ids
        the model generated itself are ordinary tokens (key None: their own embedding)."""
        slices = [
            ImageSlice(seq.images[i].content_hash, seq.images[i].pixel_values, lo, hi)
            for i, lo, hi in seq.images_in(start, end)
        ]
        gen_start = max(start, seq.num_prompt_tokens)
        image_id = self.image_token_id  # None: a text-only model generates no image token
        generated = seq.all_token_ids[gen_start:end].count(image_id) if image_id is not None else 0
        if generated:
            slices.append(ImageSlice(None, None, 0, generated))
        return slices

    def _propose_drafts(self) -> None:
        """Draft the next tokens of every running sequence that speculates and decodes; never
        more than max_tokens leaves room for (the verify step emits one token beyond them)."""
        for seq in self.scheduler.running:
            k = min(seq.num_speculative_tokens, seq.max_tokens - seq.num_output_tokens - 1)
            if k <= 0 or seq.drafter is None or seq.num_tokens - seq.num_computed_tokens != 1:
                continue
            if seq.draft_pause > 0:
                seq.draft_pause -= 1
                continue
            shadow = seq.on_trial
            k = 1 if shadow else k
            drafts = seq.drafter.propose(seq.seq_id, seq.all_token_ids, k)[:k]
            # an image-token id would need image rows in the verify chunk: draft up to it
            if self.image_token_id in drafts:
                drafts = drafts[: drafts.index(self.image_token_id)]
            drafts = list(itertools.takewhile(self._in_vocab, drafts))
            if shadow:  # checked against this plain step's token (`_on_tokens`)
                seq.shadow_draft = drafts[0] if drafts else None
            else:
                seq.draft_ids = drafts
            # a drafter that keeps finding nothing (prompt lookup on text that does not
            # repeat) backs off as after misses, and the plain steps between its tries may
            # be launched ahead; unlike misses, empty proposals keep k whole
            seq.draft_empties = 0 if drafts else seq.draft_empties + 1
            if seq.draft_empties:
                seq.draft_pause = draft_pause(seq.draft_empties, seq.max_draft_pause)

    def _in_vocab(self, token_id: int) -> bool:
        return 0 <= token_id < self.runner.vocab_size

    def _on_tokens(self, s: _SeqState, tokens: list[SampledToken]) -> None:
        """Append a step's tokens (accepted drafts, then the sampled token) until one ends the
        sequence; then keep the K/V of the accepted drafts (speculative decoding)."""
        drafted = len(s.seq.draft_ids)
        for token in tokens:
            self._on_token(s, token)
            if s.finish_reason is not None:
                break
        if s.seq.shadow_draft is not None:
            self._check_shadow(s.seq, tokens[0].token_id)
        if drafted:
            accepted = len(tokens) - 1
            metrics = s.request.metrics
            metrics.num_drafts += 1
            metrics.num_draft_tokens += drafted
            metrics.num_accepted_tokens += accepted
            self.stats.num_draft_tokens += drafted
            self.stats.num_accepted_tokens += accepted
            self.stats.num_generated_tokens += accepted
            # misses only count towards the trial (`shadow_checking`): its first check runs
            # at the next step
            s.seq.draft_misses = 0 if accepted else s.seq.draft_misses + 1
            self.scheduler.on_drafts_verified(s.seq, accepted)

    @staticmethod
    def _check_shadow(seq: Sequence, token_id: int) -> None:
        """A plain step sampled `token_id` where the drafter guessed `seq.shadow_draft`: a
        hit ends the trial (drafts are verified again from the step after next: the next
        one may already run, launched ahead as plain decode); misses space the next checks
        0, 1, 3, 7 ... steps apart (a check costs only the drafter's host time)."""
        hit = seq.shadow_draft == token_id
        seq.shadow_draft = None
        seq.draft_misses = 0 if hit else seq.draft_misses + 1
        failed_checks = seq.draft_misses - SHADOW_AFTER_MISSES
        seq.draft_pause = 1 if hit else draft_pause(failed_checks, seq.max_draft_pause)

    def _on_token(self, s: _SeqState, token: SampledToken) -> None:
        """Append a sampled token; detokenize, check stop conditions, finish if done."""
        seq, request = s.seq, s.request
        seq.append_token(token.token_id)
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now()
        if s.logprobs is not None:
            s.logprobs.append(self._logprob(token))
        s.delta_ids.append(token.token_id)
        delta = s.detok.step([token.token_id])
        decision = s.stop.step(token.token_id, delta, seq.num_output_tokens, seq.num_tokens)
        s.delta_text += decision.text
        assert seq.num_tokens <= self.max_model_len
        if decision.finish_reason is None and self._grammar_done(s, token.token_id):
            s.delta_text += s.stop.finish() + s.detok.flush()
            self._finish(s, "stop", None)
        elif decision.finish_reason is not None:
            if not isinstance(decision.stop_reason, str):  # text not cut at a stop string
                s.delta_text += s.detok.flush()
            self._finish(s, decision.finish_reason, decision.stop_reason)

    def _grammar_done(self, s: _SeqState, token_id: int) -> bool:
        """Advance the sequence's grammar; True once it admits nothing but the end."""
        if s.grammar is None:
            return False
        if token_id in self.eos_token_ids:
            return False  # EOS ends the sequence through the stop checker
        if not s.grammar.accept(token_id):
            raise RuntimeError(f"grammar rejected token {token_id}: {s.grammar.error}")
        return s.grammar.is_finished()

    def _logprob(self, token: SampledToken) -> TokenLogprob:
        name = self.tokenizer.id_to_token
        top = [TokenLogprob(t, name(t), lp) for t, lp in token.top_logprobs]
        logprob = token.logprob if token.logprob is not None else float("nan")
        return TokenLogprob(token.token_id, name(token.token_id), logprob, top)

    def _finish(self, s: _SeqState, reason: str, stop_reason: str | int | None) -> None:
        s.finish_reason = reason
        s.stop_reason = stop_reason
        self.scheduler.finish(s.seq.seq_id, _FINISH_STATUS[reason])
        self.runner.release([s.seq.seq_id])
        if s.seq.drafter is not None:
            s.seq.drafter.release(s.seq.seq_id)

    def _fail_requests(self, requests: list[_Request], exc: BaseException) -> list[RequestOutput]:
        outs = []
        for request in requests:
            if request.request_id not in self._requests:
                continue
            request.error = f"{type(exc).__name__}: {exc}"
            for s in request.seqs:
                if s.finish_reason is None:
                    self._finish(s, "error", None)
            outs.append(self._output(request))
            self._forget(request)
        return outs

    def _output(self, request: _Request) -> RequestOutput:
        """Snapshot of `request` with the deltas accumulated since its last output."""
        completions = []
        for s in request.seqs:
            s.text += s.delta_text
            completions.append(
                CompletionOutput(
                    index=s.seq.index,
                    token_ids=list(s.seq.output_token_ids),
                    text=s.text,
                    delta_text=s.delta_text,
                    delta_token_ids=s.delta_ids,
                    logprobs=list(s.logprobs) if s.logprobs is not None else None,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                )
            )
            s.delta_text, s.delta_ids = "", []
        finished = request.finished
        if finished and request.metrics.finished_time is None:
            request.metrics.finished_time = now()
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            outputs=completions,
            finished=finished,
            metrics=replace(request.metrics),
            error=request.error,
        )

    def _forget(self, request: _Request) -> None:
        self._requests.pop(request.request_id, None)
        for s in request.seqs:
            self._states.pop(s.seq.seq_id, None)


def _grammar_key(spec: GrammarSpec) -> str | None:
    """A cache key naming the grammar spec exactly (None: not JSON, not cached)."""
    try:
        return json.dumps([spec.kind, spec.value, spec.strict], sort_keys=True)
    except (TypeError, ValueError):
        return None


def _check_prompt_ids(prompt_ids: list[int], vocab_size: int) -> None:
    """Every prompt token must index the embedding table (an id beyond it fails the step)."""
    bad = next((t for t in prompt_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidParameter(
            "prompt", f"token id {bad} is outside the vocabulary [0, {vocab_size})"
        )


def _hf_tokenizer_json(path: Path) -> str:
    """The model's tokenizer as HF tokenizers JSON text (converted from tekken.json or from a
    GGUF file's vocabulary if need be)."""
    if path.suffix == ".gguf":
        from tokenizers import decoders

        from mistralpy.model.gguf_file import open_gguf
        from mistralpy.processing.tokenizer import gguf_bpe_tokenizer

        hf = gguf_bpe_tokenizer(open_gguf(path).metadata)
        hf.decoder = decoders.ByteLevel()  # llguidance reads the token bytes off the decoder
        return hf.to_str()
    if (path / "tokenizer.json").is_file():
        return (path / "tokenizer.json").read_text("utf-8")
    from mistralpy.processing.tokenizer import tekken_to_hf_tokenizer

    tekken = json.loads((path / "tekken.json").read_text("utf-8"))
    return tekken_to_hf_tokenizer(tekken).to_str()


def _load_runner(
    config: EngineConfig, path: Path, device: torch.device, dtype: torch.dtype
) -> ModelRunner:
    """One device's runner, or rank 0 of a tensor-parallel request (spawns the other ranks)."""
    if config.tensor_parallel_size == 1:
        # GGUF: "auto" serves the stored block formats; an explicit dtype dequantizes into it
        dequantize = config.dtype != "auto"
        return ModelRunner.load(
            path, runner_config(config), device, dtype, config.isq, config.load_format, dequantize,
            config.mmproj,
        )  # fmt: skip
    from mistralpy.runner.distributed import TensorParallelRunner

    return TensorParallelRunner.launch(
        path,
        runner_config(config),
        device,
        dtype,
        config.tensor_parallel_size,
        isq=config.isq,
        load_format=config.load_format,
    )


def _load_draft_model(
    config: EngineConfig, path: Path, device: torch.device, dtype: torch.dtype
) -> DraftModelDrafter | None:
    """The draft model of `config.speculative_config` (None without one), loaded before the
    target so that the target's memory profile counts it as used."""
    spec = config.speculative_config
    if spec is None or spec.model is None:
        return None
    from mistralpy.engine.draft_model import DraftModelDrafter, read_vocabulary

    target = read_vocabulary(config.model, path, config.mmproj)
    return DraftModelDrafter.load(config, runner_config(config), target, device, dtype)


def runner_config(config: EngineConfig) -> RunnerConfig:
    """The runner's share of the engine configuration."""
    spec = config.speculative_config
    k = spec.num_speculative_tokens if spec is not None else 0  # drafts verified per step
    return RunnerConfig(
        block_size=config.block_size,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs,
        max_decode_rows=config.max_num_seqs * (1 + k),
        gpu_memory_utilization=config.gpu_memory_utilization,
        cpu_kv_cache_bytes=config.cpu_kv_cache_bytes,
        num_kv_blocks=config.num_kv_blocks,
        encoder_cache_size=config.encoder_cache_size,
        enforce_eager=config.enforce_eager,
        kv_cache_dtype=config.kv_cache_dtype,
    )


def _fit_context(requested: int | None, max_pos: int, kv_capacity: int) -> int:
    """The context length to serve: the requested one (must fit in the KV cache), else the
    model's, lowered to what the KV cache holds."""
    if requested is not None:
        if requested > kv_capacity:
            raise KVCacheTooSmallError(
                f"max_model_len {requested} needs {requested} KV slots but the cache holds "
                f"{kv_capacity}; lower max_model_len or give the KV cache more memory"
            )
        return requested
    if kv_capacity < max_pos:
        logger.warning(
            "KV cache holds %d tokens: max_model_len lowered from %d", kv_capacity, max_pos
        )
    return min(max_pos, kv_capacity)


class AsyncEngine:
    """Drives an LLMEngine from a background thread; `generate` streams outputs to asyncio.

    All engine calls happen on the background thread: `generate` and `abort` only queue
    commands. Outputs go back to each request's `OutputStream` (merged while unread, bounded)
    through `loop.call_soon_threadsafe`. A request that fails raises `RequestFailedError` from its
    own `generate`; the others continue.
    """

    def __init__(self, engine: LLMEngine, max_unread_outputs: int = DEFAULT_MAX_UNREAD_OUTPUTS):
        self.engine = engine
        self.max_unread_outputs = max_unread_outputs  # a reader this far behind is cut off
        self._commands: list[tuple[str, tuple, concurrent.futures.Future]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, OutputStream]] = {}
        self._stopping = False
        self.failure: EngineDeadError | None = None  # why the loop stopped on its own
        # grammars compile here, not on the engine thread (llguidance releases the GIL)
        self._grammar_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="mistralpy-grammar"
        )
        self._thread = threading.Thread(target=self._run, name="mistralpy-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(LLMEngine.from_config(config))

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    async def generate(
        self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        """Add a request and yield its outputs until the finished one. Raises the engine's
        ValueError subclasses for a bad request (before anything is yielded),
        RequestFailedError if it fails inside the engine, EngineDeadError after shutdown.
        Closing the iterator early (client gone) aborts the request."""
        loop = asyncio.get_running_loop()
        if request_id in self._streams:
            raise DuplicateRequestError(request_id)
        stream = OutputStream(self.max_unread_outputs, lambda: self.abort(request_id))
        self._streams[request_id] = (loop, stream)
        finished = False
        try:
            grammar = None
            if params.grammar is not None:
                grammar = await loop.run_in_executor(
                    self._grammar_pool, self.engine.grammar_matchers, params
                )
            await asyncio.wrap_future(self._submit("add", (request_id, prompt, params, grammar)))
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if unknown or finished); safe from any thread."""
        if self.is_running:
            self._submit("abort", (request_id,))

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the loop after the current step; pending requests fail with EngineDeadError."""
        self._stopping = True
        self._wake.set()
        self._grammar_pool.shutdown(wait=False, cancel_futures=True)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _submit(self, kind: str, args: tuple) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopping or not self._thread.is_alive():
            future.set_exception(EngineDeadError("the engine is shut down"))
            return future
        with self._lock:
            self._commands.append((kind, args, future))
        self._wake.set()
        return future

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._apply_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    self._check_runner()  # idle: a worker may die between requests too
                    continue
                self._step()
        finally:
            self._stopping = True
            self._fail_all(self.failure or EngineDeadError("the engine was shut down"))
            self.engine.shutdown()  # on this thread: it owns the runner

    def _apply_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for kind, args, future in commands:
            try:
                if kind == "add":
                    self.engine.add_request(*args)
                else:
                    self.engine.abort_request(*args)
            except Exception as exc:  # a user error: reaches that request's caller only
                future.set_exception(exc)
            else:
                future.set_result(None)

    def _runner_died(self, exc: RunnerDeadError) -> None:
        """The model is gone: stop the loop; every request fails with why."""
        logger.error("engine stopped: %s", exc)
        self.failure = EngineDeadError(f"the model runner died: {exc}")
        self._stopping = True

    def _check_runner(self) -> None:
        try:
            self.engine.runner.check_alive()
        except RunnerDeadError as exc:
            self._runner_died(exc)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except RunnerDeadError as exc:
            self._runner_died(exc)
            return
        except Exception as exc:  # the engine's own bug: fail what is in flight, keep serving
            logger.exception("engine step failed")
            for rid in self.engine.abort_all():
                self._deliver(rid, RequestFailedError(rid, f"{type(exc).__name__}: {exc}"))
            return
        for out in outputs:
            if out.error is not None:
                self._deliver(out.request_id, RequestFailedError(out.request_id, out.error))
            else:
                self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        loop, outputs = stream
        # RuntimeError: the caller's loop is closed, nobody is listening.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(outputs.put, item)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for _, _, future in commands:
            if not future.done():
                future.set_exception(exc)
        for rid in list(self._streams):
            self._deliver(rid, exc)
