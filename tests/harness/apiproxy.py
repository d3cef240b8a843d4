"""A proxy in front of the API server that a test can cut: a partitioned client.

The client speaks plain HTTP to the proxy (its kubeconfig has no credentials);
the proxy forwards each connection over TLS to the API server as the admin
(the control plane's client certificate). In between it reads the requests
(method and path of each, with the time it was forwarded), so a test can tell
exactly which writes of the client reached the API server and when.

:meth:`ApiProxy.cut` partitions the client: connections already open stall
(nothing more is forwarded either way, what was sent is dropped) and new ones
are accepted and never answered, so the client's calls hang until their own
timeouts, the worst case for a leader. :meth:`ApiProxy.heal` closes the
stalled connections and forwards new ones again. Nothing that was sent during
the cut is delivered later.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlparse

WRITES = ("POST", "PUT", "PATCH", "DELETE")


@dataclass(frozen=True)
class Request:
    at: float  # monotonic seconds when it was forwarded
    method: str
    path: str

    @property
    def write(self) -> bool:
        return self.method in WRITES


class ApiProxy:
    """Plain HTTP on 127.0.0.1 in front of ``server`` (``https://host:port``)."""

    def __init__(self, server: str, ssl_context: ssl.SSLContext) -> None:
        url = urlparse(server)
        self._upstream = (url.hostname or "127.0.0.1", url.port or 443)
        self._ssl = ssl_context
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._cut = threading.Event()
        self._open: list[socket.socket] = []  # accepted during a cut, never served
        self._live: set[socket.socket] = set()  # clients of running relays
        self._heals = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="apiproxy").start()

    def kubeconfig(self) -> str:
        """A kubeconfig for a client of this proxy (no credentials: the proxy has them)."""
        return (f"apiVersion: v1\nkind: Config\ncurrent-context: proxy\n"
                f"clusters: [{{name: proxy, cluster: {{server: '{self.url}'}}}}]\n"
                f"users: [{{name: proxy, user: {{}}}}]\n"
                f"contexts: [{{name: proxy, context: {{cluster: proxy, user: proxy}}}}]\n")

    def cut(self) -> None:
        """Partition the client: forward nothing any more, answer nothing."""
        self._cut.set()

    def heal(self) -> None:
        """Close what stalled during the cut; forward new connections again."""
        with self._lock:
            unserved, self._open = self._open, []
            self._heals += 1  # each relay closes its own sockets (see _relay)
            self._cut.clear()
            live = list(self._live)
        for s in unserved:
            with contextlib.suppress(OSError):
                s.close()
        for s in live:  # wakes each relay at once; shutdown of a plain socket is thread-safe
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def writes_since(self, t: float) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.write and r.at >= t]

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.heal()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:  # checked and kept together: heal() swaps both under the lock
            if self._cut.is_set():
                self._open.append(client)  # accepted, never answered: closed at heal()
                return
            self._live.add(client)
            born = self._heals
        try:
            raw = socket.create_connection(self._upstream, timeout=10)
            upstream = self._ssl.wrap_socket(raw, server_hostname=self._upstream[0])
            upstream.settimeout(None)
        except OSError:
            with self._lock:
                self._live.discard(client)
            client.close()
            return
        try:
            self._relay(client, upstream, born)
        finally:
            with self._lock:
                self._live.discard(client)
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.close()

    def _relay(self, client: socket.socket, upstream: ssl.SSLSocket, born: int) -> None:
        """Copy both ways until either side closes; parse requests on the way up.

        One thread owns both sockets: an SSL object read in one thread while another
        writes it or closes it (as two pumps did) crashed the interpreter (SIGSEGV in
        ``SSLSocket.send`` during a cut, tests/e2e/test_watch_store.py)."""
        pending = b""
        stalled = False
        while not self._closed:
            if self._heals != born:
                return  # heal() closes what was open, stalled or not: nothing sent later
            # Decrypted bytes already buffered in the SSL object are not seen by select.
            ready = [upstream] if upstream.pending() else \
                select.select([client, upstream], [], [], 0.2)[0]
            for src in ready:
                try:
                    data = self._recv(src)
                except OSError:
                    return
                if data is None:
                    continue  # TLS bytes that held no application data (a session ticket)
                if not data:
                    return
                # A heal since this connection opened: nothing more goes through it (the
                # cut is read first, so data of a cut that heals meanwhile is dropped too).
                stalled = stalled or self._cut.is_set() or self._heals != born
                if stalled:
                    continue  # read and dropped; the relay ends at the next heal() check
                try:
                    if src is client:
                        pending = self._parse(pending + data)
                        upstream.sendall(data)
                    else:
                        client.sendall(data)
                except OSError:
                    return

    @staticmethod
    def _recv(src: socket.socket) -> bytes | None:
        """Read what is there without waiting; None when the TLS layer had nothing for us.

        A readable TLS socket may hold only a record that is not application data (the
        server's session tickets after the handshake): a blocking read would then wait for
        the response to a request this thread has not forwarded yet, and hang the relay.
        """
        if not isinstance(src, ssl.SSLSocket):
            return src.recv(65536)
        src.settimeout(0.0)
        try:
            return src.recv(65536)
        except ssl.SSLWantReadError:
            return None
        finally:
            src.settimeout(None)

    def _parse(self, buf: bytes) -> bytes:
        """Record each complete request head in ``buf``; return what is left to read.

        Requests of the kubernetes client carry a Content-Length, never chunked bodies.
        """
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return buf
            head = buf[:end].decode("latin-1").split("\r\n")
            method, path = (head[0].split(" ") + ["", ""])[:2]
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(buf) < end + 4 + length:
                return buf
            with self._lock:
                self.requests.append(Request(time.monotonic(), method, path))
            buf = buf[end + 4 + length:]
