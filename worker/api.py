"""The worker's HTTP app: OpenAI-compatible endpoints for every model of its VLLMManager.

Inference routes are served by :mod:`worker.front` (raw ASGI); this FastAPI app serves the rest."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from engine.sampling_params import InvalidParameter

from . import errors, serving
from .asgi import bearer_of, key_allowed
from .config import WorkerConfig
from .errors import APIError, BodyLimit, error_response
from .front import InferenceRoutes
from .media import MediaPolicy
from .metrics import WorkerMetrics
from .protocol import DetokenizeRequest, TokenizeRequest
from .vllm_manager import UnknownModel, VLLMManager

log = logging.getLogger("worker")


def bearer_checker(tokens: list[str]):
    """Dependency: with tokens configured, require ``Authorization: Bearer <one of them>``."""

    async def check(request: Request) -> None:
        if not tokens:
            return
        if not key_allowed(bearer_of(request.scope["headers"]), tokens):
            raise APIError(401, "missing or invalid bearer token", None, "invalid_api_key")

    return check


def entrypoint(app: FastAPI) -> InferenceRoutes:
    """The ASGI app to serve: the inference routes (raw ASGI, see :mod:`worker.front`) in front of
    ``app``, which serves everything else."""
    s = app.state
    return InferenceRoutes(app, manager=s.manager, metrics=s.metrics, media=s.media, tokens=s.tokens,
                           max_body_bytes=s.config.max_body_bytes)


def create_app(manager: VLLMManager, config: WorkerConfig, registrar=None) -> FastAPI:
    """Build the app for everything but inference (models, tokenize, health, metrics); serve it
    through :func:`entrypoint`. ``registrar`` (optional) joins the cluster on start-up, leaves on
    shutdown."""
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
    tokens = [config.worker_token] if config.worker_token else []
    app.state.manager, app.state.metrics, app.state.media, app.state.config = manager, metrics, media, config
    app.state.tokens = tokens
    errors.install(app)

    @app.exception_handler(InvalidParameter)
    async def _invalid(_: Request, e: InvalidParameter):
        return error_response(400, str(e), e.param)

    @app.exception_handler(UnknownModel)
    async def _unknown(_: Request, e: UnknownModel):
        return error_response(404, f"The model `{e.args[0]}` does not exist.", "model", "model_not_found")

    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    auth = Depends(bearer_checker(tokens))

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

    @app.post("/tokenize", dependencies=[auth])
    async def tokenize(req: TokenizeRequest):
        served = manager.get(req.model)
        if req.messages is not None:
            ids = serving.render_chat(served, req.messages, req.add_generation_prompt)
        elif req.prompt is not None:
            ids = served.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise APIError(400, "give prompt or messages", "prompt")
        return {"count": len(ids), "max_model_len": served.max_model_len, "tokens": ids}

    @app.post("/detokenize", dependencies=[auth])
    async def detokenize(req: DetokenizeRequest):
        served = manager.get(req.model)
        vocab = len(served.tokenizer)
        bad = [t for t in req.tokens if not 0 <= t < max(vocab, getattr(
            served.tokenizer, "vocab_size", 0))]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary", "tokens")
        return {"prompt": served.tokenizer.decode(req.tokens)}

    return app
