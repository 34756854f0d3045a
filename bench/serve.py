"""Serving speed: the project's batching service against a per-request pipeline server, same load.

Starts the project's server and the per-request server (each at every precision asked for) on
loopback with the same model (max length 256) and drives each in turn with 1, 8, 32 and 128
concurrent clients sending real IMDb reviews, a bounded number of requests per level, in rounds
(the best round of each counts). Prints requests/s, p50 and p99 latency and errors, the offline
rate of the Predictor (infer.py's core) on the same rows timed in the same rounds, the ratios,
and an overload run: 128 clients (each of its own address, waiting out Retry-After) against a
queue of 32.

    python -m bench.serve --model outputs/bench-train/same
"""

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

from bench.common import DATA, cpu_description, imdb_rows
from sentiment.config import SETTINGS_FILE

ROOT = os.path.join(os.path.dirname(__file__), "..")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app, model, http="auto", open_files=None, log=subprocess.DEVNULL, workers=1, **env):
    """uvicorn serving `app` on a free loopback port, its warnings and errors to `log`; `open_files` sets its
    open-file limit (`ulimit -n`); `workers` processes (uvicorn --workers), each with its own model, all
    ready before it returns."""
    port = free_port()
    limit = open_files and (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files)))
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", app, "--http", http, "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", *(["--workers", str(workers)] if workers > 1 else [])],
        cwd=ROOT, env={**os.environ, "SENTIMENT_MODEL": model, **env}, preexec_fn=limit,
        stdout=log, stderr=subprocess.STDOUT if log is not subprocess.DEVNULL else log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    ready = 0  # in a row, each on a new connection: with several workers, any of them may take it
    while time.monotonic() < deadline and process.poll() is None:  # one that exited will not start
        try:
            ready = ready + 1 if httpx.get(url + "/ready").status_code == 200 else 0
        except httpx.TransportError:
            ready = 0
        if ready >= (1 if workers == 1 else 8 * workers):
            return process, url
        time.sleep(0.2 if not ready else 0.02)
    process.kill()
    raise SystemExit(f"{app} did not start")


class Connection:
    """A keep-alive HTTP/1.1 connection that POSTs JSON: a few lines of asyncio streams, so the load
    generator spends far less CPU per request than a full client library and leaves the cores
    to the servers it measures (it shares the machine with them)."""

    def __init__(self, url, local_address=None):
        self.host, self.port = url.removeprefix("http://").split(":")
        self.local_address = local_address  # another loopback address (127.0.0.2, …) is another client to the server
        self.streams = None
        self.headers = {}  # the last answer's, lower-cased

    async def connect(self):
        if self.streams is None:
            local = (self.local_address, 0) if self.local_address else None
            self.streams = await asyncio.open_connection(self.host, int(self.port), local_addr=local)

    async def post(self, path, body):
        await self.connect()
        reader, writer = self.streams
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower().split("\r\n")
        self.headers = headers = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
        await reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection") == "close":
            writer.close()
            self.streams = None
        return int(head[0].split()[1])

    def close(self):
        if self.streams:
            self.streams[1].close()


async def load(url, texts, clients, requests, polite=False):
    """`clients` concurrent loops sending `requests` in all: latencies of 200s and of 503s, status counts.
    `polite`: each client of an address of its own, waiting out Retry-After after a 503, as a
    well-behaved client does (the service holds the 503s of one that comes back sooner)."""
    latencies, rejected, statuses, next_index = [], [], {}, iter(range(requests))
    bodies = [json.dumps({"text": t}).encode() for t in texts]

    async def client(n):
        connection = Connection(url, f"127.0.{1 + n // 250}.{1 + n % 250}" if polite else None)
        await connection.connect()  # every client connected before the clock starts
        await go.wait()
        for i in next_index:
            start = time.perf_counter()
            try:
                status = await connection.post("/predict", bodies[i % len(bodies)])
            except (OSError, asyncio.IncompleteReadError, ValueError):
                status, connection = "connection", Connection(url, connection.local_address)
            elapsed = time.perf_counter() - start
            statuses[status] = statuses.get(status, 0) + 1
            if status in (200, 503):
                (latencies if status == 200 else rejected).append(elapsed)
            if status == 503 and polite:
                await asyncio.sleep(float(connection.headers["retry-after"]))
        connection.close()

    go = asyncio.Event()
    clients = [asyncio.create_task(client(n)) for n in range(clients)]
    await asyncio.sleep(0.5)
    go.set()
    start = time.perf_counter()
    await asyncio.gather(*clients)
    return np.array(latencies), np.array(rejected), statuses, time.perf_counter() - start


def report(name, clients, latencies, rejected, statuses, seconds):
    ok = len(latencies)
    errors = sum(n for s, n in statuses.items() if s != 200)
    p50, p99 = (np.percentile(latencies, 50) * 1000, np.percentile(latencies, 99) * 1000) if ok else (0, 0)
    print(f"{name:<16} {clients:>7} {ok / seconds:>10.1f} {p50:>9.0f} {p99:>9.0f} {errors:>7}", flush=True)
    return ok / seconds, p50


