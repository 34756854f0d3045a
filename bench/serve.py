"""Serving speed: the project's batching service against a per-request pipeline server, same load.

Starts both servers on loopback with the same model (max length 256), drives each with 1, 8, 32
and 128 concurrent clients sending real IMDb reviews (a bounded number of requests per level),
and prints requests/s, p50 and p99 latency and errors; then the offline rate of the Predictor
(the core of infer.py) on the same rows, and an overload run: 128 clients against a queue of 32.

    python bench/serve.py --model outputs/bench-train/same
"""

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.common import DATA, imdb_rows  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app, model, **env):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, env={**os.environ, "SENTIMENT_MODEL": model, **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"{app} did not start")


async def load(url, texts, clients, requests):
    """`clients` concurrent loops sending `requests` in all: latencies of 200s and of 503s, status counts."""
    latencies, rejected, statuses, next_index = [], [], {}, iter(range(requests))

    async def client(http):
        for i in next_index:
            start = time.perf_counter()
            try:
                response = await http.post(url + "/predict", json={"text": texts[i % len(texts)]})
                status = response.status_code
            except httpx.HTTPError:
                status = "connection"
            elapsed = time.perf_counter() - start
            statuses[status] = statuses.get(status, 0) + 1
            if status in (200, 503):
                (latencies if status == 200 else rejected).append(elapsed)

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - start
    return np.array(latencies), np.array(rejected), statuses, seconds


def report(name, clients, latencies, rejected, statuses, seconds):
    ok = len(latencies)
    errors = sum(n for s, n in statuses.items() if s != 200)
    p50, p99 = (np.percentile(latencies, 50) * 1000, np.percentile(latencies, 99) * 1000) if ok else (0, 0)
    print(f"{name:<12} {clients:>7} {ok / seconds:>10.1f} {p50:>9.0f} {p99:>9.0f} {errors:>7}", flush=True)
    return ok / seconds, p50


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/bench-train/same", help="A fine-tuned model folder.")
    parser.add_argument("--data", default=DATA, help="The IMDb CSV (Kaggle layout).")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128], help="Concurrency levels.")
    parser.add_argument("--requests", type=int, default=256, help="Requests per level (at least 2 per client).")
    args = parser.parse_args()
    texts = imdb_rows(args.data, last=1000)["review"].to_list()

    results = {}
    print(f"{'server':<12} {'clients':>7} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7}")
    for name, app in (("batching", "app:app"), ("per-request", "bench.pipeline_server:app")):
        process, url = start_server(app, args.model, SENTIMENT_QUEUE_SIZE="1024")
        try:
            asyncio.run(load(url, texts, 4, 16))  # warm-up
            for clients in args.clients:
                requests = max(args.requests, 2 * clients)
                results[name, clients] = report(name, clients, *asyncio.run(load(url, texts, clients, requests)))
        finally:
            process.terminate()
            process.wait()

    from sentiment.data import clean_texts
    from sentiment.predictor import Predictor
    predictor = Predictor(args.model)
    rows = clean_texts(texts[:args.requests])
    predictor.probabilities(rows[:8])
    start = time.perf_counter()
    predictor.probabilities(rows)
    offline = len(rows) / (time.perf_counter() - start)
    print(f"offline Predictor (infer.py's core) on the same {len(rows)} reviews: {offline:.1f} reviews/s")
    for clients in args.clients:
        if ("batching", clients) in results and ("per-request", clients) in results:
            ours, theirs = results["batching", clients], results["per-request", clients]
            print(f"{clients:>4} clients: batching {ours[0] / theirs[0]:.2f}x per-request req/s, "
                  f"{ours[0] / offline:.2f}x offline rate, p50 {ours[1] - theirs[1]:+.0f} ms vs per-request")

    process, url = start_server("app:app", args.model, SENTIMENT_QUEUE_SIZE="32")
    try:
        latencies, rejected, statuses, seconds = asyncio.run(load(url, texts, 128, 512))
    finally:
        process.terminate()
        process.wait()
    print(f"overload, 128 clients, queue 32: {len(latencies)} answered 200 (p50 {np.median(latencies) * 1000:.0f} ms), "
          f"{len(rejected)} answered 503 (p50 {np.median(rejected) * 1000 if len(rejected) else 0:.0f} ms, "
          f"max {rejected.max(initial=0) * 1000:.0f} ms), other errors "
          f"{sum(n for s, n in statuses.items() if s not in (200, 503))}")


if __name__ == "__main__":
    main()
