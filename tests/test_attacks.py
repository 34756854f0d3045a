"""The service attacked as a hostile or clumsy client would: a real uvicorn on loopback, bounded
counts and times. No client may slow down or fail another client's request."""

import asyncio
import json
import os
import random
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from bench.body_flood import resident_mb
from helpers import ROOT, free_port, predict_sh
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families
from sentiment.connections import ACCEPT_LOG_EVERY_S

pytestmark = pytest.mark.slow

GOOD = "The acting was superb. I loved it."


class Server:
    """`uvicorn app:app --http app:HTTP` on a free loopback port, with SENTIMENT_* settings; its output is kept."""

    def __init__(self, model, open_files=None, uvicorn_flags=(), env=None, guarded=True, **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "SENTIMENT_MODEL": str(model), "TOKENIZERS_PARALLELISM": "false", **(env or {}),
               **{f"SENTIMENT_{k.upper()}": str(v) for k, v in settings.items()}}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app:app", *(["--http", "app:HTTP"] if guarded else []),
             "--host", "127.0.0.1", "--port", str(self.port), *uvicorn_flags],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=open_files and (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))))
        self.output = []
        self.reader = threading.Thread(target=lambda: self.output.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def wait(self, path="/ready", seconds=60):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + path).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError("uvicorn never became ready:\n" + "".join(self.output))

    def metrics(self):
        text = httpx.get(self.url + "/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def requests_counted(self):
        return {dict(labels)["status"]: value for (name, labels), value in self.metrics().items()
                if name == "sentiment_requests_total"}

    def end_workers(self):
        """Stop a server of several workers: SIGTERM, which uvicorn passes on to them (killed, it would leave them
        running, holding its output open)."""
        self.process.terminate()
        self.process.wait(60)
        self.stop()

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.reader.join(10)
        self.process.stdout.close()


@pytest.fixture
def serve(trained_model):
    servers = []

    def start(model=trained_model, ready=True, **settings):
        server = Server(model, **settings)
        servers.append(server)
        return server.wait() if ready else server

    yield start
    for server in servers:
        server.stop()


def post_raw(url, body, content_type="application/json", timeout=30):
    return httpx.post(url + "/predict", content=body, headers={"content-type": content_type}, timeout=timeout)


def test_a_lone_surrogate_is_refused_and_fails_no_other_request(serve):
    server = serve()
    poison = b'{"text": "good film \\ud800"}'
    with ThreadPoolExecutor(16) as pool:
        ordinary = [pool.submit(httpx.post, server.url + "/predict", json={"text": f"{GOOD} {i}"}, timeout=30)
                    for i in range(30)]
        bad = [pool.submit(post_raw, server.url, poison) for _ in range(5)]
        answers = [f.result() for f in ordinary]
        refused = [f.result() for f in bad]
    assert [r.status_code for r in answers] == [200] * 30
    assert all(r.status_code == 422 and r.json()["error"]["type"] == "invalid_text" for r in refused)


def test_a_body_of_unclosed_markup_does_not_hold_up_other_requests(serve):
    server = serve(queue_size_per_client=256)  # the three attacks come from one address: all must be queued
    attack = json.dumps({"texts": ["<" * 16000] * 64}).encode()
    assert len(attack) < 1 << 20
    with ThreadPoolExecutor(4) as pool:
        heavy = [pool.submit(post_raw, server.url, attack, timeout=60) for _ in range(3)]
        time.sleep(0.2)
        start = time.monotonic()
        light = httpx.post(server.url + "/predict", json={"text": GOOD}, timeout=30)
        light_seconds = time.monotonic() - start
        health_seconds = min(timed_get(server.url + "/health") for _ in range(3))
        results = [f.result() for f in heavy]
    assert light.status_code == 200 and light_seconds < 5, light_seconds  # was 19 s
    assert health_seconds < 1
    assert all(r.status_code == 200 for r in results)


def timed_get(url):
    start = time.monotonic()
    assert httpx.get(url, timeout=10).status_code == 200
    return time.monotonic() - start


def slow_body(port, promised=100, sent=4, source="127.0.0.1"):
    """A connection from `source` that promises a body and sends a few bytes of it, then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
    sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {promised}\r\n\r\n".encode() + b'{"te'[:sent])
    return sock


def read_answer(sock, seconds):
    """The answer the server sent on `sock` within `seconds`, head and body, as text ("" if none)."""
    sock.settimeout(seconds)
    answer = b""
    try:
        while True:
            head, _, body = answer.partition(b"\r\n\r\n")
            length = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
            if length and len(body) >= int(length[1]):
                break
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    except OSError:
        pass
    return answer.decode("latin-1")


def read_status(sock, seconds):
    head = read_answer(sock, seconds)
    return int(head.split()[1]) if head.startswith("HTTP/") else None


def test_a_client_that_floods_the_queue_gives_way_to_every_other_client(serve):
    # One address sending request after request kept the whole queue full: every other client's
    # request was answered 503 for as long as the flood went on.
    # 16 texts a client when others need the room; a text a model call, so the queue drains slowly.
    server = serve(queue_size=32, max_texts=16, max_batch_size=1)
    flooding, flood_refusals = threading.Event(), []

    def flood():
        with httpx.Client(timeout=30) as client:
            while flooding.is_set():
                answer = client.post(server.url + "/predict", json={"texts": [GOOD * 8] * 16})
                if answer.status_code == 503:
                    flood_refusals.append((answer.json()["error"]["message"], answer.headers.get("retry-after")))
                    time.sleep(0.02)

    direct = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=30)
    # A proxy on this host names its client in X-Forwarded-For, which uvicorn trusts from 127.0.0.1.
    proxied = httpx.Client(headers={"x-forwarded-for": "203.0.113.7"}, timeout=30)

    def over_half_full():  # refused flood requests wait out their Retry-After, so the queue is full by turns
        deadline = time.monotonic() + 10
        while server.metrics()[("sentiment_queue_depth", ())] <= 16 and time.monotonic() < deadline:
            time.sleep(0.005)

    flooding.set()
    with ThreadPoolExecutor(8) as pool, direct, proxied:
        floods = [pool.submit(flood) for _ in range(8)]  # 128 texts wanted at once, from 127.0.0.1
        # Requests of the most texts, each sent while the flood holds the queue over half full, so each
        # needs room from it.
        answers = []
        for _ in range(5):
            for client in (direct, proxied):
                over_half_full()
                answers.append(client.post(server.url + "/predict", json={"texts": [GOOD] * 16}))
        flooding.clear()
        for f in floods:
            f.result()
    assert [r.status_code for r in answers] == [200] * 10
    assert all(len(r.json()["predictions"]) == 16 for r in answers)
    # The flood alone had the whole queue, and was refused only when it was full; the others' requests
    # took their room from it, pushing out its newest requests.
    assert flood_refusals and all(retry == "1" for _, retry in flood_refusals)
    pushed = [m for m, _ in flood_refusals if m.startswith("pushed out")]
    assert pushed and all("SENTIMENT_QUEUE_SIZE_PER_CLIENT is 16" in m for m in pushed)
    refused = {dict(labels)["limit"]: n for (name, labels), n in server.metrics().items()
               if name == "sentiment_refused_total"}
    assert set(refused) <= {"queue", "client_queue"} and sum(refused.values()) == len(flood_refusals)


def test_a_client_that_retries_at_once_is_answered_about_once_a_second_and_fails_no_one(serve):
    # A client that ignored Retry-After had each 503 at once: eight connections retrying at once were
    # refused hundreds of times a second, each refusal read, answered and counted by the event loop.
    server = serve(queue_size=32, max_texts=16)  # 16 texts a client when others need the room
    seconds, connections, hammering = 3, 8, threading.Event()

    def hammer():
        refused = 0
        with httpx.Client(timeout=30) as client:
            while hammering.is_set():
                refused += client.post(server.url + "/predict", json={"texts": [GOOD * 8] * 16}).status_code == 503
        return refused

    hammering.set()
    with ThreadPoolExecutor(connections) as pool, httpx.Client(
            transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=30) as other:
        hammers = [pool.submit(hammer) for _ in range(connections)]
        time.sleep(0.5)
        end, answers = time.monotonic() + seconds, []
        while time.monotonic() < end:
            answers.append(other.post(server.url + "/predict", json={"text": GOOD}).status_code)
        hammering.clear()
        refused = sum(h.result() for h in hammers)
    assert answers and set(answers) == {200}
    # Each connection waits out a second after each 503 it comes back early for (3,228 refusals before).
    assert 0 < refused <= connections * (seconds + 3)
    metrics = server.metrics()
    assert metrics[("sentiment_retried_early_total", ())] > 0
    assert sum(n for (name, _), n in metrics.items() if name == "sentiment_refused_total") == refused


def test_bodies_that_never_finish_hold_no_slot_get_408_and_do_not_block_shutdown(serve):
    server = serve(queue_size=32, max_texts=32, body_timeout_s=1.5)
    slow = [slow_body(server.port) for _ in range(48)]  # more than the queue holds
    time.sleep(0.3)
    answers = [httpx.post(server.url + "/predict", json={"text": GOOD}, timeout=30) for _ in range(5)]
    assert [r.status_code for r in answers] == [200] * 5  # was 503 for as long as the slow bodies stayed
    statuses = [read_status(sock, 10) for sock in slow]
    assert statuses == [408] * len(slow)
    assert server.requests_counted() == {"200": 5.0, "408": float(len(slow))}
    more = [slow_body(server.port) for _ in range(8)]  # still trickling when the server is told to stop
    start = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
    assert time.monotonic() - start < 15  # was still alive after 70 s
    for sock in slow + more:
        sock.close()


def test_the_rest_of_a_body_answered_before_it_was_read_must_come_within_the_body_deadline(serve):
    # A body answered before it was read (413 for the size it declares, 503 for a full queue) is read
    # by uvicorn only to be thrown away, for as long as its client sends it: one that sent a few bytes
    # every half second held its connection for ever, past every deadline.
    server = serve(body_timeout_s=1.5, max_body_bytes=1000)
    dribbling = slow_body(server.port, promised=10**12, sent=4)
    assert read_status(dribbling, 10) == 413

    def dribble():
        try:
            while True:
                dribbling.sendall(b"a" * 10)
                time.sleep(0.3)
        except OSError:  # closed by the server
            pass
    threading.Thread(target=dribble, daemon=True).start()
    start = time.monotonic()
    assert closes_within(dribbling, 20)
    assert time.monotonic() - start < 6
    assert server.metrics()[("sentiment_connections_cut_total", (("reason", "body_timeout"),))] == 1
    whole = slow_body(server.port, promised=5000, sent=0)  # sent whole after its answer: the connection goes on
    assert read_status(whole, 10) == 413
    whole.sendall(b"a" * 5000)
    time.sleep(2)  # past the deadline, which the rest of the body met
    whole.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_status(whole, 10) == 200
    dribbling.close()
    whole.close()


def test_a_body_of_tiny_chunks_is_refused_before_it_holds_up_other_requests(serve):
    # h11 parses chunked framing in Python, some microseconds a chunk: one request of a megabyte in
    # one-byte chunks (6 MB sent) held the event loop for 4.6 s, and another client's request with it.
    server = serve()
    body = b'{"text": "' + b"a" * 999_988 + b'"}'
    framed = b"".join(b"1\r\n" + body[i:i + 1] + b"\r\n" for i in range(len(body))) + b"0\r\n\r\n"
    attack = socket.create_connection(("127.0.0.1", server.port))

    def send():
        try:
            attack.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n" + framed)
        except OSError:  # cut by the server
            pass
    sender = threading.Thread(target=send)
    sender.start()
    slowest = 0.0
    for _ in range(20):
        start = time.monotonic()
        assert httpx.post(server.url + "/predict", json={"text": GOOD}, timeout=30).status_code == 200
        slowest = max(slowest, time.monotonic() - start)
    sender.join()
    attack.close()
    assert slowest < 2, f"another client's request took {slowest:.1f} s"
    assert server.metrics()[("sentiment_connections_cut_total", (("reason", "small_chunks"),))] == 1
    assert server.requests_counted()["400"] == 1

    def pieces(count, size):  # what a client streaming its body sends: chunks of its own size
        yield b'{"texts": ['
        for i in range(count):
            yield json.dumps(f"{GOOD} {i}").encode() + (b"," if i < count - 1 else b"") + b" " * size
        yield b"]}"
    for count, size in ((64, 0), (60, 3000)):
        streamed = httpx.post(server.url + "/predict", content=pieces(count, size),
                              headers={"content-type": "application/json"}, timeout=30)
        assert streamed.status_code == 200, streamed.text


@pytest.mark.parametrize("framing", [b"Transfer-Encoding: chunked\r\nContent-Length: 15\r\n",
                                     b"Content-Length: 15\r\nTransfer-Encoding: chunked\r\n"])
def test_a_request_of_two_framings_is_refused_and_its_connection_closed(serve, framing):
    # h11 framed the body by Transfer-Encoding and went on reading the connection after it; a proxy that frames
    # by Content-Length would have sent the bytes after 15 of them as the start of another client's request.
    server = serve()
    smuggled = b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + framing
                     + b'\r\nf\r\n{"text":"good"}\r\n0\r\n\r\n' + smuggled)  # 15 (f) bytes of body
        answer = read_answer(sock, 10)
        head, body = answer.split("\r\n\r\n", 1)
        assert head.startswith("HTTP/1.1 400") and "connection: close" in head.lower()
        assert json.loads(body)["error"]["message"].startswith("Content-Length and Transfer-Encoding both given")
        assert read_answer(sock, 5) == ""  # closed: the bytes after the body were not read as a request
    deadline = time.monotonic() + 5
    while not server.requests_counted() and time.monotonic() < deadline:  # counted as the app lets the request go
        time.sleep(0.05)
    assert server.requests_counted() == {"400": 1.0}
    assert server.metrics()[("sentiment_texts_scored_total", ())] == 0
    assert httpx.post(server.url + "/predict", json={"text": GOOD}).status_code == 200  # one framing is fine
    chunked = httpx.post(server.url + "/predict", content=iter([json.dumps({"text": GOOD}).encode()]),
                         headers={"content-type": "application/json"})
    assert chunked.status_code == 200 and chunked.request.headers["transfer-encoding"] == "chunked"


def test_bodies_on_their_way_are_held_within_one_memory_budget(serve):
    # Every body was held whole while it arrived, with no limit across requests: 500 connections
    # sending 1 MB bodies but for their last bytes grew the service by 640 MB; a few thousand
    # would have it killed for want of memory, every client's request with it.
    server = serve(max_body_bytes=100_000, max_body_bytes_total=250_000, body_timeout_s=30)
    held = [slow_body(server.port, promised=100_000, sent=0, source=f"127.0.0.{2 + i}") for i in range(2)]
    for sock in held:
        sock.sendall(b'{"text": "' + b"a" * 90_000)  # 180,000 bytes held of 250,000
    wait_for_bytes_held(server, 180_000)
    over = slow_body(server.port, promised=100_000, sent=0, source="127.0.0.4")
    over.sendall(b'{"text": "' + b"a" * 90_000)  # would be 270,000
    assert read_status(over, 10) == 503
    small = httpx.post(server.url + "/predict", json={"text": GOOD}, timeout=30)  # still fits
    assert small.status_code == 200
    assert server.metrics()[("sentiment_body_bytes_held", ())] >= 180_000

    def chunks():  # no Content-Length: counted as it comes
        for _ in range(4):
            yield b" " * 30_000

    chunked = httpx.post(server.url + "/predict", content=chunks(), headers={"content-type": "application/json"},
                         timeout=30)
    assert chunked.status_code == 503 and chunked.json()["error"]["type"] == "overloaded"
    assert chunked.headers["retry-after"] == "1"
    assert server.metrics()[("sentiment_refused_total", (("limit", "bodies"),))] == 2
    for sock in held + [over]:
        sock.close()
    deadline = time.monotonic() + 10  # the server sees them go and gives their bytes back
    while server.metrics()[("sentiment_body_bytes_held", ())] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metrics()[("sentiment_body_bytes_held", ())] == 0
    large = httpx.post(server.url + "/predict", json={"text": GOOD, "padding": "a" * 90_000}, timeout=30)
    assert large.status_code == 200


def closes_within(sock, seconds):
    """Whether the server closes `sock` (reads reach end of file) within `seconds`."""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            if sock.recv(4096) == b"":  # what came before it is the rest of an earlier answer
                return True
    except OSError:
        return False
    return False


def wait_for_bytes_held(server, size, seconds=10):
    deadline = time.monotonic() + seconds
    while server.metrics()[("sentiment_body_bytes_held", ())] < size and time.monotonic() < deadline:
        time.sleep(0.05)


def test_one_client_s_bodies_hold_only_its_share_of_the_memory_budget(serve):
    # One address sending slow large bodies could hold the whole budget: every other client's
    # request was answered 503 for as long as its bodies stayed.
    server = serve(max_body_bytes=100_000, max_body_bytes_total=250_000, body_timeout_s=30)  # 125,000 an address
    first = slow_body(server.port, promised=100_000, sent=0, source="127.0.0.2")
    first.sendall(b'{"text": "' + b"a" * 90_000)
    wait_for_bytes_held(server, 90_000)
    second = slow_body(server.port, promised=100_000, sent=0, source="127.0.0.2")
    second.sendall(b'{"text": "' + b"a" * 90_000)  # 180,000 for one address
    refused = read_answer(second, 10)
    assert refused.startswith("HTTP/1.1 503") and "SENTIMENT_MAX_BODY_BYTES_PER_CLIENT" in refused
    other = slow_body(server.port, promised=100_000, sent=0, source="127.0.0.3")
    start = json.dumps({"text": GOOD})[:-1].encode()  # the body's end, "}", comes last, after padding
    other.sendall(start + b" " * (90_000 - len(start)))  # was refused: the first address held 180,000 of 250,000
    wait_for_bytes_held(server, 180_000)
    other.sendall(b" " * 9_999 + b"}")
    assert read_status(other, 30) == 200
    assert server.metrics()[("sentiment_refused_total", (("limit", "client_bodies"),))] == 1
    for sock in (first, second, other):
        sock.close()


def test_a_request_under_way_when_its_client_is_refused_is_not_held_and_one_that_comes_after_is(serve):
    server = serve(max_body_bytes=100_000, max_body_bytes_total=250_000, body_timeout_s=30)  # 125,000 an address

    socks = []

    def body(size):  # a request of one client, its body under way: `size` bytes of the 100,000 promised
        socks.append(slow_body(server.port, promised=100_000, sent=0, source="127.0.0.2"))
        socks[-1].sendall(b'{"text": "' + b"a" * (size - 10))
        return socks[-1]

    under_way, _ = body(60_000), body(60_000)
    wait_for_bytes_held(server, 120_000)
    assert read_status(body(10_000), 10) == 503  # 130,000 for one address: told to wait a second
    under_way.sendall(b"a" * 10_000)  # over its share again, but it came before that 503
    assert read_status(under_way, 10) == 503
    assert server.metrics()[("sentiment_retried_early_total", ())] == 0
    start = time.monotonic()
    assert read_status(body(70_000), 10) == 503  # 130,000 again, and it came within the second: held until it is over
    assert time.monotonic() - start >= 0.5
    assert server.metrics()[("sentiment_retried_early_total", ())] == 1
    for sock in socks:
        sock.close()


def test_a_service_started_without_its_protocol_says_so_once_and_serves(serve):
    # Plain `uvicorn app:app` served without a word, without any of the deadlines and limits below.
    plain, guarded = serve(ready=False, guarded=False), serve(ready=False)
    for server in (plain.wait(), guarded.wait()):
        with httpx.Client(timeout=30) as client:  # one connection kept alive: each of its requests is marked
            answers = [client.post(server.url + "/predict", json={"text": GOOD}) for _ in range(3)]
        assert [r.status_code for r in answers] == [200] * 3
        server.stop()  # and all it wrote is read
    told = "start it with the service's protocol: uvicorn app:app --http app:HTTP"
    assert "".join(plain.output).count(told) == 1, "".join(plain.output)
    assert told not in "".join(guarded.output)


def test_heads_that_never_finish_are_cut_off_and_hold_back_no_one(serve):
    # uvicorn waits for a request head forever: 60 such connections stayed open, holding their
    # file descriptors, for as long as the client liked.
    server = serve(head_timeout_s=1.5)
    slow = []
    for _ in range(40):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # the head, less its end
        slow.append(sock)
    slow += [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]  # nothing at all
    answers = [httpx.post(server.url + "/predict", json={"text": GOOD}, timeout=30) for _ in range(5)]
    assert [r.status_code for r in answers] == [200] * 5
    kept_alive = socket.create_connection(("127.0.0.1", server.port))
    kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_status(kept_alive, 10) == 200
    kept_alive.sendall(b"GET /health HTTP/1.1\r\n")  # its next request's head, never finished
    start = time.monotonic()
    assert all(closes_within(sock, 10) for sock in slow + [kept_alive])
    assert time.monotonic() - start < 5
    assert server.metrics()[("sentiment_connections_cut_total", (("reason", "head_timeout"),))] == 61
    patient = socket.create_connection(("127.0.0.1", server.port))
    for part in (b"GET /health HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):  # slow, but within the deadline
        patient.sendall(part)
        time.sleep(0.4)
    assert read_status(patient, 10) == 200
    for sock in slow + [kept_alive, patient]:
        sock.close()


def pipelined(port, request, megabytes):
    """A connection sending `request` over and over ahead of its answers (HTTP pipelining), `megabytes`
    of them at most; its receive buffer is kept small, as a client that reads slowly has it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    blob = request * (megabytes * 2**20 // len(request))

    def send():
        sent = 0
        while sent < len(blob):
            if not select.select([], [sock], [], 0.5)[1]:
                continue
            try:
                sent += sock.send(blob[sent:sent + 65536])
            except OSError:  # cut by the server
                return
    threading.Thread(target=send, daemon=True).start()
    return sock


def request_bytes(body):
    return (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body)


def test_requests_sent_ahead_of_their_answers_are_read_only_as_they_are_answered(serve):
    # HTTP pipelining: a client may send its next requests before its answers come. Each request's
    # wait for its client to leave let uvicorn read on: two connections sending 12 MB ahead had all
    # of it read into the service's memory within seconds, however slowly it was answered.
    server = serve()
    request = request_bytes(json.dumps({"inputs": [GOOD] * 64}).encode())
    with ThreadPoolExecutor(4) as pool:  # the model's and tokenizer's own memory, before measuring
        list(pool.map(lambda _: post_raw(server.url, request.split(b"\r\n\r\n", 1)[1]), range(16)))
    before = resident_mb(server.process.pid)
    socks = [pipelined(server.port, request, 12) for _ in range(2)]
    answered = [0, 0]

    def read(i):  # the answers are read, so sending them never waits
        try:
            while (got := socks[i].recv(1 << 16)):
                answered[i] += got.count(b"HTTP/1.1 200")
        except OSError:  # closed as the test ends
            pass
    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(2)]
    for reader in readers:
        reader.start()
    time.sleep(8)
    grown = resident_mb(server.process.pid) - before
    other = httpx.post(server.url + "/predict", json={"text": GOOD}, timeout=30)
    assert other.status_code == 200
    assert all(answered), "nothing sent ahead was answered"
    assert grown < 6, f"the service grew by {grown:.0f} MiB"
    for sock in socks:
        sock.close()


def test_a_client_that_reads_no_answer_holds_its_connection_for_a_deadline_not_for_ever(serve):
    # A client that sends requests ahead and reads none of their answers: once its socket is full,
    # each answer waited to be sent for ever. Its connections stayed open (two addresses so could
    # hold every connection the service may have), and SIGTERM never ended the service.
    server = serve(send_timeout_s=1, max_texts=1000, queue_size=1000, max_batch_size=1000)
    request = request_bytes(json.dumps({"inputs": ["a fine film"] * 1000}).encode())  # 100 kB an answer
    silent = pipelined(server.port, request, 16)
    end = time.monotonic() + 8  # first it reads slowly, 40 kB/s: it is taking its answers, and is not cut
    while time.monotonic() < end:
        silent.settimeout(5)
        assert silent.recv(4096)
        time.sleep(0.1)
    assert ("sentiment_connections_cut_total", (("reason", "send_timeout"),)) not in server.metrics()
    deadline = time.monotonic() + 40  # then it reads nothing
    while server.metrics()[("sentiment_connections_open", ())] > 1 and time.monotonic() < deadline:
        time.sleep(0.2)  # only the connection asking remains open
    assert server.metrics()[("sentiment_connections_open", ())] == 1
    assert server.metrics()[("sentiment_connections_cut_total", (("reason", "send_timeout"),))] == 1
    assert httpx.post(server.url + "/predict", json={"text": GOOD}, timeout=30).status_code == 200
    silent.close()
    silent = pipelined(server.port, request, 16)
    time.sleep(4)  # its answers wait, and its next requests are sent
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
    silent.close()


def connect(port, source):
    return socket.create_connection(("127.0.0.1", port), source_address=(source, 0))


def closed_among(socks, count, seconds=10):
    """The sockets of `socks` that the server has closed, once `count` are or `seconds` have passed (none
    of them is sent anything, so a readable one has reached its end)."""
    deadline = time.monotonic() + seconds
    while True:
        closed = select.select(socks, [], [], 0.05)[0]
        if len(closed) >= count or time.monotonic() >= deadline:
            return closed


def test_a_client_that_opens_connections_without_end_takes_no_one_else_s(serve):
    # Each connection holds a file descriptor. One address that kept twice as many connections open
    # as the process may have took every descriptor: accept() failed, every other client's request
    # timed out, and asyncio logged a traceback for each failed accept, 200,000 of them in 6 s.
    server = serve(open_files=256)  # 192 connections, 96 of them one client's
    flooding, flood = threading.Event(), []
    flooding.set()

    def keep_open():  # as many as the process may hold, twice over: each the server closes is opened again
        while flooding.is_set():
            flood[:] = [sock for sock in flood if not select.select([sock], [], [], 0)[0] or sock.close()]
            while len(flood) < 512 and flooding.is_set():
                flood.append(connect(server.port, "127.0.0.2"))
            time.sleep(0.25)

    thread = threading.Thread(target=keep_open)
    started = time.monotonic()
    thread.start()
    try:
        time.sleep(3)
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3"), timeout=10) as other:
            answers = [other.post(server.url + "/predict", json={"text": GOOD}) for _ in range(5)]
        assert [r.status_code for r in answers] == [200] * 5
        metrics = server.metrics()
    finally:
        flooding.clear()
        thread.join()
        for sock in flood:
            sock.close()
    flooded_s = time.monotonic() - started
    assert metrics[("sentiment_connections_refused_total", (("limit", "client_connections"),))] > 512 - 96
    assert metrics[("sentiment_connections_open", ())] <= 96 + 2
    # One line per ACCEPT_LOG_EVERY_S at most: a loaded machine's flood can outlast one such span.
    output = "".join(server.output)
    assert output.count("Too many open files") <= 1 + flooded_s // ACCEPT_LOG_EVERY_S
    assert "Traceback" not in output


def test_connections_beyond_a_client_s_share_are_closed_as_they_come_and_a_proxy_s_count_only_in_all(serve):
    server = serve(max_connections=40, max_connections_per_client=10)
    one = [connect(server.port, "127.0.0.2") for _ in range(20)]
    kept, closed = one[:10], one[10:]
    assert all(closes_within(sock, 5) for sock in closed)
    for sock in kept:  # each still open, and answered
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_status(sock, 10) == 200
    # uvicorn takes client addresses from a proxy on this host (--forwarded-allow-ips): its
    # connections carry many clients', and may be more than one client's share.
    proxy = [connect(server.port, "127.0.0.1") for _ in range(15)]
    answers = [httpx.post(server.url + "/predict", json={"text": GOOD}) for _ in range(3)]  # each a connection
    assert [r.status_code for r in answers] == [200] * 3
    others = [connect(server.port, f"127.0.1.{i}") for i in range(1, 21)]  # 15 more fit, whoever they are from
    assert len(closed_among(others, 5)) == 5
    time.sleep(0.3)
    assert len(closed_among(others, 6, seconds=0)) == 5 and not closed_among(proxy, 1, seconds=0)
    for sock in one[:5]:  # what a client gives back it may take again
        sock.close()
    time.sleep(0.5)
    again = connect(server.port, "127.0.0.2")
    again.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_status(again, 10) == 200
    counted = server.metrics()
    assert counted[("sentiment_connections_refused_total", (("limit", "client_connections"),))] == 10
    assert counted[("sentiment_connections_refused_total", (("limit", "connections"),))] == 5
    for sock in one[5:] + proxy + others + [again]:
        sock.close()


# A WebSocket protocol as uvicorn would run it with `websockets` installed (uvicorn[standard]), for a
# handshake the app refuses: it takes the connection over from the HTTP protocol, then closes it.
REFUSED_WEBSOCKET = """
import asyncio


class RefusedWebSocket(asyncio.Protocol):
    def __init__(self, config, server_state, app_state):
        pass

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(b"HTTP/1.1 403 Forbidden\\r\\ncontent-length: 0\\r\\n\\r\\n")
        self.transport.close()
"""


def test_upgrades_to_websocket_are_plain_requests_and_give_their_connection_back(serve, tmp_path):
    # The service has no WebSocket routes. With a WebSocket library installed, uvicorn handed an upgrade's
    # connection to that library's protocol, so it was never counted as closed: five upgrades from one
    # client, its share, and every later connection of that client was closed as it came.
    (tmp_path / "refused_websocket.py").write_text(REFUSED_WEBSOCKET)
    server = serve(max_connections=10, max_connections_per_client=5, env={"PYTHONPATH": str(tmp_path)},
                   uvicorn_flags=["--ws", "refused_websocket:RefusedWebSocket"])
    upgrade = (b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    for _ in range(8):
        with connect(server.port, "127.0.0.2") as sock:
            sock.sendall(upgrade)
            assert read_status(sock, 10) == 404  # as any unknown path
    with connect(server.port, "127.0.0.2") as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_status(sock, 10) == 200
    deadline = time.monotonic() + 10  # the closes are counted as the server sees them
    while (still := server.metrics()[("sentiment_connections_open", ())]) > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert still == 1  # the metrics request's own


def test_deeply_nested_json_is_a_400_and_every_request_is_counted_once(serve):
    server = serve()
    nested = post_raw(server.url, b"[" * 10000)
    assert nested.status_code == 400 and nested.json()["error"]["type"] == "malformed_json"
    assert post_raw(server.url, b'{"text": [' + b"[" * 5000 + b"]").status_code == 400
    assert httpx.post(server.url + "/predict", json={"text": GOOD}).status_code == 200
    assert server.requests_counted() == {"400": 2.0, "200": 1.0}


def test_small_departures_from_the_contract(serve):
    server = serve()
    upper = post_raw(server.url, json.dumps({"text": GOOD}).encode(), content_type="APPLICATION/JSON; charset=UTF-8")
    assert upper.status_code == 200
    wrong_method = httpx.get(server.url + "/predict")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["error"]["type"] == "http_error"
    sock = slow_body(server.port)  # the client leaves before sending its body
    sock.close()
    deadline = time.monotonic() + 5
    while "499" not in server.requests_counted() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.requests_counted().get("499") == 1.0 and "400" not in server.requests_counted()
    timed = httpx.post(server.url + "/predict", json={"text": GOOD})
    for header in ("x-queue-time", "x-inference-time", "x-total-time"):
        assert float(timed.headers[header]) >= 0
    assert float(timed.headers["x-total-time"]) >= float(timed.headers["x-inference-time"])
    assert float(wrong_method.headers["x-total-time"]) >= 0 and float(upper.headers["x-total-time"]) >= 0


HANGING_APP = """
import threading

from sentiment.config import ServeSettings
from sentiment.connections import http_protocol
from sentiment.serving import create_app, load_predictor


def factory(settings):
    predictor = load_predictor(settings)
    warm = predictor.probabilities

    def hang_after_warm_up(texts):
        predictor.probabilities = lambda texts: threading.Event().wait()  # a hung device: never returns
        return warm(texts)
    predictor.probabilities = hang_after_warm_up
    return predictor


settings = ServeSettings.from_env()
app = create_app(settings, predictor_factory=factory)
HTTP = http_protocol(settings, app.state.metrics)
"""


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=lambda stop: stop.name)
def test_a_service_whose_model_call_hangs_still_stops_when_told(serve, tmp_path, stop):
    # Ctrl-C to a service whose model call never returned (a hung GPU): uvicorn said "Finished server
    # process", and the process then waited for ever for the model thread, as Python does for a thread pool's.
    (tmp_path / "app.py").write_text(HANGING_APP)
    server = serve(uvicorn_flags=["--app-dir", str(tmp_path)], stall_timeout_s=1, request_timeout_s=2)
    assert httpx.post(server.url + "/predict", json={"text": GOOD}, timeout=30).status_code == 504
    assert httpx.get(server.url + "/health").json()["error"]["type"] == "stalled"
    server.process.send_signal(stop)
    server.process.wait(timeout=30)
    server.reader.join(10)
    log = "".join(server.output)
    assert "Finished server process" in log and "Traceback" not in log
    assert re.search(r"a model call has run for \d+ s and is still under way \(a hung device\?\); the service stops "
                     r"without it", log)


def test_a_request_uvicorn_cannot_parse_still_gets_a_json_error(serve):
    server = serve()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"NOT A REQUEST LINE\r\n\r\n")
        sock.settimeout(10)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["type"] == "bad_request"


