"""The HTTP service: the Starlette app, its routes, request parsing and error contract, and metrics.

`create_app(settings)` builds the app; its lifespan loads the `Predictor` once on the model
thread, warms it up and starts a `MicroBatcher` (the queue and the batching task live in
`batcher`). The endpoints are plain functions that read what they need from `app.state`:
`settings`, `metrics`, `batcher` (None until the model is warm) and `load_error`. `/metrics`
is written by `prometheus-client`, one registry per app.
"""

import asyncio
import contextlib
import gc
import json
import time

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .batcher import MicroBatcher, QueueFull, model_thread
from .config import ServeSettings
from .data import only_markup
from .predictor import Predictor

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
prometheus_client.disable_created_metrics()  # no `_created` series: the names stay those documented


class ServiceMetrics:
    """The service's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("sentiment_requests", "Requests answered, by status.", ["status"],
                                registry=self.registry)
        # By status: a 503's latency says nothing of a 200's.
        self.latency = Histogram("sentiment_request_seconds", "Seconds from request to answer, by status.",
                                 ["status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_sizes = Histogram("sentiment_batch_size", "Texts per model call.", buckets=BATCH_BUCKETS,
                                     registry=self.registry)
        self.queue_depth = Gauge("sentiment_queue_depth", "Texts waiting for the model.", registry=self.registry)
        self.texts_scored = Counter("sentiment_texts_scored", "Texts the model has scored.", registry=self.registry)

    def count_request(self, status, seconds):
        self.requests.labels(status=status).inc()
        self.latency.labels(status=status).observe(seconds)


def error(status, kind, message, headers=None):
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def overloaded():
    return error(503, "overloaded", "the queue is full; retry shortly", headers={"Retry-After": "1"})


class BadRequest(Exception):
    def __init__(self, status, kind, message):
        self.response = error(status, kind, message)


async def read_texts(request, settings):
    """The texts of a /predict body, or `BadRequest` naming what is wrong with it."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise BadRequest(415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json")
    too_large = BadRequest(413, "body_too_large", f"the body is over {settings.max_body_bytes} bytes "
                                                  f"(SENTIMENT_MAX_BODY_BYTES)")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
        raise too_large  # refused before reading; the stream check below catches bodies that lie
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > settings.max_body_bytes:
            raise too_large
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(400, "malformed_json", "the body is not valid JSON") from None
    if not isinstance(payload, dict) or ("text" in payload) == ("texts" in payload):
        raise BadRequest(422, "invalid_request", 'send {"text": "…"} or {"texts": ["…", …]}')
    single = "text" in payload
    texts = [payload["text"]] if single else payload["texts"]
    if not isinstance(texts, list) or not texts:
        raise BadRequest(422, "invalid_request", '"texts" must be a non-empty list of strings')
    if len(texts) > settings.max_texts:
        raise BadRequest(413, "too_many_texts", f"{len(texts)} texts in one request; the limit is "
                                                f"{settings.max_texts} (SENTIMENT_MAX_TEXTS): split the request")
    for i, text in enumerate(texts):
        where = "text" if single else f"texts[{i}]"
        if not isinstance(text, str):
            raise BadRequest(422, "invalid_request", f"{where} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise BadRequest(422, "empty_text", f"{where} is empty")
        if len(text) > settings.max_chars:
            raise BadRequest(413, "text_too_long", f"{where} has {len(text)} characters; the limit is "
                                                   f"{settings.max_chars} (SENTIMENT_MAX_CHARS)")
        if only_markup(text):
            raise BadRequest(422, "empty_text", f"{where} is only markup such as <br />: nothing to score")
    return texts, single


def load_predictor(settings):
    return Predictor(settings.model, device=settings.device, threads=settings.threads, precision=settings.precision,
                     batch_size=settings.max_batch_size, max_batch_tokens=settings.max_batch_tokens)


async def load_model(app, executor):
    """Load and warm the model on the model thread, then open the queue; a failure is kept for /health."""
    state, loop = app.state, asyncio.get_running_loop()
    try:
        predictor = await loop.run_in_executor(executor, state.predictor_factory, state.settings)
        await loop.run_in_executor(executor, predictor.probabilities, ["warm-up text"] * 2)
        # The libraries and the model are some 400k Python objects: a full garbage collection
        # over them stalls the event loop for about 0.2 s (measured), in the middle of a burst.
        # Frozen, they are never scanned again.
        gc.collect()
        gc.freeze()
        state.batcher = MicroBatcher(predictor, state.settings, state.metrics, executor)
        print(f"model loaded from {state.settings.model}: labels {predictor.labels}", flush=True)
    except Exception as err:
        state.load_error = f"{type(err).__name__}: {err}"
        print(f"could not load the model: {state.load_error}", flush=True)


@contextlib.asynccontextmanager
async def lifespan(app):
    print("sentiment service settings: " + json.dumps(app.state.settings.__dict__), flush=True)
    executor = model_thread()
    loader = asyncio.create_task(load_model(app, executor))
    yield
    loader.cancel()
    if app.state.batcher:
        await app.state.batcher.drain()
    executor.shutdown(wait=False)


async def predict(request):
    start = time.perf_counter()
    response = await answer(request)
    request.app.state.metrics.count_request(response.status_code, time.perf_counter() - start)
    return response


async def answer(request):
    state = request.app.state
    batcher, settings = state.batcher, state.settings
    if batcher is None:
        return error(503, "not_ready", state.load_error or "the model is still loading", headers={"Retry-After": "5"})
    # Refused before its body is read, and counting the bodies being read, so that a burst
    # costs a parse only for what fits in the queue: the overflow is answered at once.
    if batcher.room() < 1:
        return overloaded()
    batcher.reading += 1
    try:
        texts, single = await read_texts(request, settings)
    except BadRequest as bad:
        return bad.response
    except ClientDisconnect:
        return error(400, "client_disconnected", "the client went away")
    finally:
        batcher.reading -= 1
    scoring = asyncio.ensure_future(asyncio.wait_for(batcher.submit(texts), settings.request_timeout_s))
    gone = asyncio.ensure_future(client_gone(request))
    await asyncio.wait({scoring, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not scoring.done():  # cancelling it cancels the texts' futures: the batcher skips them
        scoring.cancel()
        return error(499, "client_disconnected", "the client went away")
    try:
        answers = scoring.result()
    except QueueFull:
        return overloaded()
    except TimeoutError:
        return error(504, "timeout", f"no answer within {settings.request_timeout_s} s (SENTIMENT_REQUEST_TIMEOUT_S)")
    except RuntimeError as err:
        return error(500, "model_error", str(err))
    return JSONResponse(answers[0] if single else {"predictions": answers})


async def client_gone(request):
    """Return once the client has disconnected (the body has been read, so nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def health(request):
    state = request.app.state
    if state.batcher is None:
        return error(503, "not_ready", state.load_error or "the model is still loading")
    return JSONResponse({"status": "ok", "model": state.settings.model, "labels": state.batcher.predictor.labels})


async def prometheus(request):
    state = request.app.state
    state.metrics.queue_depth.set(state.batcher.queue.qsize() if state.batcher else 0)
    return Response(prometheus_client.generate_latest(state.metrics.registry),
                    media_type=prometheus_client.CONTENT_TYPE_LATEST)


async def http_error(request, exc):
    return error(exc.status_code, "http_error", exc.detail)


async def server_error(request, exc):
    return error(500, "internal_error", "internal error; the service is still running")


ROUTES = [Route("/predict", predict, methods=["POST"]), Route("/health", health), Route("/metrics", prometheus)]


def create_app(settings=None, predictor_factory=None):
    """The Starlette app. `predictor_factory(settings)` builds the Predictor (tests pass their own)."""
    app = Starlette(routes=ROUTES, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.settings = settings or ServeSettings.from_env()
    app.state.predictor_factory = predictor_factory or load_predictor
    app.state.metrics = ServiceMetrics()
    app.state.batcher = None
    app.state.load_error = None
    return app
