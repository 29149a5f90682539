"""Our own paged-KV, continuous-batching inference engine on top of torch and transformers."""

from .config import EngineConfig
from .llm import LLM
from .outputs import CompletionOutput, EmbeddingOutput, RequestOutput
from .sampling_params import InvalidParameter, SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput",
           "EmbeddingOutput", "InvalidParameter", "StructuredOutputsParams"]
