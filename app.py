"""The sentiment HTTP service: `uvicorn app:app --http app:HTTP --host 0.0.0.0 --port 8000`.

Settings come from SENTIMENT_* environment variables (see `sentiment.config.ServeSettings`);
SENTIMENT_MODEL names the model folder (default: outputs/model, where train.py writes).
`--http app:HTTP` is uvicorn's HTTP/1.1 with deadlines on request heads (SENTIMENT_HEAD_TIMEOUT_S), on
the rest of bodies answered early (SENTIMENT_BODY_TIMEOUT_S) and on answers left untaken
(SENTIMENT_SEND_TIMEOUT_S), limits on open connections (SENTIMENT_MAX_CONNECTIONS,
SENTIMENT_MAX_CONNECTIONS_PER_CLIENT), a bound on requests sent ahead of their answers and a refusal of
bodies in chunks too small to parse (see sentiment/connections.py).
Several processes: `--workers N`, each with its model, its queue and its limits; with PROMETHEUS_MULTIPROC_DIR
set to an empty folder, /metrics counts them all.
"""

from sentiment.config import ServeSettings
from sentiment.connections import http_protocol
from sentiment.serving import create_app

try:
    app = create_app(ServeSettings.from_env())
except ValueError as err:  # a bad SENTIMENT_* value, a missing PROMETHEUS_MULTIPROC_DIR: one line, not a traceback
    raise SystemExit(f"error: {err}") from None
HTTP = http_protocol(app.state.settings, app.state.metrics)