@pytest.mark.parametrize("problem, logged", [
    ("broken config", "config.json"),
    ("no such device", "SENTIMENT_DEVICE: 'nonsense' is not a device"),  # the fault of a setting: named so
    ("no such folder", "no such model folder"),
])
def test_a_model_that_will_not_load_is_not_described_to_clients(serve, tmp_path, trained_model, problem, logged):
    broken = tmp_path / "broken"
    if problem != "no such folder":
        shutil.copytree(trained_model, broken)
    if problem == "broken config":
        (broken / "config.json").write_text("{not json")
    settings = {"device": "nonsense"} if problem == "no such device" else {}
    server = serve(model=broken, ready=False, **settings).wait("/metrics")
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/health").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    answer = httpx.post(server.url + "/predict", json={"text": GOOD})
    assert answer.status_code == 503 and answer.json()["error"]["message"].startswith("model not loaded")
    assert str(tmp_path) not in answer.text and str(tmp_path) not in httpx.get(server.url + "/ready").text
    assert httpx.get(server.url + "/health").status_code == 503
    server.stop()
    log = "".join(server.output)
    # The detail is in the log, in one line: a mistake to fix, not a bug to trace.
    # The variable that names the folder is named with it: the folder may be the default, set by no one.
    assert f"could not load the model from {broken} (SENTIMENT_MODEL): " in log and logged in log
    assert "Traceback" not in log


