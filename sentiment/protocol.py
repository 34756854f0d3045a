"""What a `/predict` body may hold, and the shape of its answer.

Two request shapes are accepted: ours, `{"text": "…"}` or `{"texts": ["…", …]}`, and the Hugging
Face inference request, `{"inputs": "…" | ["…", …], "parameters": {"top_k", "function_to_apply"}}`,
so that `huggingface_hub.InferenceClient(URL).text_classification(text)` works unchanged.
`read_request` reads the body under a deadline and a size limit, within a `BodyBudget` shared by
every request, and checks every text before it reaches a batch; each failure is a `BadRequest`
with its HTTP status. Nothing here touches the model or the queue.
"""

import asyncio
import collections
import contextlib
import json
from dataclasses import dataclass

from starlette.requests import ClientDisconnect

from .data import only_markup
from .errors import json_type, repeated_key

PARSE_OFF_LOOP_BYTES = 64 << 10  # larger bodies are parsed and checked on a worker thread
FUNCTIONS = ("softmax", "sigmoid", "none")  # as the pipeline names them; a model answers with its own alone


class BadRequest(Exception):
    """A request answered with an error; `limit` names the service's limit a 503 met ("bodies", "client_bodies")."""

    def __init__(self, status, kind, message, limit=None):
        super().__init__(message)
        self.status, self.kind, self.message, self.limit = status, kind, message, limit


class BodyBudget:
    """The bytes of request bodies the service holds at once (SENTIMENT_MAX_BODY_BYTES_TOTAL), and
    the part of it one client may hold (SENTIMENT_MAX_BODY_BYTES_PER_CLIENT): bytes are counted as
    they arrive and given back once the body is parsed or abandoned, so slow large bodies cannot take
    the memory every request needs, nor one client's bodies the room every other client needs."""

    def __init__(self, limit, client_limit):
        self.limit, self.client_limit, self.held = limit, client_limit, 0
        self.by_client = collections.Counter()

    @contextlib.contextmanager
    def reserve(self, client):
        """A reservation for one body of `client`: `take(n)` as bytes arrive; all of it given back on leaving."""
        reservation = Reservation(self, client)
        try:
            yield reservation
        finally:
            self.held -= reservation.taken
            self.by_client[client] -= reservation.taken
            if not self.by_client[client]:
                del self.by_client[client]


class Reservation:
    def __init__(self, budget, client):
        self.budget, self.client, self.taken = budget, client, 0

    def take(self, size):
        budget = self.budget
        if budget.held + size > budget.limit:
            raise BadRequest(503, "overloaded", "the service holds as many request bodies as it may "
                                                "(SENTIMENT_MAX_BODY_BYTES_TOTAL); retry shortly", limit="bodies")
        if budget.by_client[self.client] + size > budget.client_limit:
            raise BadRequest(503, "overloaded", "the service holds as many of this client's request bodies as it "
                                                "may (SENTIMENT_MAX_BODY_BYTES_PER_CLIENT); retry shortly",
                             limit="client_bodies")
        budget.held += size
        budget.by_client[self.client] += size
        self.taken += size


@dataclass
class Request:
    texts: list
    shape: str  # "text", "texts" (ours), "inputs" (one string) or "inputs_list"
    top_k: int = None  # Hugging Face shape only: that many labels, best first; None = all

    def answer(self, answers):
        """The JSON answer for `answers`, the Predictor's dicts in the order of `texts`."""
        if self.shape == "text":
            return answers[0]
        if self.shape == "texts":
            return {"predictions": answers}
        # As the Hugging Face Inference API answers: one list of labels per input, also for one string
        # (InferenceClient.text_classification reads the first).
        return [self.ranked(a) for a in answers]

    def where(self, i):
        """How an error names the i-th text."""
        return {"text": "text", "inputs": "inputs", "texts": f"texts[{i}]", "inputs_list": f"inputs[{i}]"}[self.shape]

    def ranked(self, answer):
        labels = sorted(answer["scores"].items(), key=lambda item: -item[1])
        return [{"label": label, "score": score} for label, score in labels[:self.top_k]]


def media_type(request):
    """The media type and its charset (empty when not given), lower-cased."""
    kind, *parameters = request.headers.get("content-type", "").lower().split(";")
    charsets = [value.strip().strip('"') for name, _, value in (p.partition("=") for p in parameters)
                if name.strip() == "charset"]
    return kind.strip(), charsets[0] if charsets else ""


async def read_body(request, settings, reservation):
    """The body, within SENTIMENT_MAX_BODY_BYTES, SENTIMENT_BODY_TIMEOUT_S and the body budget."""
    too_large = BadRequest(413, "body_too_large", f"the body is over {settings.max_body_bytes} bytes "
                                                  f"(SENTIMENT_MAX_BODY_BYTES)")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
        raise too_large  # refused before reading; the stream check below catches bodies that lie

    async def read():
        body = bytearray()
        async for chunk in request.stream():
            reservation.take(len(chunk))
            body += chunk
            if len(body) > settings.max_body_bytes:
                raise too_large
        return bytes(body)

    try:
        return await asyncio.wait_for(read(), settings.body_timeout_s)
    except asyncio.TimeoutError:  # TimeoutError from Python 3.11; its own class on 3.10
        raise BadRequest(408, "body_timeout", f"the body did not arrive within {settings.body_timeout_s} s "
                                              f"(SENTIMENT_BODY_TIMEOUT_S)") from None
    except ClientDisconnect:
        raise BadRequest(499, "client_disconnected", "the client went away") from None


