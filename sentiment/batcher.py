"""The micro-batcher: texts of concurrent requests gathered into model batches, run on one model thread.

Each text of each request becomes one `asyncio.Future` in a bounded queue. One batching task
takes what is queued in turn, a text from each waiting client and, within a client, from each of
its requests (so neither a client of many requests nor a request of many texts holds back one
that comes after it), up to the Predictor's batch size and token budget (waiting up to
`max_wait_ms` for more only while traffic is heavy, so a lone request is never held back), drops
texts whose client has gone, and runs the `Predictor` on the model thread so the event loop keeps
accepting requests. If a batch fails, its texts are scored one by one, so only a text that fails
alone fails its request. `refusal()` tells the app whether a request can fit, in the room left or
in room its client may take back from one holding more than its share of a full queue, before its
body is read; the slots are taken (and others' requests pushed out) when the texts are queued.
`stalled()` tells it when the batcher can no longer answer: a model call that never returns (a
hung GPU), a device that can no longer compute (after a failed call, the Predictor is asked), or
a batching task that ended.
It knows nothing of HTTP: routes and error statuses live in `serving`.
"""

import asyncio
import collections
import logging
import queue
import threading
import time
from concurrent.futures import Executor, Future

CHARS_PER_TOKEN = 4  # a cheap token estimate for the batch budget; the Predictor counts exactly
log = logging.getLogger(__name__)


class QueueFull(Exception):
    """No room for a request: `limit` is the one it met ("queue" or "client_queue"), the message says so."""

    def __init__(self, message, limit):
        super().__init__(message)
        self.limit = limit


class Waiting(collections.deque):
    """The texts of one request still waiting, (text, future, time queued) each, and when it came."""

    def __init__(self, items, arrival):
        super().__init__(items)
        self.arrival = arrival


class FairQueue:
    """Waiting texts, kept per client and per request, and taken in turn (round robin): one text of
    the first client's first request; that request goes to the back of its client's line, and the
    client to the back of the clients' line. A client with a hundred requests waiting gets no more
    turns than a client with one, and a request of many texts holds back none after it.

    Bounded in texts: `maxsize` in all. A client may fill the room no one else needs, beyond its share
    (`client_maxsize`); when another client within its share finds the queue full, the newest requests
    of the client holding the most are pushed out (their texts fail with `QueueFull`) until there is
    room, for as long as that client holds more than its share. So one client cannot keep another
    out, and a lone client (or every client behind one proxy) still has the whole queue."""

    def __init__(self, maxsize, client_maxsize):
        self.maxsize, self.client_maxsize, self.count = maxsize, client_maxsize, 0
        self.clients = {}  # client -> deque of its Waiting requests; both in turn
        self.held = collections.Counter()  # texts waiting, per client
        self.arrivals = 0
        self.nonempty = asyncio.Event()

    def qsize(self):
        return self.count

    def empty(self):
        return self.count == 0

    def refusal(self, client, texts):
        """`QueueFull` saying why `texts` more of `client`'s texts cannot wait, or None when they can:
        in the room left, or in room taken back from clients holding more than their share."""
        if self.count + texts <= self.maxsize:
            return None
        full = QueueFull("the queue is full (SENTIMENT_QUEUE_SIZE); retry shortly", "queue")
        held = self.held[client]
        if held == self.count:  # no other client waits: nothing to share
            return full
        if held + texts > self.client_maxsize:
            return QueueFull(f"the queue is full and this client has {held} texts waiting, its share of it "
                             f"(SENTIMENT_QUEUE_SIZE_PER_CLIENT is {self.client_maxsize}); retry shortly",
                             "client_queue")
        if self.count + texts - sum(map(self.beyond_share, self.clients)) > self.maxsize:
            return full
        return None

    def beyond_share(self, client):
        """The texts that pushing out `client`'s newest requests would free, while it holds more than its share."""
        held, freed = self.held[client], 0
        for request in sorted(self.clients[client], key=lambda r: r.arrival, reverse=True):
            if held <= self.client_maxsize:
                break
            held, freed = held - len(request), freed + len(request)
        return freed

    def put_request(self, client, items):
        """Queue one request's texts, once `refusal` said they may wait, pushing out others' as it allowed."""
        while self.count + len(items) > self.maxsize:
            self.push_out(max(self.held, key=self.held.get))
        self.arrivals += 1
        self.clients.setdefault(client, collections.deque()).append(Waiting(items, self.arrivals))
        self.held[client] += len(items)
        self.count += len(items)
        self.nonempty.set()

    def push_out(self, client):
        """Fail the newest waiting request of `client`, which holds more than its share of a full queue."""
        requests = self.clients[client]
        at = max(range(len(requests)), key=lambda i: requests[i].arrival)  # by place: equal deques compare equal
        newest = requests[at]
        del requests[at]
        if not requests:
            del self.clients[client]
        self.forget(client, len(newest))
        pushed = QueueFull(f"pushed out of the full queue for another client's request: this client held more than "
                           f"its share (SENTIMENT_QUEUE_SIZE_PER_CLIENT is {self.client_maxsize}); retry shortly",
                           "client_queue")
        for _, future, _ in newest:
            if not future.done():
                future.set_exception(pushed)

    def forget(self, client, texts):
        self.held[client] -= texts
        if not self.held[client]:
            del self.held[client]
        self.count -= texts
        if not self.count:
            self.nonempty.clear()

    def get_nowait(self):
        client, requests = next(iter(self.clients.items()))
        del self.clients[client]
        request = requests.popleft()
        item = request.popleft()
        if request:
            requests.append(request)
        if requests:
            self.clients[client] = requests  # to the back of the line
        self.forget(client, 1)
        return item

    async def get(self):
        while self.empty():
            await self.nonempty.wait()
        return self.get_nowait()


