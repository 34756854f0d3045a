"""What one service process can answer whatever its model's speed: requests/s at 64 clients of a model of
next to no work (a 2-layer, 64-wide DistilBERT on 12-word reviews), against a bare Starlette app on the same
HTTP/1.1 parser that reads the body and answers at once, and the offline Predictor on the same reviews.

On a GPU the Predictor scores thousands of reviews a second; a service that answers one review a request
in one process is bound well before that by the process's one GIL, which its event loop and its model
thread share. This measures that bound here, in one run, the servers taking turns (best of `--rounds`);
the CPU is named with its flags.

    python -m bench.http_ceiling [--rounds 3] [--requests 2048]
"""

import argparse
import asyncio
import tempfile

from bench.common import cpu_description
from bench.gpu_score import CLIENTS, score_predictor
from bench.gpu_train import build_model_folder, generated_reviews
from bench.serve import load, start_server


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="Rounds; each server's best counts.")
    parser.add_argument("--requests", type=int, default=2048, help="Requests per server and round.")
    args = parser.parse_args()
    reviews = generated_reviews(4096, seed=1)["review"].to_list()
    texts = [" ".join(review.split()[:12]) for review in reviews]
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as shared:
        build_model_folder(folder, reviews, small=True)
        measure(args, folder, texts, shared)


def measure(args, folder, texts, shared):
    servers = {"bare Starlette app": start_server("bench.bare_app:app", folder, "h11"),
               "ours": start_server("app:app", folder, "app:HTTP", SENTIMENT_PRECISION="fp32",
                                    SENTIMENT_QUEUE_SIZE="4096"),
               "ours, GIL handed over every 5 ms": start_server(
                   "bench.hammer_peer:app", folder, "bench.hammer_peer:HTTP", HAMMER_PEER="switch",
                   SENTIMENT_PRECISION="fp32", SENTIMENT_QUEUE_SIZE="4096"),
               "ours, 2 workers": start_server("app:app", folder, "app:HTTP", workers=2, SENTIMENT_PRECISION="fp32",
                                               SENTIMENT_QUEUE_SIZE="4096", PROMETHEUS_MULTIPROC_DIR=shared,
                                               SENTIMENT_THREADS="1")}
    best, offline = {name: 0.0 for name in servers}, 0.0
    try:
        for name, (_, url) in servers.items():
            asyncio.run(load(url, texts, 8, 64))  # warm-up
        for _ in range(args.rounds):
            offline = max(offline, *score_predictor(folder, texts[:args.requests], "fp32")[1:])
            for name, (_, url) in servers.items():
                latencies, _, statuses, seconds = asyncio.run(load(url, texts, CLIENTS, args.requests))
                assert set(statuses) == {200}, f"{name}: {statuses}"
                best[name] = max(best[name], len(latencies) / seconds)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait()
    print(f"CPU: {cpu_description()}")
    print(f"| server ({CLIENTS} clients, 12-word reviews, a model of next to no work) | req/s | vs bare app |")
    print("|---|---:|---:|")
    for name, value in best.items():
        print(f"| {name} | {value:.0f} | {value / best['bare Starlette app']:.2f}x |")
    print(f"offline Predictor on the same reviews: {offline:.0f} reviews/s; ours / offline: "
          f"{best['ours'] / offline:.2f}x")


if __name__ == "__main__":
    main()
