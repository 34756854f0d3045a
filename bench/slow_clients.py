"""Clients that send requests ahead, read no answer, or chunk a body finely: the service's HTTP/1.1
(`--http app:HTTP`) against uvicorn's own h11 (`--http h11`), the same app, the same attacks, in one run.

- ahead: two connections each send 12 MB of 64-review requests ahead of their answers (HTTP
  pipelining), reading the answers as they come; the service's memory is read 8 s later.
- unread: one connection sends 100 kB-answer requests ahead and reads nothing; 12 s later the
  service is sent SIGTERM, and the time it takes to end is measured (at most 30 s are waited).
- chunks: one request's megabyte body in one-byte chunks (6 MB sent); meanwhile another client
  sends 20 reviews one after another, and the slowest answer counts.
The attacks come from 127.0.0.1; the other client is 127.0.0.2.

    python -m bench.slow_clients --model outputs/demo
"""

import argparse
import json
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from bench.body_flood import resident_mb
from bench.common import cpu_description
from bench.serve import start_server

SETTINGS = {"SENTIMENT_SEND_TIMEOUT_S": "2", "SENTIMENT_MAX_TEXTS": "1000", "SENTIMENT_QUEUE_SIZE": "1000",
            "SENTIMENT_MAX_BATCH_SIZE": "1000", "TOKENIZERS_PARALLELISM": "false"}


def request(texts):
    body = json.dumps({"inputs": texts}).encode()
    return (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body)


def send_ahead(url, data, read):
    """A connection sending `data` (many requests) in one go from a thread; `read` drains its answers."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))

    def run(work):
        try:
            work()
        except OSError:  # cut by the server, or closed at the end
            pass
    threading.Thread(target=run, args=(lambda: sock.sendall(data),), daemon=True).start()
    if read:
        threading.Thread(target=run, args=(lambda: [None for _ in iter(lambda: sock.recv(1 << 16), b"")],),
                         daemon=True).start()
    return sock


def ahead(url, pid):
    texts = ["The acting was superb. I loved it."] * 64
    with ThreadPoolExecutor(4) as pool:  # the model's and tokenizer's own memory, batches as large, first
        list(pool.map(lambda _: httpx.post(url + "/predict", json={"inputs": texts}, timeout=60), range(32)))
    before = resident_mb(pid)
    data = request(texts) * (12 * 2**20 // 4000)
    socks = [send_ahead(url, data, read=True) for _ in range(2)]
    time.sleep(8)
    grown = resident_mb(pid) - before
    for sock in socks:
        sock.close()
    return grown


def unread(url, process):
    sock = send_ahead(url, request(["a fine film"] * 1000) * 1200, read=False)
    time.sleep(12)
    start = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    sock.close()
    return time.perf_counter() - start


def chunks(url):
    body = b'{"text": "' + b"a" * 999_988 + b'"}'
    framed = b"".join(b"1\r\n" + body[i:i + 1] + b"\r\n" for i in range(len(body))) + b"0\r\n\r\n"
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    sock = send_ahead(url, head + framed, read=False)
    slowest = 0.0
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=60) as other:
        for _ in range(20):
            start = time.perf_counter()
            other.post(url + "/predict", json={"text": "The acting was superb. I loved it."})
            slowest = max(slowest, time.perf_counter() - start)
    sock.close()
    return slowest * 1000


def measure(model, http):
    row = {}
    for attack in ("ahead", "chunks", "unread"):  # unread last: it ends the server
        process, url = start_server("app:app", model, http=http, **SETTINGS)
        try:
            if attack == "ahead":
                row["ahead_mb"] = ahead(url, process.pid)
            elif attack == "chunks":
                row["chunks_ms"] = chunks(url)
            else:
                row["unread_s"] = unread(url, process)
        finally:
            process.kill()
            process.wait()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/demo", help="A model folder (default: outputs/demo).")
    args = parser.parse_args()
    rows = {"--http app:HTTP (ours)": measure(args.model, "app:HTTP"),
            "--http h11 (uvicorn's)": measure(args.model, "h11")}
    print(cpu_description())
    print(f"{'server':24} {'sent ahead: grown by':>21} {'tiny chunks: slowest other':>27} "
          f"{'unread: SIGTERM to exit':>24}")
    for name, row in rows.items():
        unread_s = f"{row['unread_s']:.1f} s" if row["unread_s"] < 30 else "over 30 s"
        print(f"{name:24} {row['ahead_mb']:>18.1f} MB {row['chunks_ms']:>24.0f} ms {unread_s:>24}")
    ours, peer = rows.values()
    print(f"ratios (uvicorn's / ours): memory {peer['ahead_mb'] / max(ours['ahead_mb'], 0.1):.0f}x, slowest other "
          f"answer {peer['chunks_ms'] / ours['chunks_ms']:.0f}x, shutdown {peer['unread_s'] / ours['unread_s']:.0f}x "
          f"or more")


if __name__ == "__main__":
    main()