class ModelError(Exception):
    """The model failed on a text (the detail is logged, not sent to the client)."""


class DeviceFailed(ModelError):
    """The model's device can no longer compute (a CUDA error that poisons the process): every text
    fails, at once, until the service is restarted. The message says why."""


def log_end(task):
    if not task.cancelled() and task.exception() is not None:
        log.error("the batching task ended; /health and /ready now answer 503", exc_info=task.exception())


def score_one_by_one(predictor, texts):
    """Each text's probabilities, or the exception scoring it alone raised."""
    results = []
    for text in texts:
        try:
            results.append(predictor.probabilities([text])[0])
        except Exception as err:
            results.append(err)
    return results


class ModelThread(Executor):
    """The one thread every model call runs on (load, warm-up, batches), in order: PyTorch's thread count
    is set on it and its pool of worker threads is started once. A daemon: Python waits at exit for a
    `ThreadPoolExecutor`'s threads, and a service stopped by Ctrl-C while a model call hung (a hung GPU)
    said "Finished server process" and never ended. Once the service has stopped, no answer is awaited."""

    def __init__(self):
        self.calls = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.run, name="model", daemon=True)
        self.thread.start()

    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        self.calls.put((future, fn, args, kwargs))
        return future

    def run(self):
        while (call := self.calls.get()) is not None:
            future, fn, args, kwargs = call
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as err:  # the caller's to raise, as ThreadPoolExecutor does
                    future.set_exception(err)

    def shutdown(self, wait=True, *, cancel_futures=False):
        self.calls.put(None)  # the thread ends after the calls queued before it
        if wait:
            self.thread.join()