def test_labels_the_log_cannot_show_do_not_fail_the_service(serve, tmp_path, trained_model, monkeypatch):
    # Under a Latin-1 locale the line saying which labels were loaded raised UnicodeEncodeError, which
    # counted as a failed load: /health answered 503, and a liveness probe would restart it for ever.
    folder = tmp_path / "model"
    shutil.copytree(trained_model, folder)
    settings = json.loads((folder / "sentiment.json").read_text())
    (folder / "sentiment.json").write_text(json.dumps({**settings, "labels": ["消极", "积极"]}))
    monkeypatch.setenv("PYTHONIOENCODING", "latin-1")
    server = serve(model=folder)
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.post(server.url + "/predict", json={"text": GOOD}).json()["label"] == "积极"


@pytest.mark.parametrize("name, value", [("REQUEST_TIMEOUT_S", "nan"), ("MAX_WAIT_MS", "inf")])
def test_settings_that_are_not_finite_stop_the_service_at_start(trained_model, name, value):
    server = Server(trained_model, **{name.lower(): value})
    assert server.process.wait(timeout=60) != 0
    server.stop()
    output = "".join(server.output)
    assert f"SENTIMENT_{name}" in output and "Traceback" not in output


def requests_by_worker(folder):
    """{pid: /predict requests with status 200} from the counter files workers write into a shared metrics folder."""
    counts = {}
    for path in folder.glob("counter_*.db"):
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            name, _, labels, _ = json.loads(key)
            if name == "sentiment_requests" and labels == {"status": "200"}:
                counts[int(path.stem.split("_")[1])] = value
    return counts


