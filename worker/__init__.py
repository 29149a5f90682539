"""A worker: a VLLMManager of engines, one per model, behind an OpenAI-compatible API, joined to the cluster."""