class MicroBatcher:
    """Gathers texts from concurrent requests into model batches; one task runs them in order.

    Batch limits are the Predictor's own (`batch_size`, `max_batch_tokens`); `settings` gives the
    queue size and the wait; `metrics` records batch sizes and texts scored.
    """

    def __init__(self, predictor, settings, metrics, executor=None):
        self.predictor = predictor
        self.executor = executor
        self.max_wait_s = settings.max_wait_ms / 1000
        self.metrics = metrics
        self.queue = FairQueue(settings.queue_size, settings.queue_size_per_client)
        self.heavy = False  # the last batch had company: worth waiting a moment for more
        self.busy_since = None  # when the model call under way began
        self.failed = None  # why the device can no longer compute, once a failed call showed it
        self.task = asyncio.create_task(self.run())
        self.task.add_done_callback(log_end)

    def stalled(self, limit_s):
        """Why the batcher can no longer answer, or None while it can."""
        if self.task.done():
            return "the batching task has ended; the log says why"
        if self.failed:
            return self.failed
        busy_s = time.monotonic() - self.busy_since if self.busy_since is not None else 0.0
        if busy_s > limit_s:
            return f"a model call has run for {busy_s:.0f} s, over SENTIMENT_STALL_TIMEOUT_S ({limit_s:g} s)"
        return None

    def refusal(self, client, texts=1):
        """`QueueFull` if `texts` more texts of `client` (its address) cannot be queued now, else None."""
        return self.queue.refusal(client, texts)

    async def submit(self, texts, client):
        """Queue `client`'s texts and wait for their answers: (answer, seconds queued, seconds in the
        model) per text. `QueueFull` at once if there is no room; `ModelError` if the model fails on one."""
        if self.failed:
            raise DeviceFailed(self.failed)
        full = self.queue.refusal(client, len(texts))
        if full:
            raise full
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in texts]
        queued = time.perf_counter()
        self.queue.put_request(client, [(text, future, queued) for text, future in zip(texts, futures)])
        try:
            return await asyncio.gather(*futures)
        finally:
            for future in futures:  # the client left or timed out: the batcher will skip these
                future.cancel()

    def tokens(self, text):
        return min(len(text) // CHARS_PER_TOKEN, self.predictor.max_length)

    async def next_batch(self):
        """The texts of one model call, (text, future, time queued) each, taken in turn. A text whose
        client has gone is dropped as it is taken, so it takes no place in the batch."""
        batch, tokens = [], 0
        while len(batch) < self.predictor.batch_size and tokens < self.predictor.max_batch_tokens:
            if not batch:
                item = await self.queue.get()
                deadline = time.monotonic() + self.max_wait_s
            elif not self.queue.empty():
                item = self.queue.get_nowait()
            else:
                wait = deadline - time.monotonic()
                if not self.heavy or wait <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), wait)
                except asyncio.TimeoutError:  # TimeoutError from Python 3.11; its own class on 3.10
                    break
            if item[1].done():
                continue
            batch.append(item)
            tokens += self.tokens(item[0])
        return batch

    async def run(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = await self.next_batch()
            self.heavy = len(batch) > 1 or not self.queue.empty()
            self.metrics.batch_sizes.observe(len(batch))
            texts, start = [text for text, _, _ in batch], time.perf_counter()
            self.busy_since = time.monotonic()
            results = await self.score(loop, texts)
            self.busy_since = None  # not when cancelled at shutdown: the call on the model thread goes on
            seconds = time.perf_counter() - start
            for (_, future, queued), result in zip(batch, results):
                if not future.done():
                    self.deliver(future, result, start - queued, seconds)

    async def score(self, loop, texts):
        """Each text's probabilities, or its error. A failed batch is scored text by text, so one bad
        text does not fail the others, unless the failure left the device unable to compute at all."""
        if self.failed:  # texts queued before it failed
            return [DeviceFailed(self.failed)] * len(texts)
        try:
            return await loop.run_in_executor(self.executor, self.predictor.probabilities, texts)
        except Exception as err:
            log.error("model error on a batch of %d texts", len(texts), exc_info=err)
        failure = await loop.run_in_executor(self.executor, self.predictor.device_fails)
        if failure:
            self.failed = (f"{self.predictor.device} can no longer compute ({failure}); every request fails "
                           f"until the service is restarted")
            log.error("%s; /health and /ready now answer 503", self.failed)
            return [DeviceFailed(self.failed)] * len(texts)
        return await loop.run_in_executor(self.executor, score_one_by_one, self.predictor, texts)

    def deliver(self, future, result, queued_s, model_s):
        """A text's answer, or its error: nothing about one text may end the batching task."""
        if isinstance(result, DeviceFailed):  # said once, in the log, when it happened
            future.set_exception(result)
            return
        try:
            if isinstance(result, Exception):
                raise result
            answer = self.predictor.answer(result)
        except Exception as err:
            log.error("model error on one text", exc_info=err)
            future.set_exception(ModelError(type(err).__name__))
            return
        self.metrics.texts_scored.inc()
        future.set_result((answer, queued_s, model_s))

    async def drain(self):
        """Finish what is queued, then stop the batching task."""
        while not self.queue.empty():
            await asyncio.sleep(0.01)
        self.task.cancel()
