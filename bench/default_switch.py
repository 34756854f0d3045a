"""bench/hammer.py's peer: the service as it is, but for Python's default GIL switch interval (5 ms).

    SENTIMENT_MODEL=outputs/bench-train/same uvicorn bench.default_switch:app --http bench.default_switch:HTTP
"""

import sys

import sentiment.serving
from app import HTTP, app  # noqa: F401 (what uvicorn is pointed at)

sentiment.serving.GIL_SWITCH_S = sys.getswitchinterval()  # read by the lifespan, at start-up
