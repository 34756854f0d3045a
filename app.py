"""The sentiment HTTP service: `uvicorn app:app --host 0.0.0.0 --port 8000`.

Settings come from SENTIMENT_* environment variables (see `sentiment.config.ServeSettings`);
SENTIMENT_MODEL names the model folder (default: outputs/model, where train.py writes).
"""

from sentiment.config import ServeSettings
from sentiment.serving import create_app

try:
    settings = ServeSettings.from_env()
except ValueError as err:  # a bad SENTIMENT_* value: one line, not a traceback
    raise SystemExit(f"error: {err}") from None
app = create_app(settings)
