"""One client that keeps opening connections: the service's own HTTP/1.1 (`--http app:HTTP`, with its
bounds on open connections) against uvicorn's (`--http h11`), same attack, in one run.

Each server runs with an open-file limit of 256 (`ulimit -n`), as small limits are common (1,024 is
many systems' default); the flood, from 127.0.0.2, keeps twice that many connections open, opening
again each one the server closes. Meanwhile another client (127.0.0.3) sends one review at a time,
each with a time limit; the table gives their answers, their latency, and how many lines the
server logged.

    python -m bench.conn_flood --model outputs/demo
"""

import argparse
import select
import socket
import tempfile
import threading
import time

import httpx

from bench.serve import start_server

OPEN_FILES = 256


def keep_open(host, port, count, flooding):
    """Hold `count` connections open until `flooding` is cleared, opening again each one the server closes."""
    socks = []
    while flooding.is_set():
        socks = [sock for sock in socks if not select.select([sock], [], [], 0)[0] or sock.close()]
        while len(socks) < count and flooding.is_set():
            try:
                socks.append(socket.create_connection((host, port), timeout=2, source_address=("127.0.0.2", 0)))
            except OSError:
                break
        time.sleep(0.25)
    for sock in socks:
        sock.close()


def attack(model, http, reviews, seconds_each):
    with tempfile.TemporaryFile("w+") as log:
        process, url = start_server("app:app", model, http, open_files=OPEN_FILES, log=log,
                                    TOKENIZERS_PARALLELISM="false")
        host, port = url.removeprefix("http://").split(":")
        flooding = threading.Event()
        flooding.set()
        flood = threading.Thread(target=keep_open, args=(host, int(port), 2 * OPEN_FILES, flooding))
        flood.start()
        try:
            time.sleep(3)
            answers = []
            with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3"), timeout=seconds_each) as other:
                for _ in range(reviews):
                    start = time.perf_counter()
                    try:
                        status = other.post(url + "/predict", json={"text": "A fine film."}).status_code
                    except httpx.HTTPError as err:
                        status = type(err).__name__
                    answers.append((status, time.perf_counter() - start))
        finally:
            flooding.clear()
            flood.join()
            process.kill()
            process.wait()
        log.seek(0)
        return answers, sum(1 for _ in log)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/demo", help="A model folder (default: outputs/demo).")
    parser.add_argument("--reviews", type=int, default=5, help="Reviews the other client sends, one at a time.")
    parser.add_argument("--seconds", type=float, default=5.0, help="Each review's time limit.")
    args = parser.parse_args()
    rows = {"app:HTTP (bounded)": attack(args.model, "app:HTTP", args.reviews, args.seconds),
            "h11 (uvicorn's)": attack(args.model, "h11", args.reviews, args.seconds)}
    print(f"one client holding {2 * OPEN_FILES} connections, opened again as they close; the server's open-file "
          f"limit {OPEN_FILES}; another client's reviews, each within {args.seconds:g} s")
    print(f"{'protocol':20} {'answers':>24} {'median':>9} {'log lines':>10}")
    for name, (answers, logged) in rows.items():
        statuses = sorted({str(s) for s, _ in answers})
        answered = sorted(seconds for status, seconds in answers if status == 200)
        median = f"{answered[len(answered) // 2] * 1000:.0f} ms" if answered else "-"
        summary = ", ".join(f"{sum(str(s) == one for s, _ in answers)}x {one}" for one in statuses)
        print(f"{name:20} {summary:>24} {median:>9} {logged:>10}")


if __name__ == "__main__":
    main()
