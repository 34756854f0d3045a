"""The queue shared between clients: a lone client's rate, and other clients beside a flood, now against a hard share.

A client that honours `Retry-After` gets 503 when the queue holds what it may hold. With a hard
share per client (the service before: half the queue, whatever the other clients did), a lone
client, or every client behind a proxy that does not name them, had half the queue: the model
could run dry while its refused requests waited out their second. Now a client may fill the room
no one else needs, and another client finding the queue full pushes out the newest requests of
the one holding the most. Both run in one run, on one server build: the hard share is the same
admission as a queue the size of the share, for the lone client, so it runs as that.

Two loads, `--seconds` each: one client (one address) with `--connections` connections sending
`--texts` reviews a request, alone; then the same beside eight clients sending one review a
request, each from an address of its own. Prints reviews/s, 503s and latency for each.

    python -m bench.queue_share --model outputs/bench-train/same
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


async def run_load(url, texts, connections, size, singles, seconds):
    """Reviews/s, 503s and p50 latency of the heavy client and of the one-review clients over `seconds`."""
    many = [json.dumps({"texts": texts[i:i + size]}).encode() for i in range(0, len(texts) - size, size)]
    one = [json.dumps({"text": t}).encode() for t in texts]
    figures = {kind: {"scored": 0, "refused": 0, "latencies": []} for kind in ("heavy", "one")}

    async def client(kind, bodies, n, address):
        connection = Connection(url, address)
        await connection.connect()
        await go.wait()
        i, mine = 0, figures[kind]
        while time.perf_counter() < end:
            start = time.perf_counter()
            status = await connection.post("/predict", bodies[i % len(bodies)])
            i += 1
            if status == 503:  # as a well-behaved client does
                mine["refused"] += 1
                await asyncio.sleep(float(connection.headers.get("retry-after", 1)))
            elif status == 200:
                mine["scored"] += n
                mine["latencies"].append(time.perf_counter() - start)
        connection.close()

    go = asyncio.Event()
    clients = ([("heavy", many, size, "127.0.3.1")] * connections
               + [("one", one, 1, f"127.0.3.{10 + i}") for i in range(singles)])
    tasks = [asyncio.create_task(client(*c)) for c in clients]
    await asyncio.sleep(0.5)
    end = time.perf_counter() + seconds
    go.set()
    await asyncio.gather(*tasks)
    return {kind: (f["scored"] / seconds, f["refused"], np.median(f["latencies"]) * 1000 if f["latencies"] else 0.0)
            for kind, f in figures.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/full-scale", help="A fine-tuned model folder.")
    parser.add_argument("--data", default=DATA, help="The IMDb CSV (Kaggle layout).")
    parser.add_argument("--seconds", type=float, default=30, help="Length of each run.")
    parser.add_argument("--queue", type=int, default=64, help="SENTIMENT_QUEUE_SIZE; the share is half of it.")
    parser.add_argument("--connections", type=int, default=32, help="The heavy client's connections.")
    parser.add_argument("--texts", type=int, default=4, help="Reviews in each of its requests.")
    args = parser.parse_args()
    texts = imdb_rows(args.data, last=1000)["review"].to_list()
    with open(os.path.join(args.model, SETTINGS_FILE)) as f:
        max_length = json.load(f)["max_length"]
    share = args.queue // 2
    limits = {"SENTIMENT_MAX_TEXTS": str(args.texts)}
    servers = {"shared queue (now)": {"SENTIMENT_QUEUE_SIZE": str(args.queue), **limits},
               "hard share (before)": {"SENTIMENT_QUEUE_SIZE": str(share), **limits}}
    print(f"machine: {cpu_description()}; model {args.model} (max length {max_length}); queue {args.queue}, share "
          f"{share}; one client of {args.connections} connections sending {args.texts} reviews a request, alone "
          f"and beside 8 one-review clients; clients wait out Retry-After; {args.seconds:.0f} s each")
    print(f"{'server':<20} {'load':<7} {'heavy reviews/s':>16} {'heavy 503s':>11} {'heavy p50 ms':>13} "
          f"{'one-review/s':>13} {'one 503s':>9} {'one p50 ms':>11}")
    results = {}
    for name, env in servers.items():
        process, url = start_server("app:app", args.model, "app:HTTP", **env)
        try:
            asyncio.run(run_load(url, texts, 4, 1, 1, 3))  # warm-up
            for load, singles in (("alone", 0), ("beside", 8)):
                if load == "beside" and name != "shared queue (now)":
                    continue  # a queue the size of the share is the hard share only for a lone client
                figures = asyncio.run(run_load(url, texts, args.connections, args.texts, singles, args.seconds))
                results[name, load] = figures
                (heavy, heavy_refused, heavy_p50), (one, one_refused, one_p50) = figures["heavy"], figures["one"]
                print(f"{name:<20} {load:<7} {heavy:>16.1f} {heavy_refused:>11} {heavy_p50:>13.0f} {one:>13.1f} "
                      f"{one_refused:>9} {one_p50:>11.0f}", flush=True)
        finally:
            process.terminate()
            process.wait()
    now, before = results["shared queue (now)", "alone"]["heavy"], results["hard share (before)", "alone"]["heavy"]
    print(f"lone client: {now[0] / before[0]:.2f}x the reviews/s, {now[1]} 503s against {before[1]}")


if __name__ == "__main__":
    main()
