#!/usr/bin/env bash
# Score one review with the running service and print its answer.
#   ./predict_sentiment.sh "What a wonderful film"      or      echo "review" | ./predict_sentiment.sh
# SENTIMENT_URL says where the service is (default http://localhost:8000).
set -euo pipefail
url="${SENTIMENT_URL:-http://localhost:8000}"
if [ "$#" -gt 0 ]; then text="$*"; else text="$(cat)"; fi
if [ -z "${text//[[:space:]]/}" ]; then
  echo "usage: $0 \"review text\"   (or the review on stdin)" >&2
  exit 2
fi
# python3's json module escapes quotes, backslashes, newlines and non-ASCII text correctly.
body="$(printf '%s' "$text" | python3 -c 'import json, sys; print(json.dumps({"text": sys.stdin.read()}))')"
err="$(mktemp)"
trap 'rm -f "$err"' EXIT
if ! answer="$(curl -sS --max-time 60 -H 'Content-Type: application/json' --data-binary "$body" \
                    -w '\n%{http_code}' "$url/predict" 2>"$err")"; then
  echo "error: no answer from $url: $(head -n 1 "$err" | sed 's/^curl: //')" >&2
  exit 1
fi
status="${answer##*$'\n'}"
answer="${answer%$'\n'*}"
if [ "$status" != "200" ]; then
  echo "error: $url answered $status: $answer" >&2
  exit 1
fi
echo "$answer"
