"""The least a Starlette app can do for bench/http_ceiling.py: /predict reads its JSON body and answers a
fixed JSON answer, with no model, no queue, no limits; /ready answers 200.

    uvicorn bench.bare_app:app --http h11
"""

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def predict(request):
    await request.json()
    return JSONResponse({"label": "positive", "score": 0.5})


async def ready(request):
    return JSONResponse({"status": "ready"})


app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/ready", ready)])
