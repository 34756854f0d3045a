#!/usr/bin/env bash
# Score one review with the running service and print its answer.
#   ./predict_sentiment.sh "What a wonderful film"      or      echo "review" | ./predict_sentiment.sh
#   ./predict_sentiment.sh -- "-5 stars, dreadful"       (after --, a review may start with a dash)
# SENTIMENT_URL says where the service is (default http://localhost:8000).
set -euo pipefail
case "${1:-}" in
  -h|--help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 0 ;;
  --) shift ;;
esac
url="${SENTIMENT_URL:-http://localhost:8000}"
while [ "${url%/}" != "$url" ]; do url="${url%/}"; done  # the script adds /predict itself
body="$(mktemp)"
err="$(mktemp)"
trap 'rm -f "$body" "$err"' EXIT
# The review goes to python3 as bytes (arguments or stdin) and the JSON body to curl as a file, so
# no review is too long for an argument list. python3 escapes quotes, backslashes, newlines and
# non-ASCII text, and refuses bytes that are not UTF-8 here rather than sending them on.
if [ "$#" -gt 0 ]; then printf '%s' "$*"; else cat; fi | python3 -c '
import json, sys
raw = sys.stdin.buffer.read()
try:
    text = raw.decode("utf-8")
except UnicodeDecodeError:
    sys.exit("error: the review is not valid UTF-8 text; convert it first (e.g. iconv -f latin1 -t utf-8)")
if not text.strip():
    sys.exit(2)
json.dump({"text": text}, sys.stdout)
' > "$body" || status=$?
if [ "${status:-0}" -eq 2 ]; then
  echo "usage: $0 \"review text\"   (or the review on stdin)" >&2
  exit 2
elif [ "${status:-0}" -ne 0 ]; then
  exit 2
fi
answer="$(curl -sS --max-time 60 -H 'Content-Type: application/json' --data-binary "@$body" \
                -w '\n%{http_code}' "$url/predict" 2>"$err")" || curl_status=$?
if [ "${curl_status:-0}" -ne 0 ]; then
  hint=""
  if [ "$curl_status" -eq 7 ]; then  # nothing listens there
    hint="; is the service running? Start it: SENTIMENT_MODEL=folder uvicorn app:app --http app:HTTP, or set SENTIMENT_URL"
  fi
  echo "error: no answer from $url: $(head -n 1 "$err" | sed 's/^curl: //')$hint" >&2
  exit 1
fi
status="${answer##*$'\n'}"
answer="${answer%$'\n'*}"
if [ "$status" != "200" ]; then
  case "$status $url" in
    "404 "*/predict) answer+=" (SENTIMENT_URL is where the service is: leave out /predict)" ;;
  esac
  echo "error: $url answered $status: $answer" >&2
  exit 1
fi
# Something else at that address (a proxy's page, another service) may answer 200 too.
if ! printf '%s' "$answer" | python3 -c '
import json, sys
answer = json.load(sys.stdin)
sys.exit(not (isinstance(answer, dict) and "label" in answer))' 2>/dev/null; then
  shown="${answer//[$'\r\n']/ }"
  echo "error: $url answered 200, but not as the sentiment service does: ${shown:0:200}; is SENTIMENT_URL the service?" >&2
  exit 1
fi
echo "$answer"
