"""The worker's HTTP app: OpenAI-compatible endpoints for every model of its VLLMManager."""

from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from . import errors, serving
from .config import WorkerConfig
from engine.sampling_params import InvalidParameter

from .errors import APIError, BodyLimit, ClientDisconnected, error_response, unless_disconnected
from .media import MediaPolicy
from .metrics import WorkerMetrics
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest,
                       TokenizeRequest)
from .vllm_manager import ServedModel, UnknownModel, VLLMManager

log = logging.getLogger("worker")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def bearer_checker(tokens: list[str]):
    """Dependency: with tokens configured, require ``Authorization: Bearer <one of them>``."""

    async def check(request: Request) -> None:
        if not tokens:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(given.encode(), t.encode()) for t in tokens):
            raise APIError(401, "missing or invalid bearer token", None, "invalid_api_key")

    return check


async def until_disconnect(request: Request, coro):
    """Await ``coro``; if the client goes away first, abort it and answer 499 (nobody reads it)."""
    try:
        return await unless_disconnected(request, coro)
    except ClientDisconnected:
        return Response(status_code=499)


def create_app(manager: VLLMManager, config: WorkerConfig, registrar=None) -> FastAPI:
    """Build the app. ``registrar`` (optional) joins the cluster on start-up, leaves on shutdown."""
    metrics = WorkerMetrics(manager.load_report)
    media = MediaPolicy(media_dirs=list(config.media_dirs), allowed_domains=list(config.allowed_image_domains),
                        max_image_bytes=config.max_image_bytes, max_image_pixels=config.max_image_pixels)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if registrar is not None:
            await registrar.start()
        log.info("worker ready: models=%s listening on %s:%d%s", list(manager.models), config.host,
                 config.port, f" public_url={config.public_url}" if config.public_url else "")
        try:
            yield
        finally:
            if registrar is not None:
                await registrar.stop()
            manager.shutdown()

    app = FastAPI(title="llm-cluster worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.manager, app.state.metrics = manager, metrics
    errors.install(app)

    @app.exception_handler(InvalidParameter)
    async def _invalid(_: Request, e: InvalidParameter):
        return error_response(400, str(e), e.param)

    @app.exception_handler(UnknownModel)
    async def _unknown(_: Request, e: UnknownModel):
        return error_response(404, f"The model `{e.args[0]}` does not exist.", "model", "model_not_found")

    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    auth = Depends(bearer_checker([config.worker_token] if config.worker_token else []))

    def model_of(name: str, kind: str | None = None) -> ServedModel:
        served = manager.get(name)
        if kind == "generate" and served.kind != "generate":
            raise APIError(400, f"model {name!r} is an embedding model; use /v1/embeddings", "model")
        if kind == "embed" and served.kind != "embed":
            raise APIError(400, f"model {name!r} does not produce embeddings", "model")
        return served

    @app.get("/health")
    async def health():
        if not manager.healthy:
            return error_response(503, "an engine is dead", None)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prom():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[auth])
    async def models():
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created or int(time.time()),
             "owned_by": "llm-cluster", "root": m.source, "max_model_len": m.max_model_len,
             "kind": m.kind} for m in manager.models.values()]}

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat(req: ChatCompletionRequest, request: Request):
        served = model_of(req.model, "generate")
        ids, params, mm = await serving.prepare_chat(served, req, media)
        if req.stream:
            return StreamingResponse(serving.chat_stream(served, req, ids, params, metrics, mm),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        return await until_disconnect(request, serving.chat_full(served, req, ids, params, metrics, mm))

    @app.post("/v1/completions", dependencies=[auth])
    async def completions(req: CompletionRequest, request: Request):
        served = model_of(req.model, "generate")
        items = serving.prepare_completion(served, req)
        if req.stream:
            return StreamingResponse(serving.completion_stream(served, req, items, metrics),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        return await until_disconnect(request, serving.completion_full(served, req, items, metrics))

    @app.post("/v1/embeddings", dependencies=[auth])
    async def embeddings(req: EmbeddingRequest, request: Request):
        served = model_of(req.model, "embed")
        return await until_disconnect(request, serving.embeddings(served, req))

    @app.post("/tokenize", dependencies=[auth])
    async def tokenize(req: TokenizeRequest):
        served = model_of(req.model)
        if req.messages is not None:
            ids = serving.render_chat(served, req.messages, req.add_generation_prompt)
        elif req.prompt is not None:
            ids = served.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise APIError(400, "give prompt or messages", "prompt")
        return {"count": len(ids), "max_model_len": served.max_model_len, "tokens": ids}

    @app.post("/detokenize", dependencies=[auth])
    async def detokenize(req: DetokenizeRequest):
        served = model_of(req.model)
        vocab = len(served.tokenizer)
        bad = [t for t in req.tokens if not 0 <= t < max(vocab, getattr(
            served.tokenizer, "vocab_size", 0))]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary", "tokens")
        return {"prompt": served.tokenizer.decode(req.tokens)}

    return app
