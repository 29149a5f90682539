"""Offline API mirroring ``vllm.LLM``."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import fields
from typing import Any

from tqdm.auto import tqdm

from .config import EngineConfig
from .outputs import RequestOutput
from .sampling_params import SamplingParams

PromptType = str | dict[str, Any]


class LLM:
    """``LLM(model=path, **engine_options)``; ``generate`` for causal LMs, ``embed`` for encoders.

    The kind of engine is picked from the model config: encoder-only models get the pooling
    engine, everything else the generation engine.
    """

    def __init__(self, model: str, **options: Any):
        from .pooling import PoolingEngine, is_embedding_model

        known = {f.name for f in fields(EngineConfig)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown engine options: {sorted(unknown)}")
        self.config = EngineConfig(model=model, **options)
        if is_embedding_model(model):
            self.engine = PoolingEngine(self.config)
        else:
            from .llm_engine import LLMEngine
            self.engine = LLMEngine(self.config)
        self._next_id = 0

    def _id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; results come back in prompt order."""
        if not hasattr(self.engine, "step"):
            raise TypeError("this model is an embedding model; use embed()")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        ids = []
        try:
            for prompt, sp in zip(prompts, sampling_params):
                rid = self._id()
                if isinstance(prompt, str):
                    self.engine.add_request(rid, prompt=prompt, params=sp)
                else:
                    token_ids, mm = prompt.get("prompt_token_ids"), None
                    images = prompt.get("multi_modal_data", {}).get("image")
                    if images is not None:  # vLLM's shape: {"prompt": ..., "multi_modal_data": {"image": [...]}}
                        token_ids, mm = self._images(prompt, images)
                    self.engine.add_request(rid, prompt=prompt.get("prompt"), prompt_token_ids=token_ids,
                                            params=sp, mm=mm)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), disable=not use_tqdm, desc="generate")
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
                if out.error is not None:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}") from out.error
        bar.close()
        return [results[r] for r in ids]

    def _images(self, prompt: dict, images):
        """Encode PIL images of a prompt dict; placeholders in the prompt are expanded."""
        import io

        from .multimodal import ImagePreprocessor

        if not isinstance(images, (list, tuple)):
            images = [images]
        if getattr(self, "_pre", None) is None:
            self._pre = ImagePreprocessor(self.config.model, self.engine.runner.hf_config)
        raw = []
        for im in images:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            raw.append(buf.getvalue())
        mm = self._pre(list(images), raw)
        ids = prompt.get("prompt_token_ids")
        if ids is None:
            ids = self.engine.tokenizer.encode(prompt["prompt"], add_special_tokens=False)
        return self._pre.expand(list(ids), mm), mm

    def embed(self, texts: str | Seq[str]) -> list[list[float]]:
        """Embedding vectors, one per text (pooling and normalisation as the model's config says)."""
        if not hasattr(self.engine, "embed"):
            raise TypeError("this model is a generation model; use generate()")
        if isinstance(texts, str):
            texts = [texts]
        return [o.embedding for o in self.engine.embed(list(texts))]
