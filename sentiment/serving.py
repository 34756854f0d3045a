"""The HTTP service: the Starlette app, its routes, request parsing and error contract, and metrics.

`create_app(settings)` builds the app; its lifespan loads the `Predictor` once on the model
thread, warms it up and starts a `MicroBatcher` (the queue and the batching task live in
`batcher`). The endpoints are plain functions that read what they need from `app.state`:
`settings`, `metrics`, `batcher` (None until the model is warm) and `load_error`. What a body
may hold is `protocol`'s concern. A 503 for a limit (`Overloaded`) tells its client when it may try
again, and one that comes back sooner waits for that time. Every /predict request is counted once
in `/metrics`, written by `prometheus-client` with one registry per app (or, under uvicorn's
`--workers N` with PROMETHEUS_MULTIPROC_DIR set, summed over the workers), and every answer says
how long it took.
What is enforced on connections, before a request reaches the app (deadlines on request heads,
open connections per client), is `connections`' concern.
"""

import asyncio
import contextlib
import gc
import importlib
import glob
import json
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .batcher import DeviceFailed, MicroBatcher, ModelError, ModelThread, QueueFull
from .config import ServeSettings
from .connections import ANSWERED, GUARDED, client_key
from .errors import SentimentError, SettingError
from .predictor import Predictor
from .protocol import BadRequest, BodyBudget, read_request

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# The model thread gives up the GIL in every torch op and must get it back from the event loop,
# which Python hands over only once its switch interval has passed: 5 ms by default, so while the
# event loop is busy (a burst of requests, a client retrying without waiting out Retry-After) each
# op of a forward could wait 5 ms. bench/hammer.py measures both.
GIL_SWITCH_S = 0.0002
RETRY_AFTER_S = 1  # what a 503 for a limit asks a client to wait before it tries again
GAUGES_EVERY_S = 1  # how often each worker writes its queue's and bodies' gauges where the others' are summed
prometheus_client.disable_created_metrics()  # no `_created` series: the names stay those documented
log = logging.getLogger(__name__)


def shared_metrics_folder():
    """The folder prometheus-client shares metrics through between processes (PROMETHEUS_MULTIPROC_DIR), or None."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


def check_metrics_folder(folder):
    """A line for each way the workers' shared folder cannot be used, before prometheus-client's traceback."""
    if not os.path.exists(folder):
        raise ValueError(f"PROMETHEUS_MULTIPROC_DIR={folder}: no such folder; make it (empty) before starting the "
                         f"service")
    if not os.path.isdir(folder):
        raise ValueError(f"PROMETHEUS_MULTIPROC_DIR={folder}: not a folder; name an empty folder for the workers' "
                         f"metrics")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"PROMETHEUS_MULTIPROC_DIR={folder}: the service cannot write into it; give its user "
                         f"write access or name another folder")


class ServiceMetrics:
    """The service's Prometheus metrics, in a registry of their own (one per app). With PROMETHEUS_MULTIPROC_DIR
    set (read by prometheus-client as it is imported), every process writes its metrics into files there and
    `/metrics` sums those of all the workers: counts and histograms of every worker that ever ran, gauges of the
    live ones."""

    def __init__(self):
        self.folder = shared_metrics_folder()
        if self.folder:
            check_metrics_folder(self.folder)
        live = {"multiprocess_mode": "livesum"}  # the workers' values summed; an ended worker's left out
        self.registry = CollectorRegistry()
        self.requests = Counter("sentiment_requests", "Requests answered, by status.", ["status"],
                                registry=self.registry)
        # By status: a 503's latency says nothing of a 200's.
        self.latency = Histogram("sentiment_request_seconds", "Seconds from request to answer, by status.",
                                 ["status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_sizes = Histogram("sentiment_batch_size", "Texts per model call.", buckets=BATCH_BUCKETS,
                                     registry=self.registry)
        self.queue_depth = Gauge("sentiment_queue_depth", "Texts waiting for the model.", registry=self.registry,
                                 **live)
        self.body_bytes = Gauge("sentiment_body_bytes_held", "Bytes of request bodies held while they arrive "
                                "and are parsed.", registry=self.registry, **live)
        self.texts_scored = Counter("sentiment_texts_scored", "Texts the model has scored.", registry=self.registry)
        # Which limit each 503 met: the queue or the bodies' budget, in all or a client's share of it.
        self.refused = Counter("sentiment_refused", "Requests refused (503) for a limit, by the limit met.", ["limit"],
                               registry=self.registry)
        self.connections_open = Gauge("sentiment_connections_open", "Connections open.", registry=self.registry,
                                      **live)
        self.connections_refused = Counter("sentiment_connections_refused", "Connections closed as they were made, "
                                           "by the limit met.", ["limit"], registry=self.registry)
        self.connections_cut = Counter("sentiment_connections_cut", "Connections cut, by reason: a deadline their "
                                       "client let pass (a request head's, a body's rest's, an answer's), or a body "
                                       "of chunks too small.", ["reason"], registry=self.registry)
        self.held = Counter("sentiment_retried_early", "Refusals held until the client's last Retry-After was over, "
                            "as the request came sooner.", registry=self.registry)

    def exposition(self):
        """What `/metrics` answers: this process's metrics, or every worker's from the shared folder."""
        registry = self.registry
        if self.folder:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, self.folder)
        return prometheus_client.generate_latest(registry)

    def forget_dead_workers(self):
        """Leave the live gauges of workers no longer running out of the sums: the folder keeps the files of a
        worker that was killed (uvicorn starts another in its place), and of one that ended as it should until
        `end_of_worker`. Counts stay: a total does not go down because a worker ended."""
        for path in glob.glob(os.path.join(self.folder, "gauge_live*_*.db")):
            pid = int(path.rsplit("_", 1)[1].removesuffix(".db"))
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                multiprocess.mark_process_dead(pid, self.folder)
            except PermissionError:  # another user's process of that number is running
                pass

    def end_of_worker(self):
        if self.folder:
            multiprocess.mark_process_dead(os.getpid(), self.folder)

    def count_request(self, status, seconds):
        self.requests.labels(status=status).inc()
        self.latency.labels(status=status).observe(seconds)


def error(status, kind, message, headers=None):
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


class RetryTimes:
    """When each client may try again: `RETRY_AFTER_S` after the last 503 it was sent."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.until = {}  # client -> when it may try again; soonest first, so the past ones are at the front

    def tell(self, client):
        """Note a 503 sent to `client` now."""
        now = time.monotonic()
        self.until.pop(client, None)
        self.until[client] = now + self.seconds
        while self.until[first := next(iter(self.until))] < now:  # stops at `client` at the latest
            del self.until[first]

    def of(self, client):
        """When `client` may try again: a time past if it was sent no 503 within the last `seconds`."""
        return self.until.get(client, 0.0)


