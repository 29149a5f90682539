"""Pooling engine for embedding models (sentence-transformers style)."""

from __future__ import annotations

import json
import os

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from .config import EngineConfig
from .model_loader import check_source, load_error, resolve_device, resolve_dtype
from .outputs import EmbeddingOutput


def is_embedding_model(path: str) -> bool:
    """Encoder-only configs (BERT and friends) or a sentence-transformers layout."""
    if os.path.isfile(os.path.join(path, "modules.json")):
        return True
    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception:
        return False
    archs = getattr(cfg, "architectures", None) or []
    return not getattr(cfg, "is_decoder", False) and not any("CausalLM" in a or "ConditionalGeneration" in a
                                                             for a in archs) and cfg.model_type in (
        "bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "deberta-v2", "nomic_bert")


def _sentence_transformers_settings(path: str) -> tuple[str, bool, int | None]:
    """(pooling mode, normalize, max_seq_length) from the model's sentence-transformers files."""
    mode, normalize, max_len = "mean", False, None
    modules_file = os.path.join(path, "modules.json")
    if os.path.isfile(modules_file):
        with open(modules_file) as f:
            modules = json.load(f)
        for m in modules:
            typ = m.get("type", "")
            if typ.endswith("Pooling"):
                pcfg = os.path.join(path, m.get("path", ""), "config.json")
                if os.path.isfile(pcfg):
                    with open(pcfg) as f:
                        pc = json.load(f)
                    if pc.get("pooling_mode_cls_token"):
                        mode = "cls"
                    elif pc.get("pooling_mode_lasttoken"):
                        mode = "last"
                    elif pc.get("pooling_mode_max_tokens"):
                        mode = "max"
                    else:
                        mode = "mean"
            elif typ.endswith("Normalize"):
                normalize = True
    sb = os.path.join(path, "sentence_bert_config.json")
    if os.path.isfile(sb):
        with open(sb) as f:
            max_len = json.load(f).get("max_seq_length")
    return mode, normalize, max_len


class PoolingEngine:
    """Batched encoder forward plus pooling; requests are independent, so no KV cache."""

    def __init__(self, config: EngineConfig, max_batch_size: int = 32):
        self.config = config
        check_source(config.model)
        try:
            self.hf_config = AutoConfig.from_pretrained(config.model)
            self.tokenizer = AutoTokenizer.from_pretrained(config.model)
            self.device = resolve_device(config.device)
            self.dtype = resolve_dtype(config.dtype, self.hf_config, self.device)
            self.model = AutoModel.from_pretrained(config.model, dtype=self.dtype).to(self.device).eval()
        except Exception as e:
            raise load_error(config.model, e) from e
        self.pooling, self.normalize, st_max = _sentence_transformers_settings(config.model)
        limit = st_max or getattr(self.hf_config, "max_position_embeddings", 512)
        self.max_model_len = min(config.max_model_len or limit, limit)
        self.max_batch_size = max_batch_size
        self.hidden_size = self.hf_config.hidden_size

    def validate(self, token_ids: list[int]) -> None:
        from .sampling_params import InvalidParameter
        if not token_ids:
            raise InvalidParameter("input", "input must contain at least one token")
        if len(token_ids) > self.max_model_len:
            raise InvalidParameter("input", f"this model's maximum context length is "
                                            f"{self.max_model_len} tokens; the input has {len(token_ids)}")

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    @torch.inference_mode()
    def embed_token_ids(self, batch: list[list[int]]) -> list[list[float]]:
        out: list[list[float]] = []
        pad = self.tokenizer.pad_token_id or 0
        for i in range(0, len(batch), self.max_batch_size):
            chunk = batch[i:i + self.max_batch_size]
            width = max(len(t) for t in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, t in enumerate(chunk):
                ids[j, :len(t)] = torch.tensor(t)
                mask[j, :len(t)] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            m = mask.unsqueeze(-1).to(hidden.dtype)
            if self.pooling == "cls":
                vec = hidden[:, 0]
            elif self.pooling == "last":
                vec = hidden[torch.arange(len(chunk)), mask.sum(1) - 1]
            elif self.pooling == "max":
                vec = hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
            else:
                vec = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
            if self.normalize:
                vec = torch.nn.functional.normalize(vec, dim=-1)
            out += vec.tolist()
        return out

    def embed(self, texts: list[str]) -> list[EmbeddingOutput]:
        ids = [self.tokenize(t) for t in texts]
        for t in ids:
            self.validate(t)
        vecs = self.embed_token_ids(ids)
        return [EmbeddingOutput(request_id=str(i), embedding=v, num_prompt_tokens=len(t))
                for i, (v, t) in enumerate(zip(vecs, ids))]
