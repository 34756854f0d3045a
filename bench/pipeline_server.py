"""The per-request peer for bench/serve.py: one `transformers.pipeline` call per request, no batching.

    SENTIMENT_MODEL=outputs/bench-train/same SENTIMENT_MAX_LENGTH=256 uvicorn bench.pipeline_server:app

SENTIMENT_MAX_LENGTH is required: the peer must truncate where the server it is compared with does.
"""

import contextlib
import os

import torch
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from transformers import pipeline

classify = pipeline("text-classification", model=os.environ["SENTIMENT_MODEL"], device=-1, top_k=None)
MAX_LENGTH = int(os.environ["SENTIMENT_MAX_LENGTH"])
# SENTIMENT_PRECISION=bf16: the same bf16 autocast the Predictor uses on a CPU, for a like-for-like row.
BF16 = os.environ.get("SENTIMENT_PRECISION") == "bf16"


async def predict(request):
    text = (await request.json())["text"]
    # The model runs on the event loop: one request at a time, as a simple per-request server does.
    with torch.autocast("cpu", dtype=torch.bfloat16) if BF16 else contextlib.nullcontext():
        scores = classify([text], truncation=True, max_length=MAX_LENGTH)[0]
    best = max(scores, key=lambda s: s["score"])
    return JSONResponse({"label": best["label"], "score": best["score"],
                         "scores": {s["label"]: s["score"] for s in scores}})


async def health(request):
    return JSONResponse({"status": "ok"})

app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/ready", health)])
