"""bench/hammer.py's peers: the service as it is, less what HAMMER_PEER names (comma-separated):
`hold`, so that a client back before its Retry-After is answered at once rather than held until
then, and `switch`, so that the GIL is handed over at Python's default interval (5 ms), not 0.2 ms.

    HAMMER_PEER=hold,switch SENTIMENT_MODEL=outputs/bench-train/same \
        uvicorn bench.hammer_peer:app --http bench.hammer_peer:HTTP
"""

import os
import sys

import sentiment.serving
from app import HTTP, app  # noqa: F401 (what uvicorn is pointed at)

without = set(os.environ.get("HAMMER_PEER", "").split(","))
if "hold" in without:
    sentiment.serving.RetryTimes.of = lambda self, client: 0.0  # never told to wait
if "switch" in without:
    sentiment.serving.GIL_SWITCH_S = sys.getswitchinterval()  # read by the lifespan, at start-up
