"""The API client's transport asks a request again after a broken connection only if it
reads: a write (a Lease renewal, a patch) is sent once, never late.

A real HTTP server on loopback, reached through ``kube.api_client`` from a kubeconfig: its
first connection reads the request and closes without an answer (a partition, a proxy
that dropped it), the next ones answer.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from token_budget.kube import LEASES, Kube, api_client


class DropsFirst:
    """Answers ``{}`` to every request but the first, whose connection it closes unanswered."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(rest) < length:
                rest += conn.recv(65536)
            self.requests.append(head.split(b" ")[0].decode())
            if len(self.requests) == 1:
                return  # read, never answered: the connection closes
            body = json.dumps({}).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Connection: close\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\n\r\n" + body)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Kube, DropsFirst]]:
    srv = DropsFirst()
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "t",
              "clusters": [{"name": "t", "cluster": {"server": f"http://127.0.0.1:{srv.port}"}}],
              "users": [{"name": "t", "user": {"token": "x"}}],
              "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod
    yield Kube(api_client(str(path))), srv
    srv.close()


def test_a_read_is_asked_again_on_a_new_connection(server: tuple[Kube, DropsFirst]) -> None:
    kube, srv = server
    assert kube.request("GET", LEASES.path("default", "l"), timeout=5) == {}
    assert srv.requests == ["GET", "GET"]


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "POST"])
def test_a_write_is_sent_once_and_fails(server: tuple[Kube, DropsFirst], method: str) -> None:
    kube, srv = server
    with pytest.raises(Exception):  # noqa: B017 - the transport's own error, whichever
        kube.request(method, LEASES.path("default", "l"), body={"spec": {}}, timeout=5)
    assert srv.requests == [method], "not sent again: it may have been applied, or be late"