async def read_request(request, settings, budget, client, function="softmax"):
    """The checked `Request` of `client`'s /predict body, or `BadRequest` naming what is wrong with it;
    `function` is how the model makes its scores (`metrics.output_function`)."""
    kind, charset = media_type(request)
    if kind != "application/json":
        raise BadRequest(415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json")
    if charset not in ("", "utf-8", "utf8"):
        raise BadRequest(415, "unsupported_media_type", f"charset={charset}: send JSON as UTF-8")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise BadRequest(415, "unsupported_media_type", f"Content-Encoding {encoding} is not accepted: send the "
                                                        f"body uncompressed")
    with budget.reserve(client) as reservation:
        body = await read_body(request, settings, reservation)
        if len(body) > PARSE_OFF_LOOP_BYTES:  # a large body must not hold up the event loop
            return await asyncio.to_thread(parse, body, settings, function)
        return parse(body, settings, function)


def parse(body, settings, function="softmax"):
    try:
        payload = json.loads(body, object_pairs_hook=unique_keys)
    except UnicodeDecodeError as err:
        raise BadRequest(400, "malformed_json", f"the body is not UTF-8 (at byte {err.start}); send JSON as "
                                                f"UTF-8") from None
    except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        raise BadRequest(400, "malformed_json", "the body is not valid JSON") from None
    request = shape_of(payload, function)
    if len(request.texts) > settings.max_texts:
        raise BadRequest(413, "too_many_texts", f"{len(request.texts)} texts in one request; the limit is "
                                                f"{settings.max_texts} (SENTIMENT_MAX_TEXTS): split the request")
    for i, text in enumerate(request.texts):
        check_text(text, request.where(i), settings)
    return request


def unique_keys(pairs):
    """An object of JSON whose keys are each given once. Python keeps the last of `{"text": "a", "text": "b"}`,
    other parsers (a proxy's, a log's) the first: refused, the service cannot score a text other than the one
    they saw."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        twice = repeated_key(pairs)
        shown = json.dumps(twice[:40])  # escaped: a lone surrogate could not be sent back; and cut, it can be 1 MB
        shown = shown if len(twice) <= 40 else shown[:-1] + '…"'
        raise BadRequest(422, "invalid_request", f"the key {shown} is given twice in one object; give each key once")
    return obj


def shape_of(payload, function="softmax"):
    """The texts and shape of a parsed body; `BadRequest` if it is neither of the two contracts."""
    keys = {"text", "texts", "inputs"} & set(payload) if isinstance(payload, dict) else set()
    if len(keys) != 1:
        raise BadRequest(422, "invalid_request", 'send {"text": "…"}, {"texts": ["…", …]} or {"inputs": "…"}')
    key = keys.pop()
    value = payload[key]
    if key == "text" or (key == "inputs" and not isinstance(value, list)):
        return Request([value], key, **parameters(payload, function) if key == "inputs" else {})
    if not isinstance(value, list) or not value:
        raise BadRequest(422, "invalid_request", f'"{key}" must be a non-empty list of strings')
    shape = "texts" if key == "texts" else "inputs_list"
    return Request(value, shape, **parameters(payload, function) if key == "inputs" else {})


def parameters(payload, function):
    """top_k and function_to_apply of a Hugging Face request, checked: the scores come from the model's own
    `function` (calibrated probabilities, for a model train.py wrote), so no other may be asked for."""
    params = payload.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest(422, "invalid_request", '"parameters" must be an object')
    top_k = params.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise BadRequest(422, "invalid_request", '"parameters.top_k" must be a whole number of at least 1')
    asked = params.get("function_to_apply")
    if asked is not None and str(asked).lower() != function:
        known = "" if str(asked).lower() in FUNCTIONS else " (the pipeline's are softmax, sigmoid and none)"
        raise BadRequest(422, "invalid_request", f'"parameters.function_to_apply" {asked!r} is not supported{known}; '
                                                 f'this model\'s scores come from "{function}"')
    return {"top_k": top_k}


def check_text(text, where, settings):
    if not isinstance(text, str):
        raise BadRequest(422, "invalid_request", f"{where} must be a string, got a JSON {json_type(text)}")
    if not text.strip():
        raise BadRequest(422, "empty_text", f"{where} is empty")
    if len(text) > settings.max_chars:
        raise BadRequest(413, "text_too_long", f"{where} has {len(text)} characters; the limit is "
                                               f"{settings.max_chars} (SENTIMENT_MAX_CHARS)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate such as "\ud800": no tokenizer can read it
        raise BadRequest(422, "invalid_text", f"{where} is not valid Unicode (a lone surrogate escape such as "
                                              f"\\ud800); send UTF-8 text") from None
    if only_markup(text):
        raise BadRequest(422, "empty_text", f"{where} is only markup such as <br />: nothing to score")
