"""The worker's HTTP app: OpenAI-compatible endpoints for every model of its VLLMManager.

Inference routes are served by :mod:`worker.front` (raw ASGI); this FastAPI app serves the rest."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from clusterkit.asgi import install_error_handlers
from clusterkit.auth import require_bearer
from clusterkit.errors import APIError
from clusterkit.http_options import package_version, with_server_options

from . import tokenization, tokenizer_info
from .config import WorkerConfig
from .errors import ERRORS
from .front import InferenceRoutes, RequestLog
from .media import MediaPolicy
from .metrics import WorkerMetrics
from .openapi import publish_openapi
from .protocol import DetokenizeRequest, TokenizeRequest
from .vllm_manager import VLLMManager

log = logging.getLogger("worker")


def entrypoint(app: FastAPI):
    """The ASGI app to serve: the inference routes (raw ASGI, see :mod:`worker.front`) in front of
    ``app``, which serves everything else, inside the layers the server options turn on (CORS,
    root path, request ids: :mod:`clusterkit.http_options`)."""
    s, cfg = app.state, app.state.config
    routes = InferenceRoutes(app, manager=s.manager, metrics=s.metrics, media=s.media, tokens=s.tokens,
                             max_body_bytes=cfg.max_body_bytes, root_path=cfg.root_path,
                             request_log=RequestLog(cfg.max_log_len) if cfg.enable_log_requests else None,
                             body_timeout=cfg.body_timeout)
    return with_server_options(routes, cfg)


def create_app(manager: VLLMManager, config: WorkerConfig, registrar=None, kv_publisher=None) -> FastAPI:
    """Build the app for everything but inference (models, tokenize, health, metrics); serve it
    through :func:`entrypoint`. ``registrar`` (optional) joins the cluster on start-up, leaves on
    shutdown; ``kv_publisher`` (optional, :mod:`worker.kv_publisher`) posts KV events meanwhile."""
    metrics = WorkerMetrics(manager.load_report)
    media = MediaPolicy(media_dirs=list(config.media_dirs), allowed_domains=list(config.allowed_image_domains),
                        max_image_bytes=config.max_image_bytes, max_image_pixels=config.max_image_pixels)
    tokens = [config.worker_token] if config.worker_token else []

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            await manager.renderer.start()  # chat templates render in these processes
        except BaseException:
            manager.shutdown()
            raise
        if registrar is not None:
            await registrar.start()
        if kv_publisher is not None:
            await kv_publisher.start()
        log.info("worker ready: models=%s listening on %s:%d%s", list(manager.models), config.host,
                 config.port, f" public_url={config.public_url}" if config.public_url else "")
        try:
            yield
        finally:
            if kv_publisher is not None:
                await kv_publisher.stop()
            if registrar is not None:
                await registrar.stop()
            manager.shutdown()
            manager.renderer.stop()

    app = FastAPI(title="llm-cluster worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.manager, app.state.metrics, app.state.media, app.state.config = manager, metrics, media, config
    app.state.tokens = tokens
    install_error_handlers(app, ERRORS, config.max_body_bytes, config.body_timeout)
    publish_openapi(app)  # the inference routes (worker/front.py) in /openapi.json too

    async def check(request: Request) -> None:
        require_bearer(request.scope["headers"], tokens, "missing or invalid bearer token")

    auth = Depends(check)

    @app.get("/health")
    async def health():
        if not manager.healthy:
            raise APIError(503, "an engine is dead")
        return {"status": "ok"}

    app.add_api_route("/ping", health, methods=["GET", "POST"])  # vLLM's (SageMaker's) health check

    @app.get("/version")
    async def version():
        return {"version": package_version()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prom():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[auth])
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": m.created, "owned_by": "llm-cluster", "root": m.source,
             "parent": None, "max_model_len": m.max_model_len, "kind": m.kind}
            for m in manager.models.values() for name in m.names]}

    @app.post("/tokenize", dependencies=[auth])
    async def tokenize(req: TokenizeRequest):
        return await tokenization.tokenize(manager.get(req.model), req)

    @app.post("/detokenize", dependencies=[auth])
    async def detokenize(req: DetokenizeRequest):
        return tokenization.detokenize(manager.get(req.model), req)

    @app.get("/tokenizer_info", dependencies=[auth])
    async def tokenizer_info_of(model: str):
        """What a router needs to compute this model's prompt token ids (worker/tokenizer_info.py)."""
        served = manager.get(model)
        try:  # serialized here, on the thread whose encodes may mutate the tokenizer; the JSON work in a thread
            raw = tokenizer_info.backend_json(served.tokenizer)
        except tokenizer_info.NoTokenizerJSON as e:
            raise APIError(404, f"model {model!r}: {e}", "model", "tokenizer_unavailable") from None
        return Response(await asyncio.to_thread(tokenizer_info.encoded, served, raw), media_type="application/json")

    return app
