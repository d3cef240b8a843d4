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

With ``TOKENBUDGET_GATEWAY_IDENTITY=pod-ip`` agents send nothing: the proxy
judges each request as the governed pod holding its client IP, and writes that
pod into the request's metadata (so the labels above name it, whatever the
agent sent). With ``checked`` agents send their metadata as above, and a
request naming a pod that does not hold its client IP is refused with 403.

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
  operator does not answer (default: they pass);
* ``TOKENBUDGET_GATEWAY_IDENTITY``: ``metadata`` (default), ``pod-ip`` or
  ``checked`` (:class:`token_budget.gateway.IdentityMode`). The IP modes refuse
  every request (500) while the proxy's ``general_settings.use_x_forwarded_for``
  is on: the address would then be a header the caller writes.
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
            fail_closed=env.get("TOKENBUDGET_GATEWAY_FAIL_CLOSED", "").lower() == "true",
            identity=_identity(env.get("TOKENBUDGET_GATEWAY_IDENTITY", "metadata"))))

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict[str, Any],
                                  call_type: Any) -> dict[str, Any]:
        model = str(data.get("model") or "")
        by_ip = self.enforcer.identity is not gateway.IdentityMode.METADATA
        try:
            gateway.check_forwarding(self.enforcer.identity, _general_settings())
            admitted = await self.enforcer.judge(data.get("metadata"), model,
                                                 gateway.client_ip_of(data))
            data["model"] = admitted.model
            if by_ip:
                gateway.stamp_request(data, admitted.caller)
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


def _identity(text: str) -> gateway.IdentityMode:
    try:
        return gateway.IdentityMode(text.strip().lower())
    except ValueError:
        raise ValueError(f"TOKENBUDGET_GATEWAY_IDENTITY must be one of "
                         f"{', '.join(m.value for m in gateway.IdentityMode)}, not {text!r}"
                         ) from None


def _general_settings() -> dict[str, Any]:
    """The running proxy's ``general_settings`` (a module global it rebinds on load)."""
    from litellm.proxy import proxy_server  # loaded by then: the proxy imported us

    settings = getattr(proxy_server, "general_settings", None)
    return settings if isinstance(settings, dict) else {}


callback = TokenBudgetCallback.from_env()
