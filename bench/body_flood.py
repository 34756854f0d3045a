"""Memory under a flood of slow large bodies: the service with its body budget against itself
without one (SENTIMENT_MAX_BODY_BYTES_TOTAL as large as can be), same attack, in one run.

For each, N connections each send a 1 MiB body but for its last bytes and hold it; the service's
resident memory is read before and after, and one ordinary review is sent meanwhile by another
client (another loopback address; the flood comes from 127.0.0.1). The budget
bounds what bodies hold; what is left per connection is uvicorn's own buffering, which the bound
on open connections (SENTIMENT_MAX_CONNECTIONS) limits in turn.

    python -m bench.body_flood --model outputs/demo --connections 2000
"""

import argparse
import resource
import socket
import time

import httpx

from bench.serve import start_server

BODY = 1 << 20


def resident_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def flood(url, connections):
    """Open the connections, send each body but for its last bytes; they stay open until closed."""
    host, port = url.removeprefix("http://").split(":")
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {BODY}\r\n\r\n").encode()
    body = b'{"text": "' + b"a" * (BODY - 20)
    socks = []
    for _ in range(connections):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(head + body)
        socks.append(sock)
    return socks


def attack(model, connections, budget):
    env = {"SENTIMENT_BODY_TIMEOUT_S": "60", "TOKENIZERS_PARALLELISM": "false"}
    if budget is not None:
        env["SENTIMENT_MAX_BODY_BYTES_TOTAL"] = str(budget)
    process, url = start_server("app:app", model, http="app:HTTP", **env)
    try:
        before = resident_mb(process.pid)
        socks = flood(url, connections)
        time.sleep(2)  # the service reads what arrived
        during = resident_mb(process.pid)
        start = time.perf_counter()
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=60) as other:
            status = other.post(url + "/predict", json={"text": "A fine film."}).status_code  # another client
        seconds = time.perf_counter() - start
        for sock in socks:
            sock.close()
        return {"before_mb": before, "grown_mb": during - before, "review_status": status, "review_ms": seconds * 1000}
    finally:
        process.kill()
        process.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/demo", help="A model folder (default: outputs/demo).")
    parser.add_argument("--connections", type=int, default=2000, help="Slow 1 MiB bodies held at once.")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.connections + 256)), hard))
    rows = {"with the body budget (64 MiB)": attack(args.model, args.connections, None),
            "without one": attack(args.model, args.connections, 1 << 50)}
    print(f"{args.connections} connections, each holding a 1 MiB body but for its last bytes")
    print(f"{'service':32} {'memory before':>14} {'grown by':>10} {'one review':>12}")
    for name, row in rows.items():
        print(f"{name:32} {row['before_mb']:>11.0f} MB {row['grown_mb']:>7.0f} MB "
              f"{row['review_status']:>4} {row['review_ms']:>5.0f} ms")
    with_budget, without = rows.values()
    print(f"memory grown without the budget / with it: {without['grown_mb'] / max(with_budget['grown_mb'], 1):.1f}x")


if __name__ == "__main__":
    main()
