"""One-review answers beside a client that retries at once: the service against itself without its defences.

A client that ignores `Retry-After` (a retry loop without back-off) would send hundreds of requests
a second, each refused with 503 before its body is read, yet each still parsed, answered and
counted by the event loop, which so holds the GIL most of the time. The service holds such a
client's request until its Retry-After is over, and hands the GIL to the model thread (which gives
it up in every torch op) every 0.2 ms rather than Python's 5 ms. Its peers here are the same
service answering at once (no hold), and answering at once at 5 ms (bench/hammer_peer.py).

For each server in turn: a client sending one review a request, one at a time, alone, then beside
a client of `--connections` connections sending `--texts` texts a request and retrying at once
(run in a process of its own, so its work does not delay the other client's). Both with one-line
texts and with IMDb reviews. Prints the one-review client's p50 and p99 latency, the hammering
client's answers and refusals a second, and the server's CPU use.

    python -m bench.hammer --model outputs/bench-train/same
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import time

import numpy as np

from bench.common import DATA, cpu_description, imdb_rows
from bench.serve import Connection, start_server

SERVERS = {"ours": "", "no hold": "hold", "no hold, 5 ms": "hold,switch"}  # name: HAMMER_PEER


def hammer(url, bodies, connections, seconds, counts):
    """`connections` loops that post `bodies` and go again at once, whatever the answer."""
    async def loop():
        connection, i = Connection(url, "127.0.5.1"), 0
        while time.perf_counter() < end:
            try:
                status = await connection.post("/predict", bodies[i % len(bodies)])
            except (OSError, asyncio.IncompleteReadError):
                status, connection = "connection", Connection(url, "127.0.5.1")
            counts[status] = counts.get(status, 0) + 1
            i += 1

    async def main():
        await asyncio.gather(*[loop() for _ in range(connections)])

    end = time.perf_counter() + seconds
    asyncio.run(main())


async def one_at_a_time(url, bodies, seconds):
    """Latencies of one client's one-review requests, sent one after another, 20 ms apart."""
    connection, latencies, i = Connection(url, "127.0.5.2"), [], 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        status = await connection.post("/predict", bodies[i % len(bodies)])
        if status != 200:
            raise SystemExit(f"the one-review client got {status}")
        latencies.append(time.perf_counter() - start)
        i += 1
        await asyncio.sleep(0.02)
    connection.close()
    return np.array(latencies)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        user, system = f.read().rsplit(")", 1)[1].split()[11:13]
    return (int(user) + int(system)) / os.sysconf("SC_CLK_TCK")


def measure(process, url, ones, many, args):
    """(p50 ms, p99 ms) alone; (p50, p99, answered/s, refused/s, server CPU cores) beside the hammer."""
    alone = asyncio.run(one_at_a_time(url, ones, args.seconds))
    hammered = args.seconds + 2  # from before the measurement beside it to after its last request
    with multiprocessing.Manager() as manager:
        counts = manager.dict()
        other = multiprocessing.Process(target=hammer, args=(url, many, args.connections, hammered, counts))
        other.start()
        time.sleep(1)  # the queue fills
        cpu, start = cpu_seconds(process.pid), time.perf_counter()
        beside = asyncio.run(one_at_a_time(url, ones, args.seconds))
        cores = (cpu_seconds(process.pid) - cpu) / (time.perf_counter() - start)
        other.join()
        counts = dict(counts)
    return ([np.percentile(alone, 50) * 1000, np.percentile(alone, 99) * 1000],
            [np.percentile(beside, 50) * 1000, np.percentile(beside, 99) * 1000, counts.get(200, 0) / hammered,
             counts.get(503, 0) / hammered, cores])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/bench-train/same", help="A fine-tuned model folder.")
    parser.add_argument("--data", default=DATA, help="The IMDb CSV (Kaggle layout).")
    parser.add_argument("--seconds", type=float, default=12, help="Seconds of each measurement.")
    parser.add_argument("--connections", type=int, default=16, help="Connections of the client that retries at once.")
    parser.add_argument("--texts", type=int, default=64, help="Texts in each of its requests.")
    parser.add_argument("--rounds", type=int, default=2, help="Rounds, the servers taking turns; the median counts.")
    args = parser.parse_args()
    reviews = imdb_rows(args.data, last=1000)["review"].to_list()
    short = [" ".join(r.replace("<br />", " ").split()[:12]) for r in reviews]  # the first dozen words
    kinds = {"one-line texts": short, "IMDb reviews": reviews}

    servers = {name: start_server("bench.hammer_peer:app", args.model, "bench.hammer_peer:HTTP", HAMMER_PEER=peer)
               for name, peer in SERVERS.items()}
    results = {}
    try:
        for kind, texts in kinds.items():
            ones = [json.dumps({"text": t}).encode() for t in texts]
            many = [json.dumps({"texts": texts[i:i + args.texts]}).encode()
                    for i in range(0, len(texts) - args.texts, args.texts)]
            for _ in range(args.rounds):
                for name, (process, url) in servers.items():
                    results.setdefault((kind, name), []).append(measure(process, url, ones, many, args))
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait()

    print(f"machine: {cpu_description()}; {args.rounds} rounds of {args.seconds:.0f} s, the median shown; the "
          f"other client: {args.connections} connections of {args.texts} texts a request, retrying at once")
    print(f"{'texts':<15} {'server':<15} {'alone p50':>9} {'p99':>6} {'beside p50':>10} {'p99':>6} "
          f"{'its 200/s':>9} {'its 503/s':>9} {'server CPU':>10}")
    medians = {}
    for (kind, name), runs in results.items():
        alone = np.median([run[0] for run in runs], axis=0)
        beside = np.median([run[1] for run in runs], axis=0)
        medians[kind, name] = beside
        print(f"{kind:<15} {name:<15} {alone[0]:>9.0f} {alone[1]:>6.0f} {beside[0]:>10.0f} {beside[1]:>6.0f} "
              f"{beside[2]:>9.1f} {beside[3]:>9.0f} {beside[4]:>10.2f}")
    ours, *peers = SERVERS
    for kind in kinds:
        for peer in peers:
            theirs, mine = medians[kind, peer], medians[kind, ours]
            print(f"{kind}: one-review p50 {theirs[0] / mine[0]:.2f}x lower, p99 {theirs[1] / mine[1]:.2f}x lower "
                  f"than {peer}, beside the client that retries at once; {theirs[3] / max(mine[3], 1e-9):.0f}x "
                  f"fewer refusals a second")


if __name__ == "__main__":
    main()
