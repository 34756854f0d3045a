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

from sentiment.modeling import varying_shapes

GPU = torch.cuda.is_available()
# SENTIMENT_PRECISION=bf16: bf16 weights on a GPU, and on a CPU the same bf16 autocast the Predictor
# uses there, for like-for-like rows.
BF16 = os.environ.get("SENTIMENT_PRECISION") == "bf16"
classify = pipeline("text-classification", model=os.environ["SENTIMENT_MODEL"], device=0 if GPU else -1, top_k=None,
                    **({"dtype": torch.bfloat16} if BF16 and GPU else {}))
MAX_LENGTH = int(os.environ["SENTIMENT_MAX_LENGTH"])


def answer(scores):
    best = max(scores, key=lambda s: s["score"])
    return {"label": best["label"], "score": best["score"], "scores": {s["label"]: s["score"] for s in scores}}


async def predict(request):
    body = await request.json()
    texts = body["texts"] if "texts" in body else [body["text"]]
    # The model runs on the event loop: one request at a time, as a simple per-request server does. Its attention
    # kernels are the service's (`varying_shapes`: not cuDNN's, which builds a graph for each new shape, here each
    # new review length), so the two differ in batching alone.
    half = torch.autocast("cpu", dtype=torch.bfloat16) if BF16 and not GPU else contextlib.nullcontext()
    with half, varying_shapes():
        answers = [answer(scores) for scores in classify(texts, truncation=True, max_length=MAX_LENGTH)]
    return JSONResponse({"predictions": answers} if "texts" in body else answers[0])


async def health(request):
    return JSONResponse({"status": "ok"})

app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/ready", health)])
