"""Fairness: one-review requests beside large requests or a flood of them, ours against the per-request server.

Both servers load the same model and run on loopback in turn. Eight clients send one review per
request, one request after another, first alone, then while two more clients send 64 reviews per
request back to back (mixed), then while one more client sends one review per request on 64
connections at once (flood), for the same number of seconds each. Every client has a loopback
address of its own (127.0.0.10, …), as different hosts would; the flood's connections share one.
Prints the one-review clients' p50 and p99 latency under each load, and the reviews/s each kind of
client got. Our batcher takes a text from each waiting client in turn, and within a client from
each of its requests, so a one-review request waits for about one batch, not for every text
queued before it by a client of large requests or of many connections.

    python -m bench.fairness --model outputs/full-scale
"""

import argparse
import asyncio
import json
import os
import time

import numpy as np

from bench.common import DATA, cpu_description, imdb_rows
from bench.serve import Connection, start_server
from sentiment.config import SETTINGS_FILE


async def mixed(url, texts, singles, bulks, flood, seconds, bulk_size=64):
    """Latencies of the one-review clients, and reviews scored per kind of client, over `seconds`.
    Every one-review and bulk client has a loopback address of its own; the `flood` connections share one."""
    one = [json.dumps({"text": t}).encode() for t in texts]
    many = [json.dumps({"texts": texts[i:i + bulk_size]}).encode() for i in range(0, len(texts) - bulk_size, bulk_size)]
    latencies, scored, errors = [], {"one": 0, "bulk": 0, "flood": 0}, []

    async def client(kind, bodies, size, address):
        connection = Connection(url, address)
        await connection.connect()
        await go.wait()
        i = 0
        while time.perf_counter() < end:
            start = time.perf_counter()
            status = await connection.post("/predict", bodies[i % len(bodies)])
            i += 1
            if status != 200:
                errors.append(status)
                continue
            if kind == "one":
                latencies.append(time.perf_counter() - start)
            scored[kind] += size
        connection.close()

    go = asyncio.Event()
    clients = ([("one", one, 1, f"127.0.0.{10 + i}") for i in range(singles)]
               + [("bulk", many, bulk_size, f"127.0.1.{1 + i}") for i in range(bulks)]
               + [("flood", one, 1, "127.0.2.1")] * flood)
    tasks = [asyncio.create_task(client(*c)) for c in clients]
    await asyncio.sleep(0.5)
    end = time.perf_counter() + seconds
    go.set()
    await asyncio.gather(*tasks)
    return np.array(latencies), {k: v / seconds for k, v in scored.items()}, errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/full-scale", help="A fine-tuned model folder.")
    parser.add_argument("--data", default=DATA, help="The IMDb CSV (Kaggle layout).")
    parser.add_argument("--seconds", type=float, default=30, help="Length of each run.")
    parser.add_argument("--singles", type=int, default=8, help="Clients sending one review a request.")
    parser.add_argument("--bulks", type=int, default=2, help="Clients sending 64 reviews a request.")
    parser.add_argument("--flood", type=int, default=64,
                        help="Connections of one client sending one review a request back to back.")
    args = parser.parse_args()
    texts = imdb_rows(args.data, last=1000)["review"].to_list()
    with open(os.path.join(args.model, SETTINGS_FILE)) as f:
        max_length = str(json.load(f)["max_length"])
    servers = {"ours": ("app:app", "app:HTTP", {"SENTIMENT_QUEUE_SIZE": "1024"}),
               "per-request": ("bench.pipeline_server:app", "auto", {"SENTIMENT_MAX_LENGTH": max_length})}
    loads = {"alone": (0, 0), "mixed": (args.bulks, 0), "flood": (0, args.flood)}
    print(f"machine: {cpu_description()}; model {args.model} (max length {max_length}); {args.singles} one-review "
          f"clients, alone, beside {args.bulks} clients of 64 reviews a request (mixed), and beside one client "
          f"with {args.flood} connections (flood); {args.seconds:.0f} s each")
    print(f"{'server':<12} {'load':<7} {'p50 ms':>8} {'p99 ms':>8} {'one-review/s':>13} {'bulk reviews/s':>15} "
          f"{'flood reviews/s':>16} {'errors':>7}")
    results = {}
    for name, (app, http, env) in servers.items():
        process, url = start_server(app, args.model, http, **env)
        try:
            asyncio.run(mixed(url, texts, 4, 1, 0, 3))  # warm-up
            for load, (bulks, flood) in loads.items():
                latencies, rates, errors = asyncio.run(mixed(url, texts, args.singles, bulks, flood, args.seconds))
                p50, p99 = np.percentile(latencies, [50, 99]) * 1000
                results[name, load] = p50, p99
                print(f"{name:<12} {load:<7} {p50:>8.0f} {p99:>8.0f} {rates['one']:>13.1f} {rates['bulk']:>15.1f} "
                      f"{rates['flood']:>16.1f} {len(errors):>7}", flush=True)
        finally:
            process.terminate()
            process.wait()
    for load in ("mixed", "flood"):
        for quantile, index in (("p50", 0), ("p99", 1)):
            ours, peer = results["ours", load][index], results["per-request", load][index]
            print(f"one-review {quantile} under the {load} load: ours {ours:.0f} ms, per-request {peer:.0f} ms: "
                  f"{peer / ours:.1f}x lower")


if __name__ == "__main__":
    main()
