"""The sentiment HTTP service: `uvicorn app:app --host 0.0.0.0 --port 8000`.

Settings come from SENTIMENT_* environment variables (see `sentiment.serving.ServeSettings`);
SENTIMENT_MODEL names the model folder (default: outputs/model, where train.py writes).
"""

from sentiment.serving import create_app

app = create_app()