def test_workers_that_share_a_metrics_folder_are_counted_together_in_every_scrape(trained_model, tmp_path):
    # Under `uvicorn --workers 2` a scrape reaches one worker, which counted only the requests it had answered.
    shared = tmp_path / "metrics"
    shared.mkdir()
    server = Server(trained_model, uvicorn_flags=["--workers", "2"], env={"PROMETHEUS_MULTIPROC_DIR": str(shared)})
    try:
        def ready_everywhere():  # any worker may take a new connection: both are ready when many in a row say so
            server.wait()
            deadline = time.monotonic() + 60
            while sum(httpx.get(server.url + "/ready").status_code == 200 for _ in range(16)) < 16:
                assert time.monotonic() < deadline, "".join(server.output)
        ready_everywhere()
        with ThreadPoolExecutor(8) as pool:  # a new connection each, taken by whichever worker is free
            statuses = list(pool.map(lambda _: httpx.post(server.url + "/predict", json={"text": GOOD}).status_code,
                                     range(60)))
        assert statuses == [200] * 60
        by_worker = requests_by_worker(shared)
        assert len(by_worker) == 2 and all(by_worker.values()) and sum(by_worker.values()) == 60  # both answered
        for _ in range(10):  # whichever worker answers the scrape
            assert server.requests_counted() == {"200": 60}
        # A killed worker is replaced; what it had open leaves the live gauges' sums, its counts stay.
        killed = min(by_worker)
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while list(shared.glob(f"gauge_livesum_{killed}.db")):
            assert time.monotonic() < deadline, "".join(server.output)
            time.sleep(0.2)
        ready_everywhere()
        assert server.requests_counted()["200"] == 60
        assert server.metrics()[("sentiment_queue_depth", ())] == 0
    finally:
        server.end_workers()
    assert "PROMETHEUS_MULTIPROC_DIR" not in "".join(server.output)


