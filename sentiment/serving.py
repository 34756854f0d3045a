"""The HTTP service: settings, the micro-batching queue, metrics and the Starlette app.

Each text of each request becomes one `asyncio.Future` in a bounded queue. One batching task
takes what is queued, up to a batch size and a token budget (waiting up to `max_wait_ms` for more
only while traffic is heavy, so a lone request is never held back), drops texts whose client has
gone, and runs the `Predictor` in its own thread so the event loop keeps accepting requests.
The model is loaded once in the lifespan; `/health` answers 503 until it is loaded and warm.
"""

import asyncio
import contextlib
import gc
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from .config import INFER_PRECISIONS
from .data import only_markup

CHARS_PER_TOKEN = 4  # a cheap token estimate for the batch budget; the Predictor counts exactly
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class ServeSettings:
    model: str = "outputs/model"  # SENTIMENT_MODEL: the model folder
    # One model call is one forward pass: 0 takes the Predictor's own limits (16 texts and 4,096
    # tokens on a CPU, where larger batches are no faster per text; 64 and 32,768 on a GPU).
    max_batch_size: int = 0  # SENTIMENT_MAX_BATCH_SIZE: most texts per model call
    max_batch_tokens: int = 0  # SENTIMENT_MAX_BATCH_TOKENS: most (estimated) tokens per model call
    max_wait_ms: float = 5.0  # SENTIMENT_MAX_WAIT_MS: longest wait for a batch to fill, under load
    queue_size: int = 256  # SENTIMENT_QUEUE_SIZE: texts waiting at most; beyond it, 503 at once
    max_body_bytes: int = 1 << 20  # SENTIMENT_MAX_BODY_BYTES: larger bodies get 413
    max_texts: int = 64  # SENTIMENT_MAX_TEXTS: most texts in one request
    max_chars: int = 20000  # SENTIMENT_MAX_CHARS: longest text accepted
    request_timeout_s: float = 30.0  # SENTIMENT_REQUEST_TIMEOUT_S: then 504
    device: str = "auto"  # SENTIMENT_DEVICE
    threads: int = 0  # SENTIMENT_THREADS: CPU threads for the model; 0 = PyTorch's choice
    precision: str = "auto"  # SENTIMENT_PRECISION: auto, fp32 or bf16 (bf16 on a CPU: AVX512-BF16 or AMX)

    @classmethod
    def from_env(cls, environ=os.environ):
        values = {}
        for f in fields(cls):
            raw = environ.get(f"SENTIMENT_{f.name.upper()}")
            if raw is not None:
                try:
                    values[f.name] = type(f.default)(raw)
                except ValueError:
                    raise ValueError(f"SENTIMENT_{f.name.upper()}={raw!r} is not a {type(f.default).__name__}")
        return cls(**values)

    def __post_init__(self):
        for name in ("queue_size", "max_body_bytes", "max_texts", "max_chars", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SENTIMENT_{name.upper()} must be above 0, got {getattr(self, name)}")
        for name in ("max_batch_size", "max_batch_tokens", "max_wait_ms", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"SENTIMENT_{name.upper()} must not be negative, got {getattr(self, name)}")
        if self.precision not in INFER_PRECISIONS:
            raise ValueError(f"SENTIMENT_PRECISION must be one of {', '.join(INFER_PRECISIONS)}, "
                             f"got {self.precision!r}")


class QueueFull(Exception):
    pass


def model_thread():
    """The one thread every model call runs on (load, warm-up, batches): PyTorch's thread count is
    set on it and its pool of worker threads is started once, not once per pool thread."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")


class Metrics:
    """Prometheus counters and histograms, written out by hand in the text format."""

    def __init__(self):
        self.requests = {}
        self.latency = {}  # by status: a 503's latency says nothing of a 200's
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.texts_scored = 0

    def count_request(self, status, seconds):
        self.requests[status] = self.requests.get(status, 0) + 1
        self.latency.setdefault(status, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def render(self, queue_depth):
        lines = ["# TYPE sentiment_requests_total counter"]
        lines += [f'sentiment_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
        lines += ["# TYPE sentiment_request_seconds histogram"]
        for status, histogram in sorted(self.latency.items()):
            lines += histogram.render("sentiment_request_seconds", f'status="{status}",')[1:]
        lines += self.batch_sizes.render("sentiment_batch_size")
        lines += ["# TYPE sentiment_queue_depth gauge", f"sentiment_queue_depth {queue_depth}",
                  "# TYPE sentiment_texts_scored_total counter", f"sentiment_texts_scored_total {self.texts_scored}"]
        return "\n".join(lines) + "\n"


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value):
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def render(self, name, labels=""):
        """Text-format lines; `labels` such as 'status="200",' go before `le` in every sample."""
        lines = [f"# TYPE {name} histogram"]
        lines += [f'{name}_bucket{{{labels}le="{b}"}} {n}' for b, n in zip(self.buckets, self.counts)]
        tail = f"{{{labels.rstrip(',')}}}" if labels else ""
        return lines + [f'{name}_bucket{{{labels}le="+Inf"}} {self.count}', f"{name}_sum{tail} {self.sum}",
                        f"{name}_count{tail} {self.count}"]


class MicroBatcher:
    """Gathers texts from concurrent requests into model batches; one task runs them in order."""

    def __init__(self, predictor, settings, metrics, executor=None):
        self.predictor = predictor
        self.executor = executor
        self.settings = settings
        self.metrics = metrics
        self.queue = asyncio.Queue(maxsize=settings.queue_size)
        self.max_batch_size = settings.max_batch_size or predictor.batch_size
        self.max_batch_tokens = settings.max_batch_tokens or predictor.max_batch_tokens
        self.heavy = False  # the last batch had company: worth waiting a moment for more
        self.reading = 0  # admitted requests whose bodies are still being read: each holds a queue slot
        self.task = asyncio.create_task(self.run())

    def room(self):
        return self.queue.maxsize - self.queue.qsize() - self.reading

    async def submit(self, texts):
        """Queue the texts and wait for their answers; `QueueFull` at once if there is no room."""
        if self.room() < len(texts):
            raise QueueFull
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in texts]
        for text, future in zip(texts, futures):
            self.queue.put_nowait((text, future))
        try:
            return await asyncio.gather(*futures)
        finally:
            for future in futures:  # the client left or timed out: the batcher will skip these
                future.cancel()

    def tokens(self, text):
        return min(len(text) // CHARS_PER_TOKEN, self.predictor.max_length)

    async def next_batch(self):
        batch = [await self.queue.get()]
        tokens = self.tokens(batch[0][0])
        deadline = time.monotonic() + self.settings.max_wait_ms / 1000
        while len(batch) < self.max_batch_size and tokens < self.max_batch_tokens:
            if self.queue.empty():
                wait = deadline - time.monotonic()
                if not self.heavy or wait <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), wait)
                except TimeoutError:
                    break
            else:
                item = self.queue.get_nowait()
            batch.append(item)
            tokens += self.tokens(item[0])
        return [(text, future) for text, future in batch if not future.done()]

    async def run(self):
        while True:
            batch = await self.next_batch()
            self.heavy = len(batch) > 1 or not self.queue.empty()
            if not batch:
                continue
            self.metrics.batch_sizes.observe(len(batch))
            try:
                probs = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.predictor.probabilities, [text for text, _ in batch])
            except Exception as err:  # a model failure fails this batch, not the service
                for _, future in batch:
                    if not future.done():
                        future.set_exception(RuntimeError(f"model error: {type(err).__name__}"))
                continue
            self.metrics.texts_scored += len(batch)
            for (_, future), p in zip(batch, probs):
                if not future.done():
                    future.set_result(self.predictor.answer(p))

    async def drain(self):
        """Finish what is queued, then stop the batching task."""
        while not self.queue.empty():
            await asyncio.sleep(0.01)
        self.task.cancel()


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


async def client_gone(request):
    """Return once the client has disconnected (the body has been read, so nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(settings=None, predictor_factory=None):
    """The Starlette app. `predictor_factory(settings)` builds the Predictor (tests pass their own)."""
    settings = settings or ServeSettings.from_env()

    def load_predictor(settings):
        from .predictor import Predictor
        return Predictor(settings.model, device=settings.device, threads=settings.threads or None,
                         precision=settings.precision, batch_size=settings.max_batch_size or None,
                         max_batch_tokens=settings.max_batch_tokens or None)

    predictor_factory = predictor_factory or load_predictor
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        print("sentiment service settings: " + json.dumps(settings.__dict__), flush=True)
        app.state.batcher = None
        app.state.load_error = None

        executor = model_thread()

        async def load():
            loop = asyncio.get_running_loop()
            try:
                predictor = await loop.run_in_executor(executor, predictor_factory, settings)
                await loop.run_in_executor(executor, predictor.probabilities, ["warm-up text"] * 2)
                # The libraries and the model are some 400k Python objects: a full garbage
                # collection over them stalls the event loop for about 0.2 s (measured), in the
                # middle of a burst. Frozen, they are never scanned again.
                gc.collect()
                gc.freeze()
                app.state.batcher = MicroBatcher(predictor, settings, metrics, executor)
                print(f"model loaded from {settings.model}: labels {predictor.labels}", flush=True)
            except Exception as err:
                app.state.load_error = f"{type(err).__name__}: {err}"
                print(f"could not load the model: {app.state.load_error}", flush=True)

        loader = asyncio.create_task(load())
        yield
        loader.cancel()
        if app.state.batcher:
            await app.state.batcher.drain()
        executor.shutdown(wait=False)

    async def predict(request):
        start = time.perf_counter()
        response = await answer(request)
        metrics.count_request(response.status_code, time.perf_counter() - start)
        return response

    async def answer(request):
        batcher = request.app.state.batcher
        if batcher is None:
            return error(503, "not_ready", request.app.state.load_error or "the model is still loading",
                         headers={"Retry-After": "5"})
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
            return error(504, "timeout", f"no answer within {settings.request_timeout_s} s "
                                         f"(SENTIMENT_REQUEST_TIMEOUT_S)")
        except RuntimeError as err:
            return error(500, "model_error", str(err))
        return JSONResponse(answers[0] if single else {"predictions": answers})

    async def health(request):
        batcher = request.app.state.batcher
        if batcher is None:
            return error(503, "not_ready", request.app.state.load_error or "the model is still loading")
        return JSONResponse({"status": "ok", "model": settings.model, "labels": batcher.predictor.labels})

    async def prometheus(request):
        batcher = request.app.state.batcher
        return PlainTextResponse(metrics.render(batcher.queue.qsize() if batcher else 0),
                                 media_type="text/plain; version=0.0.4")

    async def http_error(request, exc):
        return error(exc.status_code, "http_error", exc.detail)

    async def server_error(request, exc):
        return error(500, "internal_error", "internal error; the service is still running")

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/health", health),
                             Route("/metrics", prometheus)],
                     lifespan=lifespan, exception_handlers={HTTPException: http_error, Exception: server_error})
