import asyncio
import gc
import gzip
import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from helpers import ROOT, FakePredictor, free_port, predict_sh
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from sentiment.batcher import MicroBatcher, QueueFull
from sentiment.config import ServeSettings
from sentiment.serving import GIL_SWITCH_S, RetryTimes, ServiceMetrics, client_of, create_app


def client_for(predictor, **settings):
    app = create_app(ServeSettings(**settings), predictor_factory=lambda s: predictor)
    return TestClient(app)


def samples(metrics_text):
    """{(name, labels as a sorted tuple): value} of every sample on a /metrics page."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics_text) for s in family.samples}


def wait_ready(client, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError("the service never became ready")


@pytest.fixture
def real_client(trained_model):
    with TestClient(create_app(ServeSettings(model=str(trained_model)))) as client:
        wait_ready(client)
        yield client


def test_predict_one_text_and_many_in_order(real_client):
    one = real_client.post("/predict", json={"text": "The acting was superb. I loved it."})
    assert one.status_code == 200
    assert one.json()["label"] == "positive" and set(one.json()["scores"]) == {"negative", "positive"}
    many = real_client.post("/predict", json={"texts": ["The plot was dreadful. Avoid it.", "A real treat."]})
    assert [p["label"] for p in many.json()["predictions"]] == ["negative", "positive"]
    ready = real_client.get("/ready").json()
    assert ready["labels"] == ["negative", "positive"] and ready["status"] == "ok"
    assert real_client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("body, where", [
    ({"text": "\x00"}, "text"),
    ({"texts": ["A real treat.", "\u200b \u200b"]}, "texts[1]"),
    ({"inputs": "\u0301"}, "inputs"),
    ({"inputs": ["A real treat.", "\x01"]}, "inputs[1]"),
])
def test_a_text_the_tokenizer_keeps_nothing_of_is_a_422_naming_it(real_client, body, where):
    response = real_client.post("/predict", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "empty_text" and error["message"].startswith(f"{where} ")
    assert "nothing to score" in error["message"]
    assert real_client.post("/predict", json={"text": "A real treat."}).json()["label"] == "positive"


def test_a_shared_metrics_folder_that_cannot_be_used_is_named_with_why(tmp_path, monkeypatch):
    # A file there, or a folder the service's user may not write into, failed inside prometheus-client with
    # a traceback at the first request counted, after the model had loaded.
    a_file = tmp_path / "metrics"
    a_file.write_text("")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(a_file))
    with pytest.raises(ValueError, match=f"^PROMETHEUS_MULTIPROC_DIR={a_file}: not a folder; name an empty folder"):
        ServiceMetrics()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert ServiceMetrics().folder == str(tmp_path)
    # Tests run as root here, whom no mode bits stop: the refusal the kernel gives any other user, stood in for.
    monkeypatch.setattr(os, "access", lambda path, mode: not (path == str(tmp_path) and mode & os.W_OK))
    with pytest.raises(ValueError, match=f"^PROMETHEUS_MULTIPROC_DIR={tmp_path}: the service cannot write into it"):
        ServiceMetrics()


def test_ready_is_503_until_the_model_is_loaded_while_health_says_alive():
    gate = threading.Event()

    def slow_factory(settings):
        gate.wait(10)
        return FakePredictor()

    with TestClient(create_app(ServeSettings(), predictor_factory=slow_factory)) as client:
        assert client.get("/ready").status_code == 503
        assert client.get("/health").status_code == 200 and client.get("/health").json()["status"] == "loading"
        refused = client.post("/predict", json={"text": "good"})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "not_ready"
        gate.set()
        wait_ready(client)
        assert client.post("/predict", json={"text": "good"}).json()["label"] == "positive"


@pytest.mark.parametrize("kwargs, status, kind", [
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "malformed_json"),
    ({"json": {"text": 5}}, 422, "invalid_request"),
    ({"json": {"review": "good"}}, 422, "invalid_request"),
    ({"json": {"texts": "good"}}, 422, "invalid_request"),
    ({"json": {"text": "   "}}, 422, "empty_text"),
    ({"json": {"texts": ["good", "<br /><br />"]}}, 422, "empty_text"),
    ({"json": {"texts": ["good"] * 9}}, 413, "too_many_texts"),
    ({"json": {"text": "x" * 101}}, 413, "text_too_long"),
    ({"json": {"text": "good " * 300}}, 413, "body_too_large"),
    ({"content": b"text=good", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415,
     "unsupported_media_type"),
])
def test_bad_requests_get_json_errors_with_the_right_status(kwargs, status, kind):
    with client_for(FakePredictor(), max_texts=8, max_chars=100, max_body_bytes=1000) as client:
        wait_ready(client)
        response = client.post("/predict", **kwargs)
        assert response.status_code == status
        assert response.json()["error"]["type"] == kind and response.json()["error"]["message"]
        if "texts" in kwargs.get("json", {}) and kind == "empty_text":
            assert response.json()["error"]["message"].startswith("texts[1] is only markup")
        assert client.get("/nowhere").json()["error"]["type"] == "http_error"


def test_a_text_that_is_not_a_string_is_named_in_json_s_words():
    # It was Python's: "texts[1] must be a string, got NoneType".
    with client_for(FakePredictor()) as client:
        wait_ready(client)
        for body, said in (({"texts": ["good", None]}, "texts[1] must be a string, got a JSON null"),
                           ({"text": ["good"]}, "text must be a string, got a JSON array"),
                           ({"text": {"en": "good"}}, "text must be a string, got a JSON object"),
                           ({"inputs": 5}, "inputs must be a string, got a JSON number")):
            response = client.post("/predict", json=body)
            assert response.status_code == 422 and response.json()["error"]["message"] == said


@pytest.mark.parametrize("body, key", [
    (b'{"text": "dreadful", "text": "good"}', '"text"'),
    (b'{"inputs": "good", "parameters": {"top_k": 1, "top_k": 0}}', '"top_k"'),
    (b'{"texts": ["good"], "' + b"k" * 5000 + b'": 1, "' + b"k" * 5000 + b'": 2}', '"' + "k" * 40 + '…"'),
    (b'{"texts": ["good"], "\\ud800": 1, "\\ud800": 2}', '"\\ud800"'),
])
def test_a_key_given_twice_is_refused_not_taken_at_its_last_value(body, key):
    # Python's JSON keeps the last value of a key given twice, other parsers the first: a proxy that checked
    # "dreadful" let "good" through, and the service scored a text no one in between had seen.
    with client_for(FakePredictor()) as client:
        wait_ready(client)
        response = client.post("/predict", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422 and response.json()["error"]["type"] == "invalid_request"
        assert response.json()["error"]["message"] == f"the key {key} is given twice in one object; give each key once"
        assert client.post("/predict", content=b'{"text": "good", "parameters": {}}',
                           headers={"content-type": "application/json"}).status_code == 200


@pytest.mark.parametrize("function, asked, status", [
    ("softmax", "SOFTMAX", 200), ("softmax", "sigmoid", 422), ("sigmoid", "sigmoid", 200),
    ("sigmoid", "softmax", 422), ("sigmoid", "tanh", 422),
])
def test_function_to_apply_is_the_model_s_own_or_refused(function, asked, status):
    # A model whose scores are sigmoids (multi-label, or one logit) was refused "sigmoid" and taken at its word
    # with "softmax": every model's scores were said to be a softmax's.
    with client_for(FakePredictor(function=function)) as client:
        wait_ready(client)
        response = client.post("/predict", json={"inputs": "good", "parameters": {"function_to_apply": asked}})
        assert response.status_code == status
        if status == 422:
            message = response.json()["error"]["message"]
            assert message.endswith(f'this model\'s scores come from "{function}"')
            assert ("the pipeline's are softmax, sigmoid and none" in message) == (asked == "tanh")


LATIN_1 = '{"text": "caf\u00e9 au lait"}'.encode("latin-1")


@pytest.mark.parametrize("content, headers, status, message", [
    # Each was "the body is not valid JSON".
    (LATIN_1, {}, 400, "the body is not UTF-8 (at byte 13); send JSON as UTF-8"),
    (LATIN_1, {"content-type": "application/json; charset=ISO-8859-1"}, 415, "charset=iso-8859-1: send JSON as UTF-8"),
    (gzip.compress(b'{"text": "good"}', mtime=0), {"content-encoding": "gzip"}, 415,
     "Content-Encoding gzip is not accepted: send the body uncompressed"),
])
def test_a_body_that_is_not_plain_utf8_says_what_to_send(content, headers, status, message):
    with client_for(FakePredictor()) as client:
        wait_ready(client)
        response = client.post("/predict", content=content, headers={"content-type": "application/json", **headers})
        assert response.status_code == status and response.json()["error"]["message"] == message
        quoted = client.post("/predict", content=b'{"text": "good"}',
                             headers={"content-type": 'application/json; charset="UTF-8"'})
        assert quoted.status_code == 200


def test_a_model_error_fails_its_batch_with_500_and_the_service_goes_on():
    with client_for(FakePredictor()) as client:
        wait_ready(client)
        failed = client.post("/predict", json={"text": "boom"})
        assert failed.status_code == 500 and "Traceback" not in failed.text
        assert failed.json()["error"]["type"] == "model_error"
        assert client.post("/predict", json={"text": "good"}).status_code == 200


def test_a_failing_batch_is_retried_text_by_text_so_only_the_guilty_request_fails(caplog):
    predictor = FakePredictor(delay=0.3, batch_size=16)
    with client_for(predictor) as client:
        wait_ready(client)
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client.post, "/predict", json={"text": "boom" if i == 3 else f"good {i}"})
                       for i in range(8)]
            answers = [f.result() for f in futures]
    statuses = [a.status_code for a in answers]
    assert statuses[3] == 500 and statuses[:3] + statuses[4:] == [200] * 7
    assert any(len(b) > 1 for b in predictor.batches) or len(predictor.batches) >= 7
    assert any(r.name == "sentiment.batcher" and r.levelname == "ERROR" for r in caplog.records)  # logged


def test_a_model_call_that_never_returns_fails_health_and_readiness():
    # /health said "ok" while every request timed out behind a model call that never returned (a
    # hung GPU): a liveness probe never restarted the process.
    gate = threading.Event()
    gate.set()  # the warm-up passes
    with client_for(FakePredictor(gate=gate), stall_timeout_s=0.5) as client:
        wait_ready(client)
        gate.clear()  # the next model call hangs (for 10 s at most)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.post, "/predict", json={"text": "good"})
            time.sleep(1.0)
            health, readiness = client.get("/health"), client.get("/ready")
            gate.set()
            assert waiting.result().status_code == 200
    for answer in (health, readiness):
        assert answer.status_code == 503 and answer.json()["error"]["type"] == "stalled"
        message = answer.json()["error"]["message"]
        assert re.fullmatch(r"a model call has run for [1-9]\d* s, over SENTIMENT_STALL_TIMEOUT_S \(0.5 s\)", message)


def test_a_device_that_can_no_longer_compute_fails_health_and_every_request_at_once():
    # After a device-side assert or an illegal memory access, every CUDA call of the process fails. The
    # service answered 500 to every request, trying each text of each batch again alone, while /health
    # said "ok": no liveness probe restarted it.
    class DeadAfterBoom(FakePredictor):
        calls = 0

        def probabilities(self, texts):
            self.calls += 1
            if self.failure:
                raise RuntimeError("CUDA error: device-side assert triggered")
            try:
                return super().probabilities(texts)
            except ValueError:
                self.failure = "AcceleratorError: CUDA error: device-side assert triggered"
                raise

    predictor = DeadAfterBoom()
    with client_for(predictor) as client:
        wait_ready(client)
        assert client.post("/predict", json={"text": "good"}).status_code == 200
        calls = predictor.calls
        answers = [client.post("/predict", json={"text": text}) for text in ("boom", "good", "good")]
        health, readiness = client.get("/health"), client.get("/ready")
    assert predictor.calls == calls + 1  # nothing more is asked of a device that cannot compute
    message = ("cpu can no longer compute (AcceleratorError: CUDA error: device-side assert triggered); every "
               "request fails until the service is restarted")
    for answer in answers + [health, readiness]:
        assert answer.status_code == 503 and answer.json()["error"] == {"type": "stalled", "message": message}


def test_an_answer_that_cannot_be_made_fails_its_request_and_not_the_batcher():
    # An error while making one text's answer ended the batching task: that request and every one
    # after it waited for its timeout, and /health still said "ok".
    class OddAnswers(FakePredictor):
        def answer(self, probs):
            if probs[0] == 0.8:  # not a "good" text
                raise ValueError("no answer")
            return super().answer(probs)

    with client_for(OddAnswers(), request_timeout_s=3) as client:
        wait_ready(client)
        failed = client.post("/predict", json={"text": "dull"})
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "model_error"
        assert client.post("/predict", json={"text": "good"}).status_code == 200
        assert client.get("/health").status_code == 200


def test_a_request_that_waits_too_long_gets_504():
    with client_for(FakePredictor(delay=1.0), request_timeout_s=0.2) as client:
        wait_ready(client)
        response = client.post("/predict", json={"text": "good"})
        assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"


def test_a_full_queue_answers_503_at_once_while_admitted_requests_finish():
    gate = threading.Event()
    predictor = FakePredictor(gate=gate, batch_size=1)
    with client_for(predictor, queue_size=4, max_texts=4) as client:
        gate.set()
        wait_ready(client)  # the warm-up call has passed the gate
        gate.clear()
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(client.post, "/predict", json={"text": f"good {i}"}) for i in range(12)]
            deadline = time.monotonic() + 10  # at most 4 queued and 1 at the gate: 7 or more answered at once
            while sum(f.done() for f in futures) < 7 and time.monotonic() < deadline:
                time.sleep(0.02)
            overflow = [f.result(timeout=2) for f in futures if f.done()]
            gate.set()
            answers = [f.result(timeout=10) for f in futures]
        assert overflow and all(r.status_code == 503 for r in overflow)
        assert all(r.headers["retry-after"] for r in overflow)
        statuses = sorted(r.status_code for r in answers)
        assert statuses.count(200) >= 4 and set(statuses) == {200, 503}
        refused = samples(client.get("/metrics").text)[("sentiment_refused_total", (("limit", "queue"),))]
        assert refused == statuses.count(503)


def test_a_client_back_before_its_retry_after_gets_its_503_when_that_time_is_over():
    # A client that retried at once got each 503 at once: hundreds a second, each read, answered and
    # counted by the event loop every other client's request needs.
    gate = threading.Event()
    with client_for(FakePredictor(gate=gate, batch_size=1), queue_size=4, max_texts=4) as client:
        gate.set()
        wait_ready(client)
        gate.clear()
        with ThreadPoolExecutor(5) as pool:
            admitted = [pool.submit(client.post, "/predict", json={"text": f"good {i}"}) for i in range(5)]
            deadline = time.monotonic() + 10  # one at the gate, four queued: the queue is full
            while client.app.state.batcher.queue.qsize() < 4 and time.monotonic() < deadline:
                time.sleep(0.02)

            def post():
                start = time.monotonic()
                return client.post("/predict", json={"text": "good"}), time.monotonic() - start

            (first, _), (again, again_s) = post(), post()
            time.sleep(float(again.headers["retry-after"]))  # as it asks
            later, _ = post()
            gate.set()
            assert [f.result(timeout=10).status_code for f in admitted] == [200] * 5
    assert first.status_code == again.status_code == later.status_code == 503
    assert again.headers["retry-after"] == "1" and again_s >= 0.9  # held until a second after the first 503
    counted = samples(client.get("/metrics").text)
    assert counted[("sentiment_retried_early_total", ())] == 1  # only `again`: a client that waits as told is not held
    assert counted[("sentiment_refused_total", (("limit", "queue"),))] == 3


def test_the_times_of_refusals_are_forgotten_once_their_retry_after_is_over(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    times = RetryTimes(1.0)
    for i in range(1000):
        times.tell(f"10.0.{i // 256}.{i % 256}")
    assert times.of("10.0.0.0") == 101.0 and times.of("10.9.9.9") < 100.0
    now[0] += 0.5
    times.tell("10.0.0.7")  # again: now the last to be told
    assert times.of("10.0.0.7") == 101.5 and times.of("10.0.0.8") == 101.0
    now[0] += 0.75
    times.tell("192.0.2.1")  # the others may try again by now: forgotten, so the table stays small
    assert list(times.until) == ["10.0.0.7", "192.0.2.1"] and times.of("10.0.0.8") < now[0]


def test_concurrent_requests_share_batches():
    predictor = FakePredictor(delay=0.2, batch_size=16)
    with client_for(predictor) as client:
        wait_ready(client)
        warm_up = len(predictor.batches)
        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda i: client.post("/predict", json={"text": f"good {i}"}), range(10)))
        assert all(a.status_code == 200 for a in answers)
        metrics = samples(client.get("/metrics").text)
        assert max(len(b) for b in predictor.batches[warm_up:]) > 1
        assert ("sentiment_batch_size_bucket", (("le", "1.0"),)) in metrics
        ones = metrics["sentiment_batch_size_bucket", (("le", "1.0"),)]
        total = metrics["sentiment_batch_size_count", ()]
        assert total > ones  # some batches held more than one text
        assert metrics["sentiment_requests_total", (("status", "200"),)] == 10
        assert metrics["sentiment_request_seconds_count", (("status", "200"),)] == 10
        assert metrics["sentiment_texts_scored_total", ()] == 10


def test_texts_of_a_departed_client_are_dropped_and_take_no_place_in_a_batch():
    async def scenario():
        gate = threading.Event()
        predictor = FakePredictor(gate=gate, batch_size=2)
        batcher = MicroBatcher(predictor, ServeSettings(), ServiceMetrics())
        first = asyncio.create_task(batcher.submit(["good first"], "a"))  # occupies the model
        await asyncio.sleep(0.05)
        left = asyncio.create_task(batcher.submit(["good left 1", "good left 2"], "b"))
        stayed = asyncio.create_task(batcher.submit(["bad stayed 1", "bad stayed 2"], "c"))
        await asyncio.sleep(0.05)
        left.cancel()  # the client went away while its texts waited
        gate.set()
        answers = await asyncio.gather(first, stayed)
        batcher.task.cancel()
        return predictor.batches, answers

    batches, answers = asyncio.run(scenario())
    # Before, each departed text took a place in a batch and was dropped after: two batches of one.
    assert batches == [["good first"], ["bad stayed 1", "bad stayed 2"]]
    assert [a[0]["label"] for a in answers[1]] == ["negative", "negative"]


def test_a_refusal_that_comes_as_the_client_leaves_is_not_left_for_asyncio_to_log(caplog):
    # The queue refused the texts (their room was taken while the body came) just as the client left: on
    # Python 3.11 the cancelled `wait_for` still ended with that QueueFull, nothing retrieved it, and
    # asyncio logged "Task exception was never retrieved" with two tracebacks (10 to 20 of them a minute
    # under a flood of misbehaving clients).
    async def refuse(texts, client):
        raise QueueFull("the queue is full (SENTIMENT_QUEUE_SIZE); retry shortly", "queue")

    async def leave(client):
        client.app.state.batcher.submit = refuse
        sent, received = [], [{"type": "http.request", "body": b'{"text": "good"}', "more_body": False}]

        async def receive():
            return received.pop(0) if received else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
        await client.app(scope, receive, send)
        for _ in range(5):  # the scoring task's last steps
            await asyncio.sleep(0)
        gc.collect()  # an unretrieved exception is logged as its task is freed
        return sent[0]["status"]

    caplog.set_level(logging.ERROR, logger="asyncio")
    with client_for(FakePredictor()) as client:
        wait_ready(client)
        # 499 where the leaving is seen first (wait_for runs the call as a task of its own before Python 3.12),
        # 503 where the refusal is (from 3.12 it runs the call in place, to its first wait)
        assert client.portal.call(leave, client) in (499, 503)
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


def test_a_request_of_many_texts_does_not_hold_back_one_that_comes_after_it():
    async def scenario():
        gate = threading.Event()
        predictor = FakePredictor(gate=gate, batch_size=4)
        batcher = MicroBatcher(predictor, ServeSettings(), ServiceMetrics())
        first = asyncio.create_task(batcher.submit(["good first"], "a"))  # occupies the model
        await asyncio.sleep(0.05)
        many = asyncio.create_task(batcher.submit([f"good {i}" for i in range(12)], "a"))
        await asyncio.sleep(0.01)
        one = asyncio.create_task(batcher.submit(["bad one"], "a"))
        await asyncio.sleep(0.05)
        gate.set()
        answers = await asyncio.gather(first, many, one)
        batcher.task.cancel()
        return predictor.batches, answers

    batches, answers = asyncio.run(scenario())
    # Texts are taken from waiting requests in turn: first come, first served put "bad one" fifth.
    assert batches[1] == ["good 0", "bad one", "good 1", "good 2"]
    assert sorted(text for batch in batches for text in batch) == sorted(
        ["good first", "bad one", *(f"good {i}" for i in range(12))])
    assert [a[0]["label"] for a in answers[1]] == ["positive"] * 12 and answers[2][0][0]["label"] == "negative"


def test_a_client_of_many_requests_gets_one_turn_in_each_round_and_gives_back_what_is_beyond_its_share():
    async def scenario():
        gate = threading.Event()
        predictor = FakePredictor(gate=gate, batch_size=1)
        batcher = MicroBatcher(predictor, ServeSettings(queue_size=8, max_texts=2), ServiceMetrics())
        first = asyncio.create_task(batcher.submit(["good first"], "greedy"))  # occupies the model
        await asyncio.sleep(0.05)
        greedy = [asyncio.create_task(batcher.submit([f"good {i}"], "greedy")) for i in range(9)]
        await asyncio.sleep(0.01)
        alone = batcher.queue.qsize()
        polite = asyncio.create_task(batcher.submit(["bad polite"], "polite"))
        crowd = [asyncio.create_task(batcher.submit(["good x", "good y"], "crowd")) for _ in range(2)]
        await asyncio.sleep(0.05)
        gate.set()
        answers = await asyncio.gather(first, *greedy, polite, *crowd, return_exceptions=True)
        batcher.task.cancel()
        return predictor.batches, answers, alone

    batches, answers, alone = asyncio.run(scenario())
    greedy, polite, crowd = answers[1:10], answers[10], answers[11:]
    # Alone, the greedy client fills the whole queue of 8 (its share is 4); its ninth request finds it full.
    assert alone == 8 and greedy[8].limit == "queue" and "the queue is full" in str(greedy[8])
    # Others push out its newest requests, one for the polite client's text and two for the crowd's first
    # request, and no further than its share: the crowd's second request finds the queue full.
    pushed = [i for i, a in enumerate(greedy[:8]) if isinstance(a, QueueFull)]
    assert pushed == [5, 6, 7] and all("pushed out of the full queue" in str(greedy[i]) for i in pushed)
    assert all(greedy[i].limit == "client_queue" for i in pushed)
    assert polite[0][0]["label"] == "negative"
    assert not isinstance(crowd[0], Exception) and "queue is full" in str(crowd[1])
    # Clients take turns: the polite client's one text comes after one greedy text, not after all five.
    assert batches[:4] == [["good first"], ["good 0"], ["bad polite"], ["good x"]]
    assert sorted(text for batch in batches for text in batch) == sorted(
        ["good first", "bad polite", "good x", "good y", *(f"good {i}" for i in range(5))])


@pytest.mark.parametrize("seed", range(5))
def test_the_shared_queue_keeps_its_bounds_and_pushes_out_only_what_is_beyond_a_share(seed):
    """Random arrivals and departures of four clients: the queue never holds more than its size, a
    request is refused only when the queue is full and no room may be taken back, and a pushed-out
    request is always the newest of a client that held more than its share."""
    import random

    from sentiment.batcher import FairQueue

    async def scenario():
        rng, loop = random.Random(seed), asyncio.get_running_loop()
        queue, share = FairQueue(maxsize=12, client_maxsize=6), 6
        waiting = {c: [] for c in "abcd"}  # each client's requests still waiting, oldest first: [futures]
        for _ in range(2000):
            if rng.random() < 0.55:
                client, size = rng.choice("abcd"), rng.randint(1, 3)
                held = dict(queue.held)
                refused = queue.refusal(client, size)
                if refused:
                    assert queue.qsize() + size > 12
                    assert held.get(client, 0) + size > share or held.get(client, 0) == queue.qsize() or (
                        queue.qsize() + size - sum(max(0, n - share) for n in held.values()) > 12)
                    continue
                futures = [loop.create_future() for _ in range(size)]
                queue.put_request(client, [(f"{client}{i}", f, 0.0) for i, f in enumerate(futures)])
                waiting[client].append(futures)
                for other, requests in waiting.items():
                    pushed = [r for r in requests if any(f.done() and isinstance(f.exception(), QueueFull)
                                                         for f in r)]
                    if pushed:  # the newest requests of a client over its share, never the one just queued
                        assert other != client and held[other] > share
                        assert requests[-len(pushed):] == pushed
                        del requests[-len(pushed):]
            elif not queue.empty():
                text, future, _ = queue.get_nowait()
                future.set_result(text)
                for requests in waiting.values():
                    requests[:] = [r for r in requests if not all(f.done() for f in r)]
            assert queue.qsize() <= 12 and queue.qsize() == sum(queue.held.values())
            assert queue.qsize() == sum(1 for r in waiting.values() for fs in r for f in fs if not f.done())

    asyncio.run(scenario())


def test_connections_are_what_the_open_file_limit_leaves_and_half_of_them_one_client_s():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        settings = ServeSettings()  # 64 descriptors are the service's own
        assert (settings.max_connections, settings.max_connections_per_client) == (192, 96)
        assert ServeSettings(max_connections=100, max_connections_per_client=100).max_connections_per_client == 100
        with pytest.raises(ValueError, match=r"SENTIMENT_MAX_CONNECTIONS must be at most 192, what the open-file "
                                             r"limit \(ulimit -n\) of 256 leaves"):
            ServeSettings(max_connections=1000)
        with pytest.raises(ValueError, match=r"SENTIMENT_MAX_CONNECTIONS_PER_CLIENT must be at least 1 and at most "
                                             r"SENTIMENT_MAX_CONNECTIONS \(192\), got 193"):
            ServeSettings(max_connections_per_client=193)
        resource.setrlimit(resource.RLIMIT_NOFILE, (60, hard))
        with pytest.raises(ValueError, match=r"open-file limit \(ulimit -n\) of 60 leaves no room for connections"):
            ServeSettings()
        wide = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (wide, hard))
        assert ServeSettings().max_connections == min(4096, wide - 64)  # 4096 at most: memory is then the bound
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_client_is_its_address_and_an_ipv6_client_its_network():
    def client(host):
        return client_of(SimpleNamespace(client=SimpleNamespace(host=host) if host else None))

    assert client("203.0.113.7") == "203.0.113.7" and client("::ffff:203.0.113.7") == "203.0.113.7"
    # One host commonly holds a whole /64: its addresses are one client, another /64 another.
    assert client("2001:db8::1") == client("2001:db8::ffff:abcd:1") == "2001:db8::/64"
    assert client("2001:db8:0:1::1") == "2001:db8:0:1::/64"
    assert client(None) == "" and client("testclient") == "testclient"


@pytest.fixture
def server(trained_model):
    port = free_port()
    env = {**os.environ, "SENTIMENT_MODEL": str(trained_model), "TOKENIZERS_PARALLELISM": "false",
           "SENTIMENT_MAX_BATCH_SIZE": "4", "SENTIMENT_QUEUE_SIZE": "2048"}
    process = subprocess.Popen([sys.executable, "-m", "uvicorn", "app:app", "--http", "app:HTTP", "--host", "127.0.0.1",
                                "--port", str(port)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    else:
        process.kill()
        raise AssertionError("uvicorn never became ready: " + process.communicate()[0])
    yield url, process
    if process.poll() is None:
        process.kill()
    process.wait()
    process.stdout.close()


@pytest.mark.slow
def test_predict_sentiment_sh_against_a_real_uvicorn(server):
    url, _ = server
    result = predict_sh(url, 'The acting was "superb".\nI loved it — vraiment génial ✓')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["label"] == "positive"
    piped = predict_sh(url, stdin="The plot was dreadful.\nAvoid it.\n")
    assert json.loads(piped.stdout)["label"] == "negative"
    too_long = predict_sh(url, "x" * 20001)
    assert too_long.returncode == 1 and "413" in too_long.stderr and len(too_long.stderr.splitlines()) == 1
    down = predict_sh(f"http://127.0.0.1:{free_port()}", "hello")
    assert down.returncode == 1 and down.stderr.startswith("error: no answer from")
    assert "is the service running? Start it: SENTIMENT_MODEL=folder uvicorn app:app" in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1
    doubled = predict_sh(url + "/predict", "hello")  # was "answered 404" alone: it posted to /predict/predict
    assert doubled.returncode == 1 and "404" in doubled.stderr and "leave out /predict" in doubled.stderr
    slashed = predict_sh(url + "/", "hello")  # was 404: it posted to //predict
    assert slashed.returncode == 0, slashed.stderr
    dashed = predict_sh(url, "--", "--help")  # after --, a review, not the help
    assert dashed.returncode == 0 and json.loads(dashed.stdout)["label"] in ("positive", "negative")


@pytest.mark.parametrize("body", [b"<html>\r\n<body>Welcome</body>\n</html>", b"[1, 2", b"", b'{"status": "ok"}'])
def test_predict_sentiment_sh_refuses_a_200_that_is_not_the_service_s_answer(body):
    # Another program at SENTIMENT_URL (a proxy's page, another service) answering 200 had its page
    # printed as the answer, with exit status 0.
    import http.server

    class Other(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Other)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        result = predict_sh(f"http://127.0.0.1:{other.server_address[1]}", "hello")
    finally:
        other.shutdown()
        other.server_close()
    assert result.returncode == 1 and result.stdout == "", result.stdout
    assert "answered 200, but not as the sentiment service does" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_sigterm_answers_every_request_in_flight(server):
    import httpx
    url, process = server
    texts = [f"The acting was superb. I loved it. {i} " + "It runs a little over two hours. " * 8 for i in range(64)]

    def ask():
        response = httpx.post(url + "/predict", json={"texts": texts}, timeout=60)
        return response, time.monotonic()

    def admitted():
        """Texts the service has taken in: waiting, being scored (a batch of at most 4) or scored."""
        figures = dict(line.rsplit(" ", 1) for line in httpx.get(url + "/metrics").text.splitlines()
                       if line.startswith(("sentiment_queue_depth ", "sentiment_texts_scored_total ")))
        return sum(float(value) for value in figures.values()) + 4

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(ask) for _ in range(16)]
        deadline = time.monotonic() + 30  # on a busy machine a client can take more than a moment to connect
        while admitted() < 16 * len(texts) and time.monotonic() < deadline:
            time.sleep(0.02)
        signalled = time.monotonic()  # every request is in; the batches take far longer to run
        process.send_signal(signal.SIGTERM)
        answers = [f.result() for f in futures]
    assert any(done > signalled for _, done in answers), "nothing was in flight at SIGTERM"
    for response, _ in answers:
        assert response.status_code == 200
        assert [p["label"] for p in response.json()["predictions"]] == ["positive"] * 64
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells why it stopped.
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    output = process.stdout.read()
    assert "Finished server process" in output and "Traceback" not in output


def test_every_model_call_runs_on_one_thread():
    class Recording(FakePredictor):
        def probabilities(self, texts):
            threads.add(threading.get_native_id())
            return super().probabilities(texts)

    threads, recording = set(), Recording()
    with client_for(recording) as client:
        wait_ready(client)
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: client.post("/predict", json={"text": "good"}), range(16)))
    assert all(r.status_code == 200 for r in responses)
    assert len(recording.batches) >= 3 and len(threads) == 1  # warm-up and every batch
    assert threading.get_native_id() not in threads


def test_the_model_thread_gets_the_gil_back_sooner_while_serving_and_the_interpreter_is_left_as_it_was():
    # At Python's 5 ms switch interval, each torch op of a batch waited up to 5 ms for the GIL while
    # the event loop was busy (bench/hammer.py); the setting is the process's, so it is put back.
    class Recording(FakePredictor):
        def probabilities(self, texts):
            intervals.add(sys.getswitchinterval())
            return super().probabilities(texts)

    intervals, before = set(), sys.getswitchinterval()
    with client_for(Recording()) as client:
        wait_ready(client)
        assert client.post("/predict", json={"text": "good"}).status_code == 200
    assert len(intervals) == 1 and intervals.pop() == pytest.approx(GIL_SWITCH_S) and GIL_SWITCH_S < before
    assert sys.getswitchinterval() == before


def test_a_misspelt_setting_is_named_with_the_one_meant(capsys):
    # SENTIMENT_MAX_BATCH_SZE=4 served with the default batch size, without a word.
    settings = ServeSettings.from_env({"SENTIMENT_MAX_BATCH_SZE": "4", "SENTIMENT_REQUEST_TIMEOUT": "5",
                                       "SENTIMENT_URL": "http://localhost:8000", "SENTIMENT_QUEUE_SIZE": "100"})
    assert settings.max_batch_size is None and settings.queue_size == 100
    assert capsys.readouterr().err == (
        "warning: SENTIMENT_MAX_BATCH_SZE is not a setting of the service, and is ignored; did you mean "
        "SENTIMENT_MAX_BATCH_SIZE?\n"
        "warning: SENTIMENT_REQUEST_TIMEOUT is not a setting of the service, and is ignored; did you mean "
        "SENTIMENT_REQUEST_TIMEOUT_S?\n")  # and nothing of predict_sentiment.sh's SENTIMENT_URL


def test_settings_come_from_the_environment_and_bad_ones_are_named():
    settings = ServeSettings.from_env({"SENTIMENT_QUEUE_SIZE": "100", "SENTIMENT_PRECISION": "fp32"})
    assert (settings.queue_size, settings.precision, settings.max_texts) == (100, "fp32", 64)
    # A client's share of the queue: half of it unless set, and room for one request of the most texts.
    assert settings.queue_size_per_client == 64 and ServeSettings().queue_size_per_client == 128
    assert ServeSettings.from_env({"SENTIMENT_QUEUE_SIZE_PER_CLIENT": "256"}).queue_size_per_client == 256
    # And of the bodies held while they arrive: half the budget unless set, and room for one of the largest.
    assert ServeSettings().max_body_bytes_per_client == 32 << 20
    assert ServeSettings(max_body_bytes=1000, max_body_bytes_total=1500).max_body_bytes_per_client == 1000
    for env, limit in (({"SENTIMENT_QUEUE_SIZE": "32"}, "SENTIMENT_QUEUE_SIZE must be at least SENTIMENT_MAX_TEXTS"),
                       ({"SENTIMENT_MAX_BODY_BYTES_PER_CLIENT": "1000"},
                        "SENTIMENT_MAX_BODY_BYTES_PER_CLIENT must be at least SENTIMENT_MAX_BODY_BYTES"),
                       ({"SENTIMENT_QUEUE_SIZE_PER_CLIENT": "32"}, "SENTIMENT_QUEUE_SIZE_PER_CLIENT must be at least"),
                       ({"SENTIMENT_QUEUE_SIZE_PER_CLIENT": "257"}, "at most SENTIMENT_QUEUE_SIZE \\(256\\)")):
        with pytest.raises(ValueError, match=limit):
            ServeSettings.from_env(env)
    with pytest.raises(ValueError, match="SENTIMENT_QUEUE_SIZE must be above 0"):
        ServeSettings.from_env({"SENTIMENT_QUEUE_SIZE": "0"})
    with pytest.raises(ValueError, match="SENTIMENT_MAX_WAIT_MS='soon' is not a number"):
        ServeSettings.from_env({"SENTIMENT_MAX_WAIT_MS": "soon"})
    with pytest.raises(ValueError, match="SENTIMENT_QUEUE_SIZE='1e3' is not a whole number"):
        ServeSettings.from_env({"SENTIMENT_QUEUE_SIZE": "1e3"})
    with pytest.raises(ValueError, match=r"SENTIMENT_MAX_WAIT_MS must be below SENTIMENT_REQUEST_TIMEOUT_S \(30 s\), "
                                         r"got 1e\+09 ms"):
        ServeSettings.from_env({"SENTIMENT_MAX_WAIT_MS": "1e9"})
    for name in ("MODEL", "DEVICE"):  # set from a shell variable that was not: a model folder named '', say
        with pytest.raises(ValueError, match=f"^SENTIMENT_{name} is empty \\(an unset shell variable\\?\\); give it "
                                             f"a value$"):
            ServeSettings.from_env({f"SENTIMENT_{name}": " "})
    # Unset means "the Predictor's own"; a set value must be a real one.
    assert ServeSettings.from_env({}).max_batch_size is None
    assert ServeSettings.from_env({"SENTIMENT_MAX_BATCH_SIZE": "4"}).max_batch_size == 4
    for name, raw in (("REQUEST_TIMEOUT_S", "nan"), ("MAX_WAIT_MS", "inf"), ("MAX_BATCH_SIZE", "0")):
        with pytest.raises(ValueError, match=f"SENTIMENT_{name} must"):
            ServeSettings.from_env({f"SENTIMENT_{name}": raw})
    # The bodies of all requests together must have room for one of the largest.
    with pytest.raises(ValueError, match="SENTIMENT_MAX_BODY_BYTES_TOTAL must be at least SENTIMENT_MAX_BODY_BYTES"):
        ServeSettings.from_env({"SENTIMENT_MAX_BODY_BYTES": "1000", "SENTIMENT_MAX_BODY_BYTES_TOTAL": "999"})
