"""The synchronous engine: add requests, call ``step()`` until they finish."""

from __future__ import annotations

import logging
import time

from transformers import AutoTokenizer, GenerationConfig

from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .kv_cache_manager import KVCacheManager
from .kv_events import KVEventBatch
from .logit_controls import build_controls, check_vocab
from .model_runner import ModelRunner, PromptLogprobsChunk
from .outputs import CompletionOutput, RequestOutput
from .reasoning import ReasoningGate
from .sampler import Sampler
from .sampling_params import InvalidParameter, SamplingParams
from .scheduler import Scheduler
from .sequence import IdCounter, Request, SeqStatus, Sequence
from .structured_output import GrammarCompiler

log = logging.getLogger(__name__)


def eos_ids_of(model_path: str, hf_config, tokenizer) -> frozenset[int]:
    """Every EOS id of the model's generation_config (int or list), else of its config/tokenizer."""
    ids = None
    try:
        ids = GenerationConfig.from_pretrained(model_path).eos_token_id
    except (OSError, ValueError):
        pass
    if ids is None:
        ids = getattr(hf_config.get_text_config(), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return frozenset()
    return frozenset([ids] if isinstance(ids, int) else ids)


class LLMEngine:
    """One model: its runner, KV cache manager, scheduler, sampler and detokenizers."""

    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None):
        """``runner``: weights already loaded (a worker loads every model before sizing KV)."""
        self.config = config
        self.runner = runner or ModelRunner(config)
        self.runner.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.model,
                                                       trust_remote_code=config.trust_remote_code)
        self.eos_token_ids = eos_ids_of(config.model, self.runner.hf_config, self.tokenizer)
        max_pos = self.runner.max_position_embeddings or 2048
        self.max_model_len = min(config.max_model_len or max_pos, max_pos)
        num_blocks = self.runner.decide_num_blocks()
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"KV cache of {num_blocks} blocks x {config.block_size} tokens cannot hold one "
                f"sequence of max_model_len={self.max_model_len}; give more KV memory or lower "
                f"max_model_len")
        self.runner.allocate_kv_cache(num_blocks)
        self.reasoning = (ReasoningGate.for_tokenizer(config.reasoning_parser, self.tokenizer)
                          if config.reasoning_parser else None)
        self.sampler = Sampler(self.runner.device, config.seed, self.reasoning)
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self._seq_ids = IdCounter()
        self._kv_event_seq = 0
        self.warmup_sequences = 0  # how many dummy sequences the start-up warm-up ran
        if config.warmup and not self.runner.interpreted:
            self._warm_up(num_blocks)
        # The serving state starts here, empty: nothing of the warm-up is cached or counted.
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                 hash_salt=f"{config.model}|{self.runner.dtype}",
                                 enable_events=config.enable_kv_events)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        log.info("engine ready: model=%s device=%s dtype=%s kv_blocks=%d (%d tokens) max_model_len=%d",
                 config.model, self.runner.device, self.runner.dtype, num_blocks,
                 num_blocks * config.block_size, self.max_model_len)

    def _warm_up(self, num_blocks: int) -> None:
        """Run one full batch (``max_num_seqs`` prompts filling a step's token budget, then two
        decode steps) through a throwaway KV manager and scheduler before serving.

        A fresh engine otherwise pays its first-time costs inside the first real burst: oneDNN
        builds a kernel per new GEMM shape, the allocator grows to the step's working set. On the
        2-core AMX Xeon a fresh worker's first burst of 16 short prompts ran at ITL p50 57-108 ms
        against 32-37 once warm. The KV blocks written here are zeroed again afterwards."""
        cfg = self.config
        self.kv = KVCacheManager(num_blocks, cfg.block_size, False, enable_events=False)
        self.scheduler = Scheduler(self.kv, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.requests = {}
        room = num_blocks * cfg.block_size // 2  # leave the pool half free: no preemption
        n = max(1, min(cfg.max_num_seqs, room // 8))
        per = max(1, min(cfg.max_num_batched_tokens // n, self.max_model_len - 4, room // n - 4))
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        vocab = self.vocab_size
        t0 = time.monotonic()
        for i in range(n):
            self.add_request(f"warmup-{i}", prompt_token_ids=[(7 * i + 13 * j + 1) % vocab for j in range(per)],
                             params=params)
        while self.has_unfinished_requests():
            self.step()
        self.runner.clear_kv_cache()
        self.warmup_sequences = n
        log.info("warm-up: %d sequences of %d tokens in %.2f s", n, per, time.monotonic() - t0)

    def take_kv_events(self) -> KVEventBatch | None:
        """Prefix-cache events since the last call as one batch, None if nothing happened or
        ``enable_kv_events`` is off. Call it on the engine's thread (between steps)."""
        events = self.kv.take_events()
        if not events:
            return None
        batch = KVEventBatch(self._kv_event_seq, events)
        self._kv_event_seq += 1
        return batch

    @property
    def num_kv_blocks(self) -> int:
        return self.kv.pool.num_blocks

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    # -- requests --------------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def truncate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> list[int]:
        """The prompt ``params.truncate_prompt_tokens`` leaves: its last k tokens (-1: the model's
        context length), as vLLM truncates."""
        k = params.truncate_prompt_tokens
        if k is None:
            return list(prompt_token_ids)
        if k == -1:
            k = self.max_model_len
        if k > self.max_model_len:
            raise InvalidParameter("truncate_prompt_tokens",
                                   f"truncate_prompt_tokens ({k}) is greater than this model's maximum "
                                   f"context length ({self.max_model_len})")
        return list(prompt_token_ids[-k:])

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise :class:`InvalidParameter` for prompts (after ``truncate_prompt_tokens``) and
        vocabulary-dependent parameters that cannot run; nothing is scheduled."""
        prompt_token_ids = self.truncate_prompt(prompt_token_ids, params)
        check_vocab(params, self.vocab_size, self.tokenizer)
        if not prompt_token_ids:
            raise InvalidParameter("prompt", "prompt must contain at least one token")
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidParameter("prompt", f"token id {bad[0]!r} is outside the vocabulary "
                                             f"[0, {self.vocab_size})")
        n = len(prompt_token_ids)
        want = params.max_tokens if params.max_tokens is not None else 1
        if n + want > self.max_model_len:
            raise InvalidParameter(
                "max_tokens" if params.max_tokens is not None and n < self.max_model_len else "prompt",
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{n} tokens and max_tokens is {params.max_tokens} ({n + want} in all)")

    def add_request(self, request_id: str, prompt: str | None = None,
                    prompt_token_ids: list[int] | None = None,
                    params: SamplingParams | None = None, prefix_salt: bytes = b"",
                    mm=None) -> Request:
        """Queue a request. ``mm``: a :class:`MultiModalInput` whose image placeholders are already
        expanded in the prompt (vision-language models only)."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise InvalidParameter("request_id", f"request id {request_id!r} is already running")
        if prompt_token_ids is None:
            if prompt is None:
                raise InvalidParameter("prompt", "either prompt or prompt_token_ids is required")
            prompt_token_ids = self.tokenize(prompt)
        full_len = len(prompt_token_ids)
        prompt_token_ids = self.truncate_prompt(prompt_token_ids, params)
        self.validate_prompt(prompt_token_ids, params)
        if mm is not None:
            if self.runner.vision is None:
                raise InvalidParameter("messages", "this model does not accept images")
            if len(prompt_token_ids) < full_len:  # cutting would separate images from their tokens
                raise InvalidParameter("truncate_prompt_tokens", "a prompt with images cannot be truncated")
            try:
                self.runner.vision.prepare(prompt_token_ids, mm)
            except ValueError as e:
                raise InvalidParameter("messages", str(e)) from e
            prefix_salt = prefix_salt + mm.salt
        # Normally a cache hit: the serving layer compiles off the step loop before adding.
        grammar = self.grammars.compile(params.structured_outputs) if params.structured_outputs else None
        controls = build_controls(params, self.tokenizer, self.vocab_size, self.eos_token_ids,
                                  self.runner.device)
        req = Request(request_id=request_id, prompt=prompt, prompt_token_ids=prompt_token_ids,
                      params=params, eos_token_ids=self.eos_token_ids,
                      max_model_len=self.max_model_len, arrival_time=time.monotonic(), mm=mm,
                      grammar=grammar, logit_controls=controls)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs, req.prompt_token_ranks = [None], [None]
        seq = self._new_seq(req, 0, prefix_salt)
        req.seqs.append(seq)
        self.requests[request_id] = req
        self.scheduler.add(seq)
        return req

    def _new_seq(self, req: Request, index: int, prefix_salt: bytes = b"") -> Sequence:
        p = req.params
        seq = Sequence(seq_id=self._seq_ids.next(), request=req, token_ids=list(req.prompt_token_ids),
                       num_prompt_tokens=len(req.prompt_token_ids), index=index,
                       prefix_salt=prefix_salt, logprobs=[] if p.logprobs is not None else None)
        seq.generator = self.sampler.make_generator(None if p.seed is None else p.seed + index)
        if req.grammar is not None:
            seq.grammar = self.grammars.matcher(req.grammar)
            if self.reasoning is not None:
                seq.think = self.reasoning.initial_state(req.prompt_token_ids)
        if p.detokenize:
            seq.detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, p.stop,
                                               p.skip_special_tokens, p.include_stop_str_in_output)
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is; its blocks go back to the pool at once."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return self._output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- stepping --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward, sample, and return outputs of requests that progressed."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        try:
            res = self.runner.execute(sched)
        except Exception as e:  # a failing batch fails its requests, not the engine
            log.exception("model step failed")
            return self._fail({s.seq.request.request_id for s in sched.scheduled}, e)
        self.scheduler.update_after_step(sched)
        for chunk in res.prompt_logprobs:
            self._store_prompt_logprobs(chunk)
        touched: dict[str, Request] = {}
        seqs: list[Sequence] = []
        rows: list[int] = []
        for i, seq in enumerate([s.seq for s in res.order if s.completes]):
            req = seq.request
            if req.params.max_tokens == 0:  # prefilled for its prompt logprobs; nothing to sample
                self._finish_unsampled(seq)
                touched[req.request_id] = req
                continue
            seqs.append(seq)
            rows.append(i)
            if not req.forked:
                req.forked = True
                for idx in range(1, req.params.n):
                    child = self._new_seq(req, idx, seq.prefix_salt)
                    self.kv.fork(seq, child)
                    req.seqs.append(child)
                    self.scheduler.add_running(child)
                    seqs.append(child)
                    rows.append(i)
        logits = res.logits
        if rows != list(range(logits.shape[0])):
            logits = logits[rows]
        if seqs:
            tokens, logprobs = self.sampler(logits, seqs)
            for seq, tok, lp in zip(seqs, tokens, logprobs):
                self._append_token(seq, tok, lp)
                touched[seq.request.request_id] = seq.request
        outs = []
        for rid, req in touched.items():
            outs.append(self._output(req))
            if req.is_finished:
                self.requests.pop(rid, None)
        return outs

    @staticmethod
    def _store_prompt_logprobs(chunk: PromptLogprobsChunk) -> None:
        req = chunk.request
        if req.prompt_logprobs is None or chunk.first != len(req.prompt_logprobs):
            log.error("request %s: prompt logprobs from %d do not follow the %d there; dropped",
                      req.request_id, chunk.first, len(req.prompt_logprobs or ()))
            return
        req.prompt_logprobs.extend(chunk.logprobs)
        req.prompt_token_ranks.extend(chunk.ranks)

    def _finish_unsampled(self, seq: Sequence) -> None:
        """``max_tokens=0``: the prompt is prefilled; every choice ends with "length", no tokens."""
        req = seq.request
        if not req.forked:
            req.forked = True
            for idx in range(1, req.params.n):
                child = self._new_seq(req, idx, seq.prefix_salt)
                child.finish_reason, child.status = "length", SeqStatus.FINISHED
                req.seqs.append(child)
        seq.finish_reason = "length"
        self.scheduler.finish(seq)

    def _append_token(self, seq: Sequence, tok: int, lp: dict[int, float] | None) -> None:
        req = seq.request
        p = req.params
        seq.token_ids.append(tok)
        if lp is not None:
            seq.logprobs.append(lp)
        reason, stop_reason = None, None
        # Before min_tokens no stop id or stop string ends the sequence (vLLM skips the checks).
        may_stop = seq.num_output_tokens >= p.min_tokens
        if seq.grammar is not None and self._grammar_ended(seq, tok):
            reason = "stop"
        elif may_stop and not p.ignore_eos and tok in req.eos_token_ids:
            reason, stop_reason = "stop", None
        elif may_stop and tok in p.stop_token_ids:
            reason, stop_reason = "stop", tok
        elif seq.num_tokens >= req.max_total_tokens:
            reason = "length"
        if seq.detok is not None:
            hit_eos = reason == "stop" and stop_reason is None and tok in req.eos_token_ids
            if not hit_eos or not p.skip_special_tokens:
                matched = seq.detok.add_token(tok, final=reason is not None, check_stop=may_stop)
                if matched is not None:
                    reason, stop_reason = "stop", matched
            if reason is not None and seq.detok.stopped_on is None:
                seq.detok.flush()
        if reason is not None:
            seq.finish_reason, seq.stop_reason = reason, stop_reason
            self.scheduler.finish(seq)

    def _grammar_ended(self, seq: Sequence, tok: int) -> bool:
        """Advance the sequence's matcher; True when nothing more may follow (it accepted a stop
        token, even under ``ignore_eos``) or, never expected under the mask, it rejected ``tok``.
        With a reasoning parser, thinking tokens move the gate, not the matcher."""
        if seq.think is not None:
            seq.think, answer = self.reasoning.advance(seq.think, tok)
            if not answer:
                return False
        if not seq.grammar.accept_token(tok):
            log.error("request %s: token %d rejected by its grammar; finishing it",
                      seq.request.request_id, tok)
            return True
        return seq.grammar.is_terminated()

    def _fail(self, request_ids: set[str], exc: BaseException) -> list[RequestOutput]:
        outs = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            req.error = exc
            out = self.abort(rid)
            if out is not None:
                out.error = exc
                outs.append(out)
        return outs

    def _output(self, req: Request) -> RequestOutput:
        comps = []
        for seq in req.seqs:
            text = seq.detok.visible_text(seq.is_finished) if seq.detok is not None else ""
            comps.append(CompletionOutput(index=seq.index, text=text, token_ids=seq.output_token_ids,
                                          finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                                          logprobs=list(seq.logprobs) if seq.logprobs is not None else None))
        return RequestOutput(request_id=req.request_id, prompt=req.prompt,
                             prompt_token_ids=req.prompt_token_ids, outputs=comps,
                             finished=req.is_finished, num_cached_tokens=req.seqs[0].num_cached_tokens,
                             error=req.error, prompt_logprobs=req.prompt_logprobs,
                             prompt_token_ranks=req.prompt_token_ranks)

    # -- introspection ---------------------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": self.kv.usage,
            "num_free_blocks": self.kv.pool.num_free_blocks,
            "num_kv_blocks": self.kv.pool.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": self.kv.stats.queries,
            "prefix_cache_hits": self.kv.stats.hits,
        }