def test_workers_without_a_shared_metrics_folder_are_told_what_metrics_count_and_a_missing_folder_stops_it(
        trained_model, tmp_path):
    server = Server(trained_model, uvicorn_flags=["--workers", "2"])
    try:
        server.wait()
        deadline = time.monotonic() + 60
        while "".join(server.output).count("set PROMETHEUS_MULTIPROC_DIR to an empty folder") < 2:
            assert time.monotonic() < deadline, "".join(server.output)
            time.sleep(0.2)
    finally:
        server.end_workers()
    missing = tmp_path / "no such folder"
    server = Server(trained_model, env={"PROMETHEUS_MULTIPROC_DIR": str(missing)})
    assert server.process.wait(timeout=60) != 0
    server.stop()
    output = "".join(server.output)
    assert f"error: PROMETHEUS_MULTIPROC_DIR={missing}: no such folder; make it (empty)" in output
    assert "Traceback" not in output


def test_predict_sentiment_sh_sends_long_reviews_and_refuses_bytes_that_are_not_utf8(serve):
    server = serve(max_chars=100000, max_body_bytes=1 << 20)
    long_review = GOOD + " é" * 30000  # over 128 KiB as JSON with every é escaped
    answer = predict_sh(server.url, long_review)
    assert answer.returncode == 0, answer.stderr  # was "Argument list too long", blamed on the server
    assert json.loads(answer.stdout)["label"] in ("positive", "negative")
    latin1 = predict_sh(server.url, stdin="Un film génial, j'ai adoré.".encode("latin-1"))
    assert latin1.returncode == 2 and b"not valid UTF-8" in latin1.stderr
    assert b"Traceback" not in latin1.stderr and len(latin1.stderr.strip().splitlines()) == 1


