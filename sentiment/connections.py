"""What the service enforces on connections, before the app sees a request: uvicorn's HTTP/1.1
protocol with deadlines on request heads, on the rest of bodies answered before they were read and
on answers left untaken, a limit on open connections, in all and per client, and a bound on the
requests a client sends ahead of its answers.

`http_protocol(settings, metrics)` is the protocol class `uvicorn app:app --http app:HTTP` runs.
Every open connection holds a file descriptor. Without limits, one client that opens connections
faster than their deadlines close them takes every descriptor the process may have: `accept()`
then fails, and every other client waits in the listen queue until it times out. So a connection
beyond the service's limit, or beyond its client's share of it, is closed as soon as it is made.
A client that sends requests ahead (HTTP pipelining) and reads no answer must hold little and not
for long: without a bound, uvicorn read all it sent into memory (a request's wait for its client
to leave lets reading go on), and without a deadline, a connection whose answers wait in a full
socket stayed open for ever, and held back the service's shutdown.
`client_key` says who a client is, here and for the app's own per-client limits.
"""

import collections
import fcntl
import ipaddress
import logging
import struct
import termios
import time

import h11
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol

PIPELINED_BYTES = 1 << 16  # what a connection reads at most of the requests sent ahead of the one under way
# h11 parses a chunked body in Python, some microseconds a chunk: a megabyte of one-byte chunks held
# the event loop, every client's requests with it, for 4.6 s. A chunked body may hold FREE_LINE_ENDS
# line ends (two a chunk), and one more for every BYTES_PER_LINE_END bytes; it is handed to h11 a
# SLICE at a time, each counted before it is parsed, so one that breaks the rule costs little.
FREE_LINE_ENDS = 512
BYTES_PER_LINE_END = 128
SLICE = 8192
ANSWERED = "sentiment.answered"  # scope key: the status the protocol answered a request with, the app unaware
GUARDED = "sentiment.guarded"  # scope key: the request came through this protocol (plain uvicorn has none of it)
ACCEPT_FAILED = "socket.accept() out of system resource"  # asyncio's message, with a traceback, for each failure
ACCEPT_LOG_EVERY_S = 10.0
log = logging.getLogger(__name__)


