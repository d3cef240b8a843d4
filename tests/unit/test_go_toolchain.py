"""scripts/go_toolchain.py offline: the module hash, the pins, and a forged zip refused.

Covers:
- the module hash (dirhash Hash1) does not depend on the order of a zip's entries and changes
  with a file's content or name;
- go.mod's ``go`` line is the minimum, and the pinned toolchain is at least that new, for
  both pinned platforms;
- a toolchain zip from the proxy whose hash is not the pin is refused: nothing is kept in
  the downloads directory and nothing is unpacked (a local HTTP server plays the proxy).

The real fetch, with ``go`` hidden from PATH, is tests/e2e/test_fresh_machine_go.py.
"""

from __future__ import annotations

import http.server
import importlib.util
import io
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "go_toolchain", REPO / "scripts" / "go_toolchain.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gt = _load()


def _zip(path: Path, files: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files:
            zf.writestr(name, data)
    return path


def test_module_hash_ignores_entry_order_and_sees_content_and_names(tmp_path: Path) -> None:
    a = [("m@v1/a.go", b"package a\n"), ("m@v1/b/b.go", b"package b\n")]
    h = gt.module_hash(_zip(tmp_path / "1.zip", a))
    assert h.startswith("h1:")
    assert gt.module_hash(_zip(tmp_path / "2.zip", a[::-1])) == h
    assert gt.module_hash(_zip(tmp_path / "3.zip", [a[0], ("m@v1/b/b.go", b"package c\n")])) != h
    assert gt.module_hash(_zip(tmp_path / "4.zip", [a[0], ("m@v1/b/c.go", b"package b\n")])) != h


def test_the_pinned_toolchain_is_new_enough_for_the_control_plane() -> None:
    need = gt.required_version()
    assert need >= (1, 25, 0)
    for plat in ("linux-amd64", "linux-arm64"):
        version, expected = gt.pinned(plat)
        assert version.startswith("v0.0.1-go") and version.endswith("." + plat)
        assert expected.startswith("h1:")
        assert gt.parse_version(version.split("-", 1)[1]) >= need


@pytest.fixture
def fake_proxy(tmp_path: Path) -> Iterator[str]:
    """A proxy that serves a forged zip for the pinned version of this platform."""
    version, _ = gt.pinned(gt.platform_name())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{gt.MODULE}@{version}/bin/go", b"#!/bin/sh\necho forged\n")
    body = buf.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == f"/{gt.MODULE}/@v/{version}.zip"
            self.send_response(200 if ok else 404)
            self.send_header("Content-Length", str(len(body) if ok else 0))
            self.end_headers()
            if ok:
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_zip_that_is_not_the_pinned_one_is_refused_and_nothing_is_kept(
    tmp_path: Path, fake_proxy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOPROXY", f"{fake_proxy},direct")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no go
    cache, downloads = tmp_path / "cache", tmp_path / "downloads"
    with pytest.raises(gt.ToolchainError, match="is not the pinned"):
        gt.resolve(cache, downloads)
    assert list(downloads.iterdir()) == []
    assert not any((cache / "go").glob("go1.*"))