def test_the_hugging_face_inference_client_works_unchanged(serve):
    from huggingface_hub import InferenceClient
    server = serve()
    client = InferenceClient(server.url + "/predict")
    ranked = client.text_classification(GOOD)
    assert [r.label for r in ranked] == ["positive", "negative"]
    assert ranked[0].score > ranked[1].score and abs(ranked[0].score + ranked[1].score - 1) < 1e-6
    assert [r.label for r in client.text_classification(GOOD, top_k=1)] == ["positive"]
    many = httpx.post(server.url + "/predict", json={"inputs": [GOOD, "The plot was dreadful. Avoid it."]}).json()
    assert [answer[0]["label"] for answer in many] == ["positive", "negative"]
    refused = httpx.post(server.url + "/predict", json={"inputs": GOOD, "parameters": {"function_to_apply": "none"}})
    assert refused.status_code == 422
    empty = httpx.post(server.url + "/predict", json={"inputs": [GOOD, " "]})
    assert empty.status_code == 422 and empty.json()["error"]["message"] == "inputs[1] is empty"


def test_ready_waits_for_the_model_while_health_answers(trained_model):
    server = Server(trained_model)
    try:
        seen = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                seen.add((httpx.get(server.url + "/health").status_code, httpx.get(server.url + "/ready").status_code))
            except httpx.TransportError:
                continue
            if (200, 200) in seen:
                break
        assert (200, 200) in seen and all(health == 200 for health, _ in seen)
    finally:
        server.stop()