@dataclass
class Overloaded:
    """A request refused for a limit it met: the queue's or the bodies', in all or its client's share.
    `retry_at` is when its client might try again, as told before the request came."""

    client: str
    retry_at: float
    limit: str
    message: str

    async def answer(self, state):
        """The 503, counted by its limit. A request that came while its client was to wait out an earlier
        503's Retry-After (a retry loop without back-off) gets its own once that time is over: each of the
        client's connections then costs the event loop about a request a second, not hundreds
        (bench/hammer.py). Its body and texts are let go before it waits. A client that waits as told, and
        a request already under way when its client was sent a 503, never wait here."""
        state.metrics.refused.labels(limit=self.limit).inc()
        if (early := self.retry_at - time.monotonic()) > 0:
            state.metrics.held.inc()
            await asyncio.sleep(early)
        state.retry_times.tell(self.client)
        return error(503, "overloaded", self.message, headers={"Retry-After": str(RETRY_AFTER_S)})


def not_ready(state):
    # A load failure's detail (paths, unpickling errors) goes to the log, never to clients.
    if state.load_error:
        return error(503, "not_ready", "model not loaded; the service's log says why")
    return error(503, "not_ready", "the model is still loading", headers={"Retry-After": "5"})


def milliseconds(seconds):
    return f"{seconds * 1000:.1f}"


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
        # JSON's escapes: a label the log's encoding cannot show must not count as a failed load.
        print(f"model loaded from {state.settings.model}: labels {json.dumps(predictor.labels)}", flush=True)
    except Exception as err:
        state.load_error = f"{type(err).__name__}: {err}"
        if isinstance(err, SentimentError):  # a damaged folder or a bad setting: one line that says what to fix
            log.error("could not load the model from %s (SENTIMENT_MODEL): %s", state.settings.model,
                      err.as_variable() if isinstance(err, SettingError) else err)
        else:
            log.error("could not load the model from %s (SENTIMENT_MODEL)", state.settings.model, exc_info=err)