def offline_scorer(model, texts, precision):
    """A function that scores `texts` with the Predictor in this process and returns reviews/s."""
    from sentiment.data import clean_texts
    from sentiment.predictor import Predictor
    predictor, rows = Predictor(model, precision=precision), clean_texts(texts)
    predictor.probabilities(rows[:8])

    def rate():
        start = time.perf_counter()
        predictor.probabilities(rows)
        return len(rows) / (time.perf_counter() - start)
    return rate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/bench-train/same", help="A fine-tuned model folder.")
    parser.add_argument("--data", default=DATA, help="The IMDb CSV (Kaggle layout).")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128], help="Concurrency levels.")
    parser.add_argument("--requests", type=int, default=256, help="Requests per level (at least 2 per client).")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds per level, taking turns; the best counts.")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"),
                        help="Run both servers at each (bf16: autocast, which pays on CPUs with AVX512-BF16 or "
                             "AMX); ratios are to the per-request server in fp32 and in the same precision.")
    args = parser.parse_args()
    texts = imdb_rows(args.data, last=1000)["review"].to_list()

    # All servers stay up and take turns at each level, and the offline Predictor is timed at
    # each level too, so a drift in this machine's speed during the run falls on all alike.
    offline = {p: offline_scorer(args.model, texts[:args.requests], p) for p in args.precisions}
    servers = {f"batching {p}": start_server("app:app", args.model, "app:HTTP", SENTIMENT_QUEUE_SIZE="1024",
                                             SENTIMENT_PRECISION=p) for p in args.precisions}
    # The peer truncates where ours does: at the max length the model folder records.
    with open(os.path.join(args.model, SETTINGS_FILE)) as f:
        max_length = str(json.load(f)["max_length"])
    servers.update({f"per-request {p}": start_server("bench.pipeline_server:app", args.model, SENTIMENT_PRECISION=p,
                                                     SENTIMENT_MAX_LENGTH=max_length)
                    for p in dict.fromkeys(["fp32", *args.precisions])})
    results = {}
    try:
        for _, url in servers.values():
            asyncio.run(load(url, texts, 4, 16))  # warm-up
        print(f"machine: {cpu_description()}")
        print(f"{'server':<16} {'clients':>7} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7}")
        for clients in args.clients:
            requests = max(args.requests, 2 * clients)
            runs = {}
            for _ in range(args.rounds):
                for name, (_, url) in servers.items():
                    runs.setdefault(name, []).append(asyncio.run(load(url, texts, clients, requests)))
                for precision, rate in offline.items():
                    runs.setdefault(f"offline {precision}", []).append(rate())
            for name in servers:  # each server's best round: noise only ever slows a run
                best = max(runs[name], key=lambda run: len(run[0]) / run[3])
                results[name, clients] = report(name, clients, *best)
            for precision in offline:
                results[f"offline {precision}", clients] = max(runs[f"offline {precision}"]), 0.0
                print(f"{'offline ' + precision:<16} {'':>7} {results[f'offline {precision}', clients][0]:>10.1f}",
                      flush=True)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait()

    print(f"offline: the Predictor (infer.py's core) on the same {args.requests} reviews in this process, "
          f"reviews/s")
    for precision in args.precisions:
        for clients in args.clients:
            ours, same, peer, alone = (results[f"{kind} {p}", clients] for kind, p in (
                ("batching", precision), ("per-request", precision), ("per-request", "fp32"), ("offline", precision)))
            print(f"{clients:>4} clients: batching {precision} {ours[0] / peer[0]:.2f}x per-request fp32 req/s "
                  f"({ours[0] / same[0]:.2f}x per-request {precision}), {ours[0] / alone[0]:.2f}x offline rate, "
                  f"p50 {ours[1] - peer[1]:+.0f} ms vs per-request fp32")

    # Clients of their own addresses that wait out Retry-After, so every 503 is answered at once.
    process, url = start_server("app:app", args.model, "app:HTTP", SENTIMENT_QUEUE_SIZE="32", SENTIMENT_MAX_TEXTS="32")
    try:
        latencies, rejected, statuses, seconds = asyncio.run(load(url, texts, 128, 512, polite=True))
    finally:
        process.terminate()
        process.wait()
    print(f"overload, 128 clients, queue 32: {len(latencies)} answered 200 (p50 {np.median(latencies) * 1000:.0f} ms), "
          f"{len(rejected)} answered 503 (p50 {np.median(rejected) * 1000 if len(rejected) else 0:.0f} ms, "
          f"max {rejected.max(initial=0) * 1000:.0f} ms), other errors "
          f"{sum(n for s, n in statuses.items() if s not in (200, 503))}")


if __name__ == "__main__":
    main()