def test_a_client_that_leaves_while_others_wait_changes_nothing_for_them(serve):
    server = serve()

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            leaving = asyncio.ensure_future(client.post("/predict", json={"texts": [GOOD] * 32}))
            await asyncio.sleep(0.01)
            leaving.cancel()
            return await asyncio.gather(*[client.post("/predict", json={"text": GOOD}) for _ in range(16)])

    answers = asyncio.run(scenario())
    assert [r.status_code for r in answers] == [200] * 16


def misbehave(port, kind, texts, rng):
    """One client of `test_a_crowd_of_misbehaving_clients…`: sends `texts` the way `kind` says, from a random
    loopback address; returns the status it was answered (None if it did not wait) and the answer's body."""
    body = json.dumps({"texts": texts}).encode()
    sock = socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.0.{rng.randint(1, 4)}", 0))
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    if kind == "too large":
        body = b'{"texts": ["' + b"a" * 30_000 + b'"]}'
        head = re.sub(rb"Content-Length: \d+", b"Content-Length: %d" % len(body), head)
        body = body[:rng.randint(0, len(body))]
    elif kind == "bad json":
        body = body[:rng.randint(1, len(body) - 1)]
        head = re.sub(rb"Content-Length: \d+", b"Content-Length: %d" % len(body), head)
    elif kind == "chunked":
        head = head.replace(b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked")
        cuts = sorted(rng.sample(range(1, len(body)), min(5, len(body) - 1)))
        body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in
                        (body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)]))) + b"0\r\n\r\n"
    whole = head + body
    if kind == "head cut":
        whole = whole[:rng.randint(0, len(head) - 1)]
    elif kind == "body cut":
        whole = whole[:rng.randint(len(head), len(whole) - 1)]
    elif kind == "sent ahead":
        whole = whole * rng.randint(2, 8)
    try:
        for start in range(0, len(whole), 1000):  # in parts, so a few clients interleave
            sock.sendall(whole[start:start + 1000])
        if kind in ("left", "reset") or (kind.endswith("cut") and rng.random() < 0.5):
            time.sleep(rng.random() * 0.2)
            if kind == "reset" or rng.random() < 0.5:  # an RST rather than a FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return None, ""
        answer = read_answer(sock, 20)
        status = int(answer.split()[1]) if answer.startswith("HTTP/") else None
        return status, answer.partition("\r\n\r\n")[2]
    finally:
        sock.close()


