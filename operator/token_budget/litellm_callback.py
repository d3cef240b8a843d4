"""The LiteLLM proxy callback: token budget directives enforced per request.

Add to the proxy's config (the operator's package importable by the proxy, e.g.
``pip install token-budget-operator`` in its image, or on ``PYTHONPATH``)::

    litellm_settings:
      callbacks: ["token_budget.litellm_callback.callback"]
      custom_prometheus_metadata_labels: ["metadata.namespace", "metadata.pod"]

and have agents name themselves in each request's metadata (the operator's
webhook injects both variables into governed pods)::

    {"model": "gpt-4o", "messages": [...],
     "metadata": {"namespace": "$TOKENBUDGET_POD_NAMESPACE", "pod": "$TOKENBUDGET_POD_NAME"}}

What it does per request is :mod:`token_budget.gateway`'s: 429 when Blocked or
throttled, the model rewritten on Reroute, 403 for a model outside
``allowed-models``; the tokens each call used are settled after it.

Configured from the proxy's environment when this module is imported:

* ``TOKENBUDGET_DIRECTIVE_BASE_URL``: the directive service (required), e.g.
  ``https://token-budget-operator.tokenbudget.svc``;
* ``TOKENBUDGET_GATEWAY_TOKEN_FILE``: the proxy's ServiceAccount token (default
  the mounted one); its ServiceAccount must be in the operator's
  ``--directive-readers``;
* ``TOKENBUDGET_DIRECTIVE_CA_FILE``: the CA of the operator's certificate;
* ``TOKENBUDGET_GATEWAY_REPLICAS``: proxy replicas sharing each pod's rate (1);
* ``TOKENBUDGET_GATEWAY_FAIL_CLOSED``: ``true`` refuses requests (503) while the
  operator does not answer (default: they pass).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from litellm.integrations.custom_logger import CustomLogger

from token_budget import gateway
from token_budget.agent import TOKEN_FILE


class TokenBudgetCallback(CustomLogger):  # type: ignore[misc]
    """A LiteLLM ``CustomLogger`` whose pre-call hook enforces the caller's directive."""

    def __init__(self, enforcer: gateway.Enforcer) -> None:
        super().__init__()
        self.enforcer = enforcer

    @classmethod
    def from_env(cls) -> TokenBudgetCallback:
        env = os.environ
        token_file = env.get("TOKENBUDGET_GATEWAY_TOKEN_FILE", TOKEN_FILE)
        ca_file = env.get("TOKENBUDGET_DIRECTIVE_CA_FILE")
        return cls(gateway.Enforcer(
            env.get("TOKENBUDGET_DIRECTIVE_BASE_URL", ""),
            lambda: Path(token_file).read_text().strip(),
            Path(ca_file).read_text() if ca_file else None,
            replicas=int(env.get("TOKENBUDGET_GATEWAY_REPLICAS", "1")),
            fail_closed=env.get("TOKENBUDGET_GATEWAY_FAIL_CLOSED", "").lower() == "true"))

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict[str, Any],
                                  call_type: Any) -> dict[str, Any]:
        model = str(data.get("model") or "")
        try:
            data["model"] = await self.enforcer.admit(data.get("metadata"), model)
        except gateway.Refusal as refusal:
            headers = {"Retry-After": str(max(1, round(refusal.retry_after)))} \
                if refusal.retry_after is not None else None
            raise HTTPException(status_code=refusal.status, detail=refusal.message,
                                headers=headers) from None
        return data

    async def async_log_success_event(self, kwargs: dict[str, Any], response_obj: Any,
                                      start_time: Any, end_time: Any) -> None:
        usage = getattr(response_obj, "usage", None)
        tokens = int(getattr(usage, "total_tokens", 0) or 0)
        metadata = (kwargs.get("litellm_params") or {}).get("metadata")
        self.enforcer.spent(metadata, tokens)


callback = TokenBudgetCallback.from_env()