@contextlib.asynccontextmanager
async def lifespan(app):
    print("sentiment service settings: " + json.dumps(app.state.settings.__dict__), flush=True)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_S)
    metrics, gauges = app.state.metrics, None
    if metrics.folder:
        metrics.forget_dead_workers()
        gauges = asyncio.create_task(write_gauges_every(app.state, GAUGES_EVERY_S))
    elif multiprocessing.parent_process() is not None:  # uvicorn starts each worker (and --reload's one) as a child
        log.warning("this service runs as one of uvicorn's workers: with several (--workers N), /metrics counts "
                    "the requests of the one worker that answers it; to count every worker's, set "
                    "PROMETHEUS_MULTIPROC_DIR to an empty folder")
    executor = ModelThread()
    loader = asyncio.create_task(load_model(app, executor))
    yield
    loader.cancel()
    if gauges:
        gauges.cancel()
    if app.state.batcher:  # answer what is queued, for as long as those requests may wait
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(app.state.batcher.drain(), app.state.settings.request_timeout_s)
        if (busy := app.state.batcher.busy_since) is not None:
            log.warning("a model call has run for %.0f s and is still under way (a hung device?); the service "
                        "stops without it", time.monotonic() - busy)
    executor.shutdown(wait=False)
    metrics.end_of_worker()
    sys.setswitchinterval(switch)


async def predict(request):
    start = time.perf_counter()
    if GUARDED not in request.scope and not request.app.state.told_unguarded:
        # Plain `uvicorn app:app` serves as well, and nothing at start can tell: said once, at the first request.
        request.app.state.told_unguarded = True
        log.warning("this service reads requests through uvicorn's own HTTP protocol, which waits for ever for a "
                    "client that sends its request head a byte at a time and lets one client open connections "
                    "until none are left: a few such clients hold up every other; start it with the service's "
                    "protocol: uvicorn app:app --http app:HTTP")
    try:
        response = await answer(request)
        if isinstance(response, Overloaded):  # answered here, once `answer` has let the request's texts go
            response = await response.answer(request.app.state)
    except Exception:  # a bug: logged, answered and counted like any other answer
        log.exception("error answering /predict")
        response = error(500, "internal_error", "internal error; the service is still running")
    status = request.scope.get(ANSWERED, response.status_code)  # a 400 the protocol sent: counted as such
    request.app.state.metrics.count_request(status, time.perf_counter() - start)
    return response