def client_key(host):
    """The client an address belongs to: the address, and for IPv6 its /64 network, which one host or
    one home network commonly holds whole. An IPv4 client of a dual-stack socket is its IPv4 address;
    what is not an address (a Unix socket, a test client) is itself."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return host


def trusted_proxies(config):
    """Whether a peer is a proxy uvicorn takes client addresses from (`--forwarded-allow-ips`, by default
    this host): its connections carry many clients', so they count only toward the service's limit."""
    if not config.proxy_headers:
        return lambda host: False
    names = config.forwarded_allow_ips
    names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if "*" in names:
        return lambda host: True
    networks, literals = [], set()
    for name in names:
        try:
            networks.append(ipaddress.ip_network(name, strict=False))
        except ValueError:
            literals.add(name)

    def trusted(host):
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host in literals
        return any(address in network for network in networks)
    return trusted


class ConnectionLimits:
    """Open connections, in all and per client. `admit(host)` takes one for a new connection from `host`:
    it returns (the key it was counted under, None), or (None, the limit it met: "connections" or
    "client_connections"). `release(key)` gives an admitted one back."""

    def __init__(self, most, most_per_client, trusted):
        self.most, self.most_per_client, self.trusted = most, most_per_client, trusted
        self.open = 0
        self.by_client = collections.Counter()

    def admit(self, host):
        if self.open >= self.most:
            return None, "connections"
        key = None if not host or self.trusted(host) else client_key(host)
        if key is not None:
            if self.by_client[key] >= self.most_per_client:
                return None, "client_connections"
            self.by_client[key] += 1
        self.open += 1
        return key, None

    def release(self, key):
        self.open -= 1
        if key is not None:
            self.by_client[key] -= 1
            if not self.by_client[key]:
                del self.by_client[key]


def quiet_accept_failures(loop, refused):
    """asyncio logs a traceback for every connection it fails to accept, hundreds per event loop turn
    when a burst of connections finds the process out of file descriptors (it accepts a burst whole
    before any can be closed): a million log lines in a minute of such a flood. Count them in
    `refused` and say so in one line every `ACCEPT_LOG_EVERY_S` instead; other errors pass."""
    handler = loop.get_exception_handler()
    failed, said_at = 0, -ACCEPT_LOG_EVERY_S

    def handle(loop, context):
        nonlocal failed, said_at
        if context.get("message") != ACCEPT_FAILED:
            return handler(loop, context) if handler else loop.default_exception_handler(context)
        failed += 1
        refused.labels(limit="open_files").inc()
        if time.monotonic() - said_at >= ACCEPT_LOG_EVERY_S:
            log.warning("connections could not be accepted (%s), %d since the last such line: a burst came faster "
                        "than they could be closed; raise the open-file limit (ulimit -n) for such bursts",
                        context.get("exception"), failed)
            failed, said_at = 0, time.monotonic()
    loop.set_exception_handler(handle)


class HeldFlow(FlowControl):
    """uvicorn's flow control with a hold on reading that uvicorn's own calls cannot lift. uvicorn pauses
    reading while a request is under way, but each wait for a client to leave resumes it: a client that
    sent requests ahead had another read's worth of them buffered per request answered. While `hold`,
    such a resume is deferred until the hold is lifted (`set_hold`), and then made."""

    hold = deferred = False

    def pause_reading(self):
        self.deferred = False
        super().pause_reading()

    def resume_reading(self):
        if self.hold:
            self.deferred = True
        else:
            super().resume_reading()

    def set_hold(self, hold):
        self.hold = hold
        if hold:
            super().pause_reading()
        elif self.deferred:
            self.deferred = False
            super().resume_reading()


def http_protocol(settings, metrics):
    """uvicorn's HTTP/1.1 protocol, without WebSocket upgrades, plus:
    - a deadline on each request's head (request line and headers): a connection that has not sent a
      whole head `settings.head_timeout_s` after it opened, or after it began its next request, is
      closed. uvicorn waits for a head forever; the body has its own deadline (`body_timeout_s`) in the app;
    - the same deadline on the rest of a body answered before it was read (a 413, a 503): uvicorn reads
      it to throw it away for as long as the client sends it, so it must end `settings.body_timeout_s`
      after the answer, or the connection is closed;
    - `settings.max_connections` open at most, `settings.max_connections_per_client` of them from one
      client; beyond them a new connection is closed at once, counted in `metrics.connections_refused`;
    - reading stops while `PIPELINED_BYTES` of requests sent ahead wait behind the one under way;
    - a chunked body of chunks so small that parsing them would cost more than their bytes (see
      `FREE_LINE_ENDS`) is refused with a 400, and its connection closed; so is a request that gives
      both Content-Length and Transfer-Encoding, which h11 takes;
    - a deadline on answers: a client that takes nothing of what waits to be sent (what its socket
      would not take) for `settings.send_timeout_s` is cut; closing would wait for it. The
      transport's buffer limit is 0, so any byte left waiting starts the clock."""
    seconds = settings.head_timeout_s
    limits = None  # made with the first connection, once uvicorn's config says which peers are proxies

    class GuardedProtocol(H11Protocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # The service has no WebSocket routes. With a WebSocket library installed, uvicorn would hand
            # an upgrade's connection to that library's protocol, and it would never be counted as closed.
            self.ws_protocol_class = None  # an upgrade is a plain request

        def connection_made(self, transport):
            nonlocal limits
            super().connection_made(transport)
            if limits is None:
                quiet_accept_failures(self.loop, metrics.connections_refused)
                limits = ConnectionLimits(settings.max_connections, settings.max_connections_per_client,
                                          trusted_proxies(self.config))
            self.head_deadline = self.send_deadline = self.body_deadline = None
            self.admitted, self.chunked = False, None  # `chunked`: the cycle whose chunked body is counted
            self.framed = None  # the cycle whose head was checked for two framings
            self.counted_as, refused = limits.admit(self.client[0] if self.client else "")
            if refused:
                metrics.connections_refused.labels(limit=refused).inc()
                transport.close()
                return
            self.admitted = True
            metrics.connections_open.inc()
            self.head_deadline = self.loop.call_later(seconds, self.head_too_slow)
            self.flow = HeldFlow(transport)
            transport.set_write_buffer_limits(high=0)  # pause_writing as soon as a byte waits

        def handle_events(self):
            super().handle_events()
            if self.cycle is not None and self.cycle is not self.framed:  # a new request's head is in
                self.framed = self.cycle
                self.cycle.scope[GUARDED] = True  # before the app's task runs, on the next turn of the loop
                if {b"transfer-encoding", b"content-length"} <= {name for name, _ in self.cycle.scope["headers"]}:
                    return self.refuse_two_framings()
            if self.conn.their_state is h11.SEND_BODY and self.cycle is not self.chunked and any(
                    name == b"transfer-encoding" for name, _ in self.cycle.scope["headers"]):  # h11 takes only chunked
                self.chunked, self.line_ends, self.body_bytes = self.cycle, 0, 0
            if self.body_deadline is not None and (self.cycle is not self.answered_early
                                                   or self.conn.their_state is not h11.SEND_BODY):
                self.body_deadline.cancel()  # the rest of the body is in
                self.body_deadline = None
            # The request under way is whole (DONE): what else is buffered was sent ahead of its answer.
            ahead = len(self.conn.trailing_data[0]) if self.conn.their_state is h11.DONE else 0
            self.flow.set_hold(ahead >= PIPELINED_BYTES)

        def data_received(self, data):
            for start in range(0, len(data), SLICE):
                if not self.admitted or self.transport.is_closing():  # closing: what it sent is not read
                    return
                self.receive(data[start:start + SLICE])

        def receive(self, data):
            if self.chunked is not None and self.cycle is self.chunked and self.conn.their_state is h11.SEND_BODY:
                self.line_ends += data.count(b"\r\n")
                self.body_bytes += len(data)
                if self.line_ends > FREE_LINE_ENDS + self.body_bytes // BYTES_PER_LINE_END:
                    return self.refuse_small_chunks()
            if self.head_deadline is None and self.conn.their_state is h11.IDLE:  # a kept-alive connection's next
                self.head_deadline = self.loop.call_later(seconds, self.head_too_slow)  # request has begun
            super().data_received(data)
            if self.head_deadline is not None and self.conn.their_state is not h11.IDLE:  # the head is in
                self.head_deadline.cancel()
                self.head_deadline = None

        def refuse_small_chunks(self):
            if self.cycle.response_started:  # answered already (a 413): what is left is not read
                return self.close_for("small_chunks")
            metrics.connections_cut.labels(reason="small_chunks").inc()
            self.cycle.scope[ANSWERED] = 400  # what the app counts the request as, once it sees the client gone
            self.send_400_response(f"the body comes in chunks too small to be worth parsing; send it with "
                                   f"Content-Length, or in chunks of {2 * BYTES_PER_LINE_END} bytes or more")

        def refuse_two_framings(self):
            """A head with both Content-Length and Transfer-Encoding: h11 frames the body by the second, a
            proxy in front may by the first, and the bytes between would be a request of someone else's
            (request smuggling). RFC 9112 lets a server refuse it, and has it close the connection."""
            self.cycle.scope[ANSWERED] = 400
            self.send_400_response("Content-Length and Transfer-Encoding both given: which one ends the body "
                                   "is ambiguous; send one of them")
            self.cycle.disconnected = True  # as `connection_lost` will say: the app reads no body and sends nothing
            self.cycle.message_event.set()

        def close_for(self, reason):
            if not self.transport.is_closing():
                metrics.connections_cut.labels(reason=reason).inc()
                self.transport.close()

        def head_too_slow(self):
            self.head_deadline = None
            self.close_for("head_timeout")

        def on_response_complete(self):
            super().on_response_complete()
            if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():  # answered early
                self.answered_early = self.cycle
                self.body_deadline = self.loop.call_later(settings.body_timeout_s, self.body_too_slow)

        def body_too_slow(self):
            self.body_deadline = None
            self.close_for("body_timeout")

        def pause_writing(self):
            super().pause_writing()
            if self.send_deadline is None:
                self.waiting = self.unsent()
                self.send_deadline = self.loop.call_later(settings.send_timeout_s, self.send_too_slow)

        def resume_writing(self):
            super().resume_writing()
            if self.send_deadline is not None:
                self.send_deadline.cancel()
                self.send_deadline = None

        def send_too_slow(self):
            self.send_deadline = None
            if (left := self.unsent()) < self.waiting:  # slow, but taking it
                self.waiting = left
                self.send_deadline = self.loop.call_later(settings.send_timeout_s, self.send_too_slow)
                return
            metrics.connections_cut.labels(reason="send_timeout").inc()
            self.transport.abort()  # its answers are lost with it; the request handlers waiting to send end

        def unsent(self):
            """Bytes of answers the client has not taken: the transport's, and those in the socket's send
            queue (Linux's SIOCOUTQ), which the socket frees only in large steps."""
            waiting = self.transport.get_write_buffer_size()
            try:
                queue = fcntl.ioctl(self.transport.get_extra_info("socket").fileno(), termios.TIOCOUTQ, b"\0" * 4)
            except (AttributeError, OSError):  # no such socket, or no such request where it runs
                return waiting
            return waiting + struct.unpack("i", queue)[0]

        def connection_lost(self, exc):
            for deadline in (self.head_deadline, self.send_deadline, self.body_deadline):
                if deadline is not None:
                    deadline.cancel()
            self.head_deadline = self.send_deadline = self.body_deadline = None
            if self.admitted:
                self.admitted = False
                limits.release(self.counted_as)
                metrics.connections_open.dec()
            super().connection_lost(exc)

    return GuardedProtocol
