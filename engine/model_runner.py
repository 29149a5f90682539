"""Runs one packed forward pass per step over the paged KV cache."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from . import attention, cpu_kernels, cpu_linear, fused_layers, host_memory
from .attention import AttentionMetadata, DecodeGroup, PrefillSpan, group_by_length
from .config import EngineConfig
from .cpu_kernels import PagedDecodeKernel
from .kv_budget import KVRequest, kv_budgets
from .model_loader import check_source, load_error, resolve_device, resolve_dtype
from .multimodal import VisionAdapter, is_vision_language
from .scheduler import ScheduledSeq, SchedulerOutput
from .sequence import Request

log = logging.getLogger(__name__)

# Prompt logprobs: rows of hidden states taken through the LM head at a time, each slice reduced
# to its few numbers before the next (a 4k-token prompt never holds [4k, vocab] logits).
PROMPT_LOGPROB_SLICE = 256


@dataclass
class PromptSpan:
    """Packed rows ``[row, row + len(targets))`` of one step predict prompt tokens
    ``first, first + 1, ...`` (``targets``) of ``request``, which wants the top ``k``."""

    request: Request
    row: int
    first: int
    targets: list[int]
    k: int


@dataclass
class PromptLogprobsChunk:
    """Prompt logprobs computed in one step: entries ``first, first + 1, ...`` of the request's
    ``prompt_logprobs`` / ``prompt_token_ranks``."""

    request: Request
    first: int
    logprobs: list[dict[int, float]]
    ranks: list[int]


@dataclass
class StepOutput:
    """What one forward pass produced: the batch order, float32 logits of the sequences that
    complete (in that order), and the prompt logprobs of requests that asked for them."""

    order: list[ScheduledSeq]
    logits: torch.Tensor
    prompt_logprobs: list[PromptLogprobsChunk] = field(default_factory=list)


def prompt_spans(order: list[ScheduledSeq]) -> list[PromptSpan]:
    """The rows of this step whose logits give prompt logprobs still missing (none twice: a
    recomputed prefix, after preemption, only fills what is not there yet)."""
    spans = []
    t = 0
    for s in order:
        req = s.seq.request
        if req is not None and req.needs_prompt_logprobs:
            # Row of position q predicts prompt token q + 1; entries up to len(...) - 1 exist.
            lo = max(s.start, len(req.prompt_logprobs) - 1)
            hi = min(s.start + s.num_new_tokens, s.seq.num_prompt_tokens - 1)
            if lo < hi:
                spans.append(PromptSpan(req, t + lo - s.start, lo + 1, s.seq.token_ids[lo + 1:hi + 1],
                                        req.params.prompt_logprobs))
        t += s.num_new_tokens
    return spans


class ModelRunner:
    """Owns the model weights and the KV cache tensors of one engine."""

    def __init__(self, config: EngineConfig):
        self.config = config
        check_source(config.model)
        try:
            self.hf_config = AutoConfig.from_pretrained(config.model,
                                                        trust_remote_code=config.trust_remote_code)
        except Exception as e:  # transformers raises OSError/ValueError variants
            raise load_error(config.model, e) from e
        self.device = resolve_device(config.device)
        if self.device.type == "cpu" and config.keep_freed_memory:
            host_memory.keep_freed_memory()
        self.dtype = resolve_dtype(config.dtype, self.hf_config, self.device)
        impl = attention.register()
        self.is_vl = is_vision_language(self.hf_config)
        try:
            if self.is_vl:  # paged attention for the language model, sdpa for the vision tower
                model = AutoModelForImageTextToText.from_pretrained(
                    config.model, dtype=self.dtype, trust_remote_code=config.trust_remote_code,
                    attn_implementation={"text_config": impl, "vision_config": "sdpa", "": impl})
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    config.model, dtype=self.dtype, attn_implementation=impl,
                    trust_remote_code=config.trust_remote_code)
        except Exception as e:
            raise load_error(config.model, e) from e
        self.model = model.to(self.device).eval()
        # The CPU kernels of engine/csrc, built (once per machine) and loaded once per engine.
        self.kernels = (cpu_kernels.load_all() if self.device.type == "cpu"
                        else cpu_kernels.CpuKernels(None, None, None))
        gemm = (self.kernels.gemm if self.dtype == torch.bfloat16 and config.cpu_linear in ("auto", "amx")
                else None)
        self.linear_mode = cpu_linear.choose_mode(config.cpu_linear, self.dtype, self.device,
                                                  amx_available=gemm is not None)
        if self.linear_mode in ("fp32", "amx"):
            n = cpu_linear.adapt_linears(self.model, self.linear_mode, gemm)
            log.info("%s: %d %s linear layers run %s (engine/cpu_linear.py)", config.model, n, self.dtype,
                     "batches of up to 32 rows on AMX" if self.linear_mode == "amx" else "float32 GEMMs")
        self.fused_layers = 0  # decoder layers running engine/fused_layers.py's forward
        if config.fuse_layers and self.kernels.fused is not None:
            self.fused_layers = fused_layers.install(self.model, self.dtype, self.kernels.fused,
                                                     gemm if self.linear_mode == "amx" else None)
            if self.fused_layers:
                log.info("%s: %d decoder layers run fused (engine/fused_layers.py)", config.model,
                         self.fused_layers)
        self.vision = VisionAdapter(self.model, self.hf_config) if self.is_vl else None
        text_cfg = self.hf_config.get_text_config()
        self.num_layers = text_cfg.num_hidden_layers
        self.num_kv_heads = getattr(text_cfg, "num_key_value_heads", None) or text_cfg.num_attention_heads
        self.head_dim = getattr(text_cfg, "head_dim", None) or (
            text_cfg.hidden_size // text_cfg.num_attention_heads)
        self.vocab_size = text_cfg.vocab_size
        self.final_logit_softcapping = getattr(text_cfg, "final_logit_softcapping", None)
        self.max_position_embeddings = getattr(text_cfg, "max_position_embeddings", None)
        self.block_size = config.block_size
        self.kv_caches: list[torch.Tensor] = []
        self.triton = None  # engine.triton_attention where the Triton kernels run this model's attention
        self.decode_kernel = self._decode_kernel(config.attention_backend, text_cfg.num_attention_heads)

    def _decode_kernel(self, backend: str, n_heads: int) -> Callable | None:
        """The native CPU decode kernel, the Triton one (CUDA, or asked for), or None for the torch
        gather path. CPU, B=16 contexts of 700, bf16, 2 cores: native 3.3 ms vs torch 10 ms."""
        if backend == "triton" or (backend == "auto" and self.device.type == "cuda"):
            return self._triton_kernel(backend == "triton", n_heads)
        fits = self.device.type == "cpu" and PagedDecodeKernel.supports(
            self.dtype, n_heads, self.num_kv_heads, self.head_dim)
        if backend == "torch" or (backend == "auto" and not fits):
            return None
        if not fits:
            raise ValueError(f"attention_backend 'native' needs a CPU device and a supported shape "
                             f"(device={self.device}, dtype={self.dtype}, heads={n_heads}/"
                             f"{self.num_kv_heads}, head_dim={self.head_dim})")
        kernel = self.kernels.decode
        if kernel is None and backend == "native":
            raise ValueError("attention_backend 'native': the CPU kernel could not be built (see log)")
        return kernel

    def _triton_kernel(self, required: bool, n_heads: int) -> Callable | None:
        """The Triton decode kernel; with it the KV write and prefill attention run as Triton
        kernels too (``self.triton``). On CPU Triton runs only in its interpreter (tests). Where
        Triton cannot serve and it was not asked for by name, None: the torch path."""
        try:
            from . import triton_attention
        except Exception as e:  # triton missing, or broken in this image (not only ImportError)
            if required:
                raise ValueError(f"attention_backend 'triton': triton cannot be imported ({e})") from e
            log.warning("triton cannot be imported (%s): attention uses the torch path", e)
            return None
        problem = None
        if not triton_attention.supports(self.dtype, n_heads, self.num_kv_heads, self.head_dim):
            problem = (f"unsupported shape (dtype={self.dtype}, heads={n_heads}/{self.num_kv_heads}, "
                       f"head_dim={self.head_dim})")
        elif self.device.type not in ("cuda", "cpu"):
            problem = f"no Triton kernels for device {self.device}"
        elif self.device.type == "cpu" and not triton_attention.INTERPRETED:
            problem = "on CPU Triton runs only in its interpreter: set TRITON_INTERPRET=1 before the engine starts"
        if problem:
            if required:
                raise ValueError(f"attention_backend 'triton': {problem}")
            log.warning("Triton attention: %s; attention uses the torch path", problem)
            return None
        self.triton = triton_attention
        return triton_attention.TritonDecodeKernel()

    # -- KV cache --------------------------------------------------------------------------------
    @property
    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def decide_num_blocks(self) -> int:
        """Blocks from an explicit count, else from the budget :func:`kv_budgets` gives a lone
        model (an explicit byte budget, CUDA free memory, or the CPU default)."""
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        budget = kv_budgets(self.device, {"model": KVRequest(cfg.kv_cache_memory)},
                            cfg.gpu_memory_utilization)["model"]
        n = budget // self.bytes_per_block
        if n < 1:
            raise ValueError(f"KV cache budget of {budget} bytes is smaller than one block "
                             f"({self.bytes_per_block} bytes)")
        return int(n)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        slots = num_blocks * self.block_size
        # K and V of a slot side by side: one gather fetches both. Zeroed, because padded
        # gathers read slot 0 and garbage there could be NaN (masked scores still multiply V).
        shape = (slots, 2, self.num_kv_heads, self.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(self.num_layers)]

    def clear_kv_cache(self) -> None:
        """Zero every KV block (after the engine's warm-up wrote some)."""
        for kv in self.kv_caches:
            kv.zero_()

    @property
    def interpreted(self) -> bool:
        """Whether attention runs in Triton's CPU interpreter (tests): far too slow to warm up."""
        return self.triton is not None and self.device.type == "cpu"

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (every layer) from src to dst."""
        if not pairs:
            return
        bs = self.block_size
        src = torch.tensor([s * bs + i for s, _ in pairs for i in range(bs)], device=self.device)
        dst = torch.tensor([d * bs + i for _, d in pairs for i in range(bs)], device=self.device)
        for kv in self.kv_caches:
            kv.index_copy_(0, dst, kv.index_select(0, src))

    # -- forward ---------------------------------------------------------------------------------
    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, sched: SchedulerOutput) -> tuple[list[ScheduledSeq], torch.Tensor, torch.Tensor,
                                                       AttentionMetadata, list[int]]:
        """Order the batch (single-token queries first) and build the step's tensors."""
        dev = self.device
        # Single-token queries sorted by context length, so similar lengths share a padded gather.
        singles = sorted((s for s in sched.scheduled if s.num_new_tokens == 1), key=lambda s: s.start)
        multis = [s for s in sched.scheduled if s.num_new_tokens > 1]
        order = singles + multis
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        for s in order:
            a, b = s.start, s.start + s.num_new_tokens
            ids += s.seq.token_ids[a:b]
            pos += range(a, b)
            slots += self._slots(s.seq.block_table, a, b)
        meta = AttentionMetadata(kv_caches=self.kv_caches,
                                 slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
                                 block_size=self.block_size)
        if self.triton is not None:
            meta.kv_write = self.triton.write_kv
        lens = [s.start + 1 for s in singles]
        if self.decode_kernel is not None and singles:
            nblk = -(-max(lens) // self.block_size)
            meta.decode_kernel, meta.num_decodes = self.decode_kernel, len(singles)
            meta.decode_tables = torch.tensor(self._padded_tables(singles, nblk), dtype=torch.int32, device=dev)
            meta.decode_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
        else:
            for a, b in group_by_length(lens):
                meta.decodes.append(self._decode_group(singles[a:b], lens[a:b], a))
        t = len(singles)
        if self.triton is not None and multis:  # one varlen kernel call per layer instead of spans
            meta.prefill_kernel = self.triton.prefill_attention
            meta.prefill_batch = self._prefill_batch(multis, t)
        for s in multis if meta.prefill_kernel is None else ():
            n = s.num_new_tokens
            span = PrefillSpan(start=t, end=t + n, ctx_start=s.start)
            if s.start > 0:
                total = s.start + n
                span.gather_idx = torch.tensor(self._slots(s.seq.block_table, 0, total),
                                               dtype=torch.long, device=dev)
                q_pos = torch.arange(s.start, total, device=dev).unsqueeze(1)
                span.mask = torch.arange(total, device=dev).unsqueeze(0) <= q_pos
            meta.prefills.append(span)
            t += n
        # Row of the last token of each sequence that completes this step (its logits get sampled).
        logit_rows: list[int] = []
        t = 0
        for s in order:
            t += s.num_new_tokens
            if s.completes:
                logit_rows.append(t - 1)
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        positions = torch.tensor([pos], dtype=torch.long, device=dev)
        return order, input_ids, positions, meta, logit_rows

    def _prefill_batch(self, multis: list[ScheduledSeq], row: int):
        """The Triton prefill kernel's metadata for the multi-token queries from packed ``row`` on."""
        spans = []
        for s in multis:
            spans.append((row, s.num_new_tokens, s.start, s.seq.block_table))
            row += s.num_new_tokens
        return self.triton.PrefillBatch.build(spans, self.block_size, self.device)

    @staticmethod
    def _padded_tables(group: list[ScheduledSeq], nblk: int) -> list[list[int]]:
        """The first ``nblk`` block ids of each sequence, padded with block 0 (never read)."""
        return [s.seq.block_table[:nblk] + [0] * (nblk - len(s.seq.block_table[:nblk])) for s in group]

    def _decode_group(self, group: list[ScheduledSeq], lens: list[int], start: int) -> DecodeGroup:
        dev, bs = self.device, self.block_size
        lmax = max(lens)
        nblk = -(-lmax // bs)
        tables = torch.tensor(self._padded_tables(group, nblk), dtype=torch.long, device=dev)
        gather = (tables.unsqueeze(-1) * bs + torch.arange(bs, device=dev)).reshape(len(group), -1)
        ctx = torch.tensor(lens, dtype=torch.long, device=dev)
        valid = torch.arange(lmax, device=dev).unsqueeze(0) < ctx.unsqueeze(1)
        return DecodeGroup(start=start, end=start + len(group),
                           gather_idx=gather[:, :lmax].masked_fill(~valid, 0).reshape(-1),
                           mask=valid[:, None, None, :], ctx_lens=ctx)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepOutput:
        """Run the step: the batch order, float32 logits for sequences that complete (in that
        order), and the step's prompt logprobs."""
        self.copy_blocks(sched.blocks_to_copy)
        order, input_ids, positions, meta, rows = self.prepare(sched)
        spans = prompt_spans(order)
        if self.vision is None and not spans:  # the fast path: the LM head only for sampled rows
            keep = torch.tensor(rows or [input_ids.shape[1] - 1], device=self.device)
            out = self.model(input_ids=input_ids, position_ids=positions, paged_attn=meta,
                             use_cache=False, logits_to_keep=keep)
            return StepOutput(order, out.logits[0, :len(rows)].float())
        if self.vision is not None:
            hidden = self._execute_vl(order, input_ids, meta)
        else:
            hidden = self.model.get_decoder()(input_ids=input_ids, position_ids=positions, paged_attn=meta,
                                              use_cache=False).last_hidden_state[0]
        logits = self._lm_head(hidden[torch.tensor(rows, dtype=torch.long, device=self.device)])
        return StepOutput(order, logits, [self._prompt_logprobs(hidden, sp) for sp in spans])

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of hidden-state rows, as the model's own forward computes them."""
        logits = self.model.get_output_embeddings()(hidden).float()
        if self.final_logit_softcapping:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _prompt_logprobs(self, hidden: torch.Tensor, span: PromptSpan) -> PromptLogprobsChunk:
        """Logprob, rank and top-k of each target, the LM head applied a slice of rows at a time."""
        targets = torch.tensor(span.targets, dtype=torch.long, device=self.device)
        values: list[float] = []
        ranks: list[int] = []
        top_v: list[list[float]] = []
        top_i: list[list[int]] = []
        for a in range(0, len(span.targets), PROMPT_LOGPROB_SLICE):
            b = min(a + PROMPT_LOGPROB_SLICE, len(span.targets))
            lsm = torch.log_softmax(self._lm_head(hidden[span.row + a:span.row + b]), dim=-1)
            val = lsm.gather(1, targets[a:b].unsqueeze(1))
            ranks += ((lsm > val).sum(dim=-1) + 1).tolist()
            values += val.squeeze(1).tolist()
            if span.k:
                tv, ti = lsm.topk(span.k, dim=-1)
                top_v += tv.tolist()
                top_i += ti.tolist()
            del lsm
        entries = []
        for j, (tok, lp) in enumerate(zip(span.targets, values)):
            d = {tok: lp}
            for i, v in zip(top_i[j] if span.k else (), top_v[j] if span.k else ()):
                d.setdefault(i, v)
            entries.append(d)
        return PromptLogprobsChunk(span.request, span.first, entries, ranks)

    def _execute_vl(self, order: list[ScheduledSeq], input_ids: torch.Tensor,
                    meta: AttentionMetadata) -> torch.Tensor:
        """Packed forward of a vision-language model (image rows merged, M-RoPE positions) to the
        last hidden states, [T, H]."""
        vis = self.vision
        # Vision tower for every request whose image tokens are computed for the first time.
        need = []
        for s in order:
            mm = s.seq.request.mm if s.seq.request is not None else None
            if mm is not None and mm.embeds is None and mm not in need:
                need.append(mm)
        vis.encode(need, self.device, self.dtype)
        embeds = self.model.get_input_embeddings()(input_ids)  # [1, T, H]
        pos_parts = []
        visual_rows: list[torch.Tensor] = []
        deep_parts: list[list[torch.Tensor]] = []
        t = 0
        for s in order:
            a, b = s.start, s.start + s.num_new_tokens
            seq = s.seq
            mm = seq.request.mm if seq.request is not None else None
            pos_parts.append(vis.positions(mm, a, b, seq.num_prompt_tokens, self.device))
            if mm is not None and a < seq.num_prompt_tokens:
                cum = mm.extra["cum"]
                first, last = cum[a], cum[min(b, seq.num_prompt_tokens)]
                if last > first:
                    ids = input_ids[0, t:t + (b - a)]
                    rows = (ids == vis.image_token_id).nonzero().squeeze(1) + t
                    embeds[0, rows] = mm.embeds[first:last].to(embeds.dtype)
                    if "deepstack" in mm.extra:
                        visual_rows.append(rows)
                        deep_parts.append([d[first:last] for d in mm.extra["deepstack"]])
            t += b - a
        positions = torch.cat(pos_parts, dim=1).unsqueeze(1)  # [3, 1, T]
        extra = {}
        if visual_rows:  # rows were collected in ascending order, as the mask enumerates them
            mask = torch.zeros(1, input_ids.shape[1], dtype=torch.bool, device=self.device)
            mask[0, torch.cat(visual_rows)] = True
            extra = {"visual_pos_masks": mask,
                     "deepstack_visual_embeds": [torch.cat(layer) for layer in zip(*deep_parts)]}
        hidden = self.model.model.language_model(inputs_embeds=embeds, position_ids=positions,
                                                 paged_attn=meta, use_cache=False, **extra).last_hidden_state
        return hidden[0]