async def answer(request):
    state = request.app.state
    batcher, settings = state.batcher, state.settings
    if batcher is None:
        return not_ready(state)
    if batcher.failed:  # every request fails until a restart: no use reading the body
        return error(503, "stalled", batcher.failed)
    # A request that cannot fit (a full queue this client may take no room from) is answered before
    # the body is read, so a burst costs a parse only for what fits; the slots themselves are taken
    # once the body is in, so a slow body holds none.
    client = client_of(request)
    retry_at = state.retry_times.of(client)  # as told before this request came
    full = batcher.refusal(client)
    if full:
        return Overloaded(client, retry_at, full.limit, str(full))
    try:
        parsed = await read_request(request, settings, state.body_budget, client, batcher.predictor.function)
    except BadRequest as bad:
        if bad.limit:
            return Overloaded(client, retry_at, bad.limit, bad.message)
        return error(bad.status, bad.kind, bad.message)
    scoring = asyncio.ensure_future(asyncio.wait_for(batcher.submit(parsed.texts, client), settings.request_timeout_s))
    gone = asyncio.ensure_future(client_gone(request))
    await asyncio.wait({scoring, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not scoring.done():  # cancelling it cancels the texts' futures: the batcher skips them
        scoring.cancel()
        scoring.add_done_callback(forget)
        return error(499, "client_disconnected", "the client went away")
    try:
        results = scoring.result()
    except QueueFull as full:
        return Overloaded(client, retry_at, full.limit, str(full))
    except asyncio.TimeoutError:  # TimeoutError from Python 3.11; its own class on 3.10
        return error(504, "timeout", f"no answer within {settings.request_timeout_s} s (SENTIMENT_REQUEST_TIMEOUT_S)")
    except DeviceFailed as failed:  # a load balancer may send it elsewhere; a liveness probe restarts it
        return error(503, "stalled", str(failed))
    except ModelError:
        return error(500, "model_error", "the model failed on this text; the service is still running")
    answers, queued, scored = zip(*results)
    unscored = [i for i, one in enumerate(answers) if one.get("error")]
    if unscored:  # a text of only control or zero-width characters: the tokenizer keeps none of it
        return error(422, "empty_text", f"{parsed.where(unscored[0])} holds only characters the tokenizer drops "
                                        f"(control or zero-width characters): nothing to score")
    return JSONResponse(parsed.answer(list(answers)), headers={"x-queue-time": milliseconds(max(queued)),
                                                               "x-inference-time": milliseconds(max(scored))})


def client_of(request):
    """Who sent `request`, for the limits each client has: `client_key` of its address (the connection's,
    or the one a trusted proxy names in X-Forwarded-For: uvicorn's --forwarded-allow-ips)."""
    return client_key(request.client.host if request.client else "")


def forget(task):
    """Done callback of a task no one awaits: takes its outcome. Python 3.11's `wait_for`, cancelled as the
    call it waits on fails (a full queue), ends with that error, which asyncio would log as never retrieved."""
    if not task.cancelled():
        task.exception()


async def client_gone(request):
    """Return once the client has disconnected (the body has been read, so nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def stalled(state):
    """503 once the batcher can no longer answer (a model call that never returns, as on a hung GPU):
    an orchestrator's liveness probe then restarts the process. None while it can answer."""
    reason = state.batcher.stalled(state.settings.stall_timeout_s) if state.batcher else None
    return error(503, "stalled", reason) if reason else None


async def health(request):
    """Liveness: 200 while the process can serve or is getting ready; 503 once the model failed to
    load or the batcher stalled."""
    state = request.app.state
    if state.load_error:
        return not_ready(state)
    return stalled(state) or JSONResponse({"status": "ok" if state.batcher else "loading",
                                           "model": state.settings.model})


async def ready(request):
    """Readiness: 503 until the model is loaded and warm, and while the batcher is stalled; then 200
    with the model and its labels."""
    state = request.app.state
    if state.batcher is None:
        return not_ready(state)
    return stalled(state) or JSONResponse({"status": "ok", "model": state.settings.model,
                                           "labels": state.batcher.predictor.labels})


async def prometheus(request):
    state = request.app.state
    write_gauges(state)
    return Response(state.metrics.exposition(), media_type=prometheus_client.CONTENT_TYPE_LATEST)


def write_gauges(state):
    """The gauges of what this process holds now, read rather than kept up to date request by request."""
    state.metrics.queue_depth.set(state.batcher.queue.qsize() if state.batcher else 0)
    state.metrics.body_bytes.set(state.body_budget.held)


async def write_gauges_every(state, seconds):
    """With workers sharing their metrics, a scrape reaches one of them: each writes its gauges on its own."""
    while True:
        write_gauges(state)
        await asyncio.sleep(seconds)


async def http_error(request, exc):
    return error(exc.status_code, "http_error", exc.detail, headers=exc.headers)  # 405 keeps its Allow


async def server_error(request, exc):
    return error(500, "internal_error", "internal error; the service is still running")


def send_json_400(protocol, message):
    """uvicorn's answer to a request it cannot parse, in our error shape rather than plain text."""
    body = json.dumps({"error": {"type": "bad_request", "message": message}}).encode()
    head = [b"HTTP/1.1 400 Bad Request\r\n"]
    for name, value in protocol.server_state.default_headers:
        head += [name, b": ", value, b"\r\n"]
    head += [b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)]
    protocol.transport.write(b"".join(head) + body)
    protocol.transport.close()


def json_protocol_errors():
    """uvicorn answers a malformed request itself, before any app sees it, from one method of its
    protocol classes; that method is replaced so that every error the service sends is JSON."""
    for name in ("h11_impl", "httptools_impl", "zttp_impl"):
        try:
            module = importlib.import_module(f"uvicorn.protocols.http.{name}")
        except ImportError:  # that implementation's parser is not installed
            continue
        for cls in vars(module).values():
            if isinstance(cls, type) and "send_400_response" in vars(cls):
                cls.send_400_response = send_json_400


class TotalTime:
    """Every answer, errors from routing included, says in `x-total-time` how many ms it took."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()

        async def timed(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("x-total-time", milliseconds(time.perf_counter() - start))
            await send(message)

        await self.app(scope, receive, timed)


ROUTES = [Route("/predict", predict, methods=["POST"]), Route("/health", health), Route("/ready", ready),
          Route("/metrics", prometheus)]


def create_app(settings=None, predictor_factory=None):
    """The Starlette app. `predictor_factory(settings)` builds the Predictor (tests pass their own)."""
    json_protocol_errors()
    app = Starlette(routes=ROUTES, lifespan=lifespan, middleware=[Middleware(TotalTime)],
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    settings = app.state.settings = settings or ServeSettings.from_env()
    app.state.predictor_factory = predictor_factory or load_predictor
    app.state.metrics = ServiceMetrics()
    app.state.body_budget = BodyBudget(settings.max_body_bytes_total, settings.max_body_bytes_per_client)
    app.state.retry_times = RetryTimes(RETRY_AFTER_S)
    app.state.batcher = None
    app.state.load_error = None
    app.state.told_unguarded = False
    return app
