"""GPU scoring and serving: the Predictor against `pipeline(batch_size=64)`, and the service at 64
clients against a per-request pipeline server (and ours in 4 worker processes), on one model folder
and generated reviews.

The model folder is bench/gpu_train.py's (`--keep-model`): a DistilBERT of the seed's shape with
IMDb-like review lengths, so the work is the real one. Scoring: 10,000 reviews, bf16 on a GPU
for both sides. Serving: our service and bench/pipeline_server.py under 64 concurrent clients,
with the offline Predictor's rate on the same rows for the ratio. Part of bench/gpu_check.sh.

    python -m bench.gpu_score --model DIR [--rows 10000] [--json FILE]
"""

import argparse
import asyncio
import contextlib
import tempfile
import time

import numpy as np
import torch

from bench.gpu_train import generated_reviews, save
from bench.serve import load, start_server

CLIENTS = 64
# One event loop answers some hundreds of requests a second whatever the model's speed (bench/http_ceiling.py:
# 608 req/s on a 2-core AMD EPYC with a model of next to no work, where a bare Starlette app answers 2,145): far
# below what a GPU scores. Several processes, each its own loop and model, show what a service could do beyond.
WORKERS = 4  # --workers; the CPU smoke takes 2: four processes starting torch on 2 cores took 26 s


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
    rates = []
    for _ in range(2):  # the rate of a first pass (the figure compared), and of the same texts again
        start = time.perf_counter()
        probs = predictor.probabilities(texts)
        rates.append(len(texts) / (time.perf_counter() - start))
    return [predictor.labels[i] for i in probs.argmax(1)], *rates


def serve(name, model, texts, requests, precision, workers=WORKERS):
    """req/s and p50 ms at CLIENTS clients of one server, started for this alone: ours, ours in `workers` processes
    (uvicorn --workers, a model each), or the per-request one."""
    with tempfile.TemporaryDirectory() as shared:  # the workers' metrics counted together, as the README asks
        if name.startswith("ours"):
            several = {"workers": workers, "PROMETHEUS_MULTIPROC_DIR": shared} if "workers" in name else {}
            process, url = start_server("app:app", model, "app:HTTP", SENTIMENT_PRECISION=precision,
                                        SENTIMENT_QUEUE_SIZE="4096", **several)
        else:
            process, url = start_server("bench.pipeline_server:app", model, SENTIMENT_PRECISION=precision,
                                        SENTIMENT_MAX_LENGTH="512")
        try:
            asyncio.run(load(url, texts, 8, 32))  # warm-up
            latencies, _, statuses, seconds = asyncio.run(load(url, texts, CLIENTS, requests))
        finally:
            process.terminate()
            process.wait()
    return {"req_s": len(latencies) / seconds, "p50_ms": float(np.median(latencies) * 1000),
            "errors": sum(n for s, n in statuses.items() if s != 200)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A sequence-classification folder (bench/gpu_train.py's).")
    parser.add_argument("--rows", type=int, default=10000, help="Generated reviews to score.")
    parser.add_argument("--requests", type=int, default=2048, help="Requests sent to each server.")
    parser.add_argument("--workers", type=int, default=WORKERS, help="Processes of the service's run in several.")
    parser.add_argument("--json", default=None, help="Write every figure to this JSON file.")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    precision = "bf16" if gpu else "fp32"
    texts = generated_reviews(args.rows, seed=1)["review"].to_list()
    # Each part is written as soon as it is measured, and a part that fails costs only itself.
    report = {"precision": precision, "rows": args.rows, "clients": CLIENTS, "scoring": {}, "serving": {},
              "failed": {}}
    scoring, serving = report["scoring"], report["serving"]

    def attempt(name, measure):
        """What `measure()` returns, or None where it failed (the failure goes into the report)."""
        try:
            return measure()
        except (Exception, SystemExit) as err:  # bench.serve.start_server exits when a server does not start
            report["failed"][name] = f"{type(err).__name__}: {err}"
            print(f"{name}: failed ({report['failed'][name]})", flush=True)

    pipe = attempt("pipeline scoring", lambda: score_pipeline(args.model, texts, gpu))
    if pipe:
        scoring["pipeline_reviews_s"] = pipe[1]
    save(args.json, report)
    ours = attempt("Predictor scoring", lambda: score_predictor(args.model, texts, precision))
    if ours:  # a second pass much faster than the first: a cost per new batch shape (cuDNN's graphs were one)
        scoring["predictor_reviews_s"], scoring["predictor_again_reviews_s"] = ours[1:]
    if pipe and ours:
        scoring["same_label"] = float(np.mean([a == b for a, b in zip(pipe[0], ours[0])]))
        print(f"scoring {args.rows} reviews, {precision}: Predictor {ours[1]:.0f} reviews/s, pipeline(batch_size=64) "
              f"{pipe[1]:.0f} reviews/s: {ours[1] / pipe[1]:.2f}x; same label on {scoring['same_label']:.1%}; "
              f"the Predictor on the same reviews again {ours[2]:.0f} reviews/s",
              flush=True)
    save(args.json, report)
    several = f"ours, {args.workers} workers"
    for name in ("ours", "per-request", several):
        r = attempt(f"serving, {name}", lambda: serve(name, args.model, texts, max(args.requests, 2 * CLIENTS),
                                                      precision, args.workers))
        if r:
            serving[name] = r
            print(f"serving, {CLIENTS} clients, {name}: {r['req_s']:.0f} req/s, p50 {r['p50_ms']:.0f} ms, "
                  f"{r['errors']} errors", flush=True)
        save(args.json, report)
    if "ours" in serving and ours:
        print(f"service / offline Predictor: {serving['ours']['req_s'] / ours[1]:.2f}x")
    if "ours" in serving and "per-request" in serving:
        print(f"service / per-request server: {serving['ours']['req_s'] / serving['per-request']['req_s']:.2f}x")
    if several in serving and ours:
        print(f"service in {args.workers} workers / offline Predictor: {serving[several]['req_s'] / ours[1]:.2f}x")
    if report["failed"]:
        raise SystemExit(f"failed: {', '.join(report['failed'])}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
