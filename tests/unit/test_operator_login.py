"""kopf's credentials come on an HTTP session with a bounded connection pool.

Covers the ``login`` handler of :mod:`token_budget.handlers.operator`: the identity is
the kubeconfig's (server, bearer token), and the session kopf gets may open at most
``KOPF_CONNECTIONS`` connections at once (kopf's own has no limit: on first sight of
1,000 budgets it opened one TLS connection per finalizer patch). No cluster: the
session is built, inspected and closed without a request.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from token_budget.handlers import operator

SERVER = "https://127.0.0.1:6443"


def _kubeconfig(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": SERVER,
                                                  "insecure-skip-tls-verify": True}}],
        "users": [{"name": "test", "user": {"token": "secret-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test",
                                                  "namespace": "agents"}}],
    }))
    return path


def test_kopf_logs_in_as_the_kubeconfig_on_a_bounded_pool(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path / "config")))

    async def login() -> None:
        handler: Any = operator.login  # kopf's decorator types it for kopf's own call
        ctx = await handler(logger=logging.getLogger("test"), settings=kopf.OperatorSettings())
        assert isinstance(ctx, kopf.AiohttpSession)
        try:
            assert ctx.server == SERVER
            assert ctx.default_namespace == "agents"
            assert ctx.aiohttp_session.headers["Authorization"] == "Bearer secret-token"
            assert ctx.aiohttp_session.connector is not None
            assert ctx.aiohttp_session.connector.limit == operator.KOPF_CONNECTIONS
        finally:
            await ctx.aiohttp_session.close()

    asyncio.run(login())
