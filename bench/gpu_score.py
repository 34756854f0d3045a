"""GPU scoring and serving: the Predictor against `pipeline(batch_size=64)`, and the service at 64
clients against a per-request pipeline server, on one model folder and generated reviews.

The model folder is bench/gpu_train.py's (`--keep-model`): a DistilBERT of the seed's shape with
IMDb-like review lengths, so the work is the real one. Scoring: 10,000 reviews, bf16 on a GPU
for both sides. Serving: our service and bench/pipeline_server.py under 64 concurrent clients,
with the offline Predictor's rate on the same rows for the ratio. Part of bench/gpu_check.sh.

    python -m bench.gpu_score --model DIR [--rows 10000] [--json FILE]
"""

import argparse
import asyncio
import contextlib
import json
import time

import numpy as np
import torch

from bench.gpu_train import generated_reviews
from bench.serve import load, start_server

CLIENTS = 64


def score_pipeline(model, texts, bf16):
    from transformers import pipeline
    device = 0 if torch.cuda.is_available() else -1
    classify = pipeline("text-classification", model=model, device=device,
                        **({"dtype": torch.bfloat16} if bf16 and device == 0 else {}))
    classify(texts[:64], batch_size=64, truncation=True)  # warm-up
    start = time.perf_counter()
    answers = classify(texts, batch_size=64, truncation=True)
    return [a["label"] for a in answers], len(texts) / (time.perf_counter() - start)


def score_predictor(model, texts, precision):
    from sentiment.predictor import Predictor
    predictor = Predictor(model, precision=precision)
    predictor.probabilities(texts[:64])  # warm-up
    start = time.perf_counter()
    probs = predictor.probabilities(texts)
    rate = len(texts) / (time.perf_counter() - start)
    return [predictor.labels[i] for i in probs.argmax(1)], rate


def serve(model, texts, requests, precision):
    """req/s and p50 ms at CLIENTS clients, for our service and the per-request server."""
    servers = {"ours": start_server("app:app", model, "app:HTTP", SENTIMENT_PRECISION=precision,
                                    SENTIMENT_QUEUE_SIZE="4096"),
               "per-request": start_server("bench.pipeline_server:app", model, SENTIMENT_PRECISION=precision,
                                           SENTIMENT_MAX_LENGTH="512")}
    results = {}
    try:
        for name, (_, url) in servers.items():
            asyncio.run(load(url, texts, 8, 32))  # warm-up
            latencies, _, statuses, seconds = asyncio.run(load(url, texts, CLIENTS, requests))
            results[name] = {"req_s": len(latencies) / seconds, "p50_ms": float(np.median(latencies) * 1000),
                             "errors": sum(n for s, n in statuses.items() if s != 200)}
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A sequence-classification folder (bench/gpu_train.py's).")
    parser.add_argument("--rows", type=int, default=10000, help="Generated reviews to score.")
    parser.add_argument("--requests", type=int, default=2048, help="Requests sent to each server.")
    parser.add_argument("--json", default=None, help="Write every figure to this JSON file.")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    precision = "bf16" if gpu else "fp32"
    texts = generated_reviews(args.rows, seed=1)["review"].to_list()

    pipe_labels, pipe_rate = score_pipeline(args.model, texts, gpu)
    ours_labels, ours_rate = score_predictor(args.model, texts, precision)
    agree = float(np.mean([a == b for a, b in zip(pipe_labels, ours_labels)]))
    print(f"scoring {args.rows} reviews, {precision}: Predictor {ours_rate:.0f} reviews/s, pipeline(batch_size=64) "
          f"{pipe_rate:.0f} reviews/s: {ours_rate / pipe_rate:.2f}x; same label on {agree:.1%}", flush=True)
    serving = serve(args.model, texts, max(args.requests, 2 * CLIENTS), precision)
    for name, r in serving.items():
        print(f"serving, {CLIENTS} clients, {name}: {r['req_s']:.0f} req/s, p50 {r['p50_ms']:.0f} ms, "
              f"{r['errors']} errors", flush=True)
    ours = serving["ours"]["req_s"]
    print(f"service / offline Predictor: {ours / ours_rate:.2f}x; service / per-request server: "
          f"{ours / serving['per-request']['req_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"precision": precision, "rows": args.rows, "clients": CLIENTS,
                       "scoring": {"predictor_reviews_s": ours_rate, "pipeline_reviews_s": pipe_rate,
                                   "same_label": agree},
                       "serving": serving}, f, indent=2)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