def test_a_crowd_of_misbehaving_clients_leaves_every_count_at_rest_and_the_good_requests_answered_right(serve):
    # Clients that leave, reset, cut their heads and bodies short, send ahead, send too much or bad JSON,
    # all at once, each at a random moment: those that behave get their right answers, every other gets
    # the status its fault deserves, and once they are gone nothing they held is still counted. One case
    # found so: a refusal that came as its client left was logged by asyncio as never retrieved.
    server = serve(body_timeout_s=2, head_timeout_s=2, send_timeout_s=2, max_body_bytes=20_000,
                   max_body_bytes_total=200_000, queue_size=64, max_texts=16)
    reviews = [GOOD, "Dreadful and boring. Avoid it.", "meh", "Great cast, dull plot."]
    truth = {text: httpx.post(server.url + "/predict", json={"text": text}).json()["label"] for text in reviews}
    allowed = {"good": {200, 503}, "chunked": {200, 503}, "sent ahead": {200, 503}, "too large": {413, 503, None},
               "bad json": {400, 503}, "left": {None}, "reset": {None}, "head cut": {None, 408},
               "body cut": {None, 408, 503}}
    rng = random.Random(5)
    clients = [(rng.choice(list(allowed) + ["good"] * 3), [rng.choice(reviews) for _ in range(rng.randint(1, 4))],
                random.Random(rng.random())) for _ in range(150)]
    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(lambda client: misbehave(server.port, *client), clients))
    for (kind, texts, _), (status, body) in zip(clients, answers):
        assert status in allowed[kind], (kind, status, body)
        if status == 200:
            assert [a["label"] for a in json.loads(body)["predictions"]] == [truth[t] for t in texts], kind
    assert sum(kind == "good" and status == 200 for (kind, *_), (status, _) in zip(clients, answers)) > 5
    deadline = time.monotonic() + 10  # the last connections' ends are read
    while server.metrics()[("sentiment_connections_open", ())] > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    metrics = server.metrics()
    assert metrics[("sentiment_connections_open", ())] == 1  # this request's own
    assert metrics[("sentiment_queue_depth", ())] == 0 and metrics[("sentiment_body_bytes_held", ())] == 0
    assert httpx.post(server.url + "/predict", json={"text": GOOD}).json()["label"] == truth[GOOD]
    server.stop()
    assert "Traceback" not in "".join(server.output), "".join(server.output)
