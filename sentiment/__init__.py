"""sentiment: fine-tune a transformer on labelled reviews, score texts in bulk, serve it over HTTP.

Data flows one way: `data` (read, clean, split) → `batching` (tokenise, group by length) →
`modeling` (models and the model folder) → `training` (the loop) → the model folder →
`Predictor` (the one inference core) → `infer.py` and the HTTP service.
"""

from .errors import SentimentError

__all__ = ["SentimentError"]
