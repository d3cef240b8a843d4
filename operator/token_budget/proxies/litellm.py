"""The LiteLLM proxy's ``config.yaml`` as the model catalog implies it, merged into the user's.

The proxy and the budgets agree when (a) every model a Reroute can choose is one
the proxy can route, (b) the proxy runs the callback that enforces directives and
(c) the proxy's own metrics name each caller as the LiteLLM preset reads them.
So this module owns three parts of the config and nothing else:

* ``model_list``: one entry per catalog model. Equivalents are catalog models
  (the validating webhook and :func:`token_budget.api.rules.problems` refuse any
  other), so every Reroute target, a budget's named ``model`` or the engine's
  cheapest equivalent, has its route. Each entry's ``litellm_params`` come from
  :class:`Options`: a template per catalog ``provider`` (``*`` for any), else
  ``{model: <LiteLLM provider>/<name>}`` (LiteLLM then reads the provider's key
  from its usual variable, ``OPENAI_API_KEY`` and so on), plus an ``api_base``
  per provider (``--upstream openai=https://...``).
* ``litellm_settings``: :data:`CALLBACK` in ``callbacks``; with metrics, also
  LiteLLM's ``prometheus`` callback and :data:`METADATA_LABELS` in
  ``custom_prometheus_metadata_labels``, which LiteLLM turns into the metric
  labels of :data:`SOURCE` (``metadata.pod`` becomes ``metadata_pod``).
* ``environment_variables``: only the keys given (LiteLLM sets them in its
  process before it loads the callbacks, so the ConfigMap can carry the
  callback's ``TOKENBUDGET_*`` settings).

Ownership, so that merging is idempotent and never takes the user's work:

* a ``model_list`` entry is ours when its ``model_info`` carries
  :data:`MANAGED`; ours are rewritten on every merge, and dropped when their
  model left the catalog. Any other entry is the user's, kept as it is, and a
  model the user routes under its own name gets no entry of ours (two entries of
  one name would make LiteLLM balance between them);
* the two lists under ``litellm_settings`` gain what is missing, nothing is
  removed; ``environment_variables`` gains or changes only the keys given;
* every other key is the user's.

What it does not do: read or write files and ConfigMaps (``tokenbudget gateway
litellm`` does), keep YAML comments (the merged config is a mapping), or route
aliases (a Reroute always names a catalog model; agents asking for an alias need
the user's own entry or a wildcard).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from token_budget.api import v1alpha1 as api
from token_budget.policy.catalog import Catalog

#: The enforcing callback, as LiteLLM loads it (``module.instance``).
CALLBACK = "token_budget.litellm_callback.callback"
#: LiteLLM's own Prometheus metrics, which the LiteLLM preset reads.
METRICS_CALLBACK = "prometheus"
#: The request metadata that names the caller (what the callback reads), as LiteLLM's
#: ``custom_prometheus_metadata_labels`` spell them.
METADATA_LABELS = ("metadata.namespace", "metadata.pod")
#: The ``model_info`` key that marks an entry as ours (LiteLLM keeps unknown keys there).
MANAGED = "tokenbudget.io/managed"
#: Catalog providers whose LiteLLM provider prefix is another word.
ROUTES = {"google": "gemini"}
#: The provider key of a template or upstream that applies to every provider.
ANY = "*"
#: What the proxy's environment must or may set: name, required, what it is.
ENVIRONMENT: tuple[tuple[str, bool, str], ...] = (
    ("TOKENBUDGET_DIRECTIVE_BASE_URL", True,
     "the directive service: https://<operator Service>.<namespace>.svc"),
    ("TOKENBUDGET_DIRECTIVE_CA_FILE", False, "ca.crt of the operator's webhook Secret"),
    ("TOKENBUDGET_GATEWAY_TOKEN_FILE", False, "default: the pod's ServiceAccount token"),
    ("TOKENBUDGET_GATEWAY_REPLICAS", False, "proxy replicas sharing each caller's rate (1)"),
    ("TOKENBUDGET_GATEWAY_FAIL_CLOSED", False, "true: refuse (503) while the operator is away"),
    ("TOKENBUDGET_GATEWAY_IDENTITY", False, "metadata (default), pod-ip or checked"),
)


def metric_label(metadata_key: str) -> str:
    """The Prometheus label LiteLLM makes of a ``custom_prometheus_metadata_labels`` entry."""
    return metadata_key.replace(".", "_")


#: The spend source of budgets that read this proxy's metrics.
SOURCE = api.SpendSource(preset=api.Preset.LITELLM, labels=api.SourceLabels(
    namespace=metric_label(METADATA_LABELS[0]), workload=metric_label(METADATA_LABELS[1])))


class ConfigError(ValueError):
    """The existing config cannot be merged into (it is not a LiteLLM config mapping)."""


@dataclass(frozen=True)
class Options:
    """How catalog models become ``model_list`` entries, and what else to write.

    Attributes:
        params: catalog provider (or ``*``) to a ``litellm_params`` template;
            ``{name}`` and ``{provider}`` in its strings become the catalog
            model's name and provider.
        upstreams: catalog provider (or ``*``) to the ``api_base`` of its models.
        metrics: also LiteLLM's metrics, labelled as :data:`SOURCE` reads them.
        environment: ``environment_variables`` to set in the config.
    """

    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    upstreams: Mapping[str, str] = field(default_factory=dict)
    metrics: bool = True
    environment: Mapping[str, str] = field(default_factory=dict)


def litellm_params(model: api.CatalogModel, options: Options) -> dict[str, Any]:
    """The ``litellm_params`` of one catalog model's entry."""
    template = options.params.get(model.provider, options.params.get(ANY))
    if template is None:
        route = ROUTES.get(model.provider, model.provider)
        template = {"model": f"{route}/{{name}}" if route else "{name}"}
    params: dict[str, Any] = _fill(template, model)
    base = options.upstreams.get(model.provider, options.upstreams.get(ANY))
    if base is not None:
        params["api_base"] = base
    return params


def model_entries(catalog: Catalog, options: Options) -> list[dict[str, Any]]:
    """Our ``model_list`` entries: one per catalog model, in catalog order."""
    return [{"model_name": m.name, "litellm_params": litellm_params(m, options),
             "model_info": {MANAGED: True}} for m in catalog.models.values()]


def merge(config: Mapping[str, Any] | None, catalog: Catalog, options: Options
          ) -> dict[str, Any]:
    """``config`` (the user's, or None) with our parts as the catalog implies them.

    Idempotent: ``merge(merge(c)) == merge(c)``. The user's ``model_list``
    entries keep their order and come first; ours follow in catalog order.

    Raises:
        ConfigError: ``config`` or one of the parts we write into is not of
            the shape LiteLLM reads (a mapping, a list of mappings).
    """
    out = copy.deepcopy(dict(_mapping(config)))
    users = [e for e in _entries(out) if not _managed(e)]
    routed = {e.get("model_name") for e in users}
    out["model_list"] = users + [e for e in model_entries(catalog, options)
                                 if e["model_name"] not in routed]
    settings = _section(out, "litellm_settings")
    _include(settings, "callbacks", [CALLBACK, *([METRICS_CALLBACK] if options.metrics else [])])
    if options.metrics:
        _include(settings, "custom_prometheus_metadata_labels", list(METADATA_LABELS))
    if options.environment:
        _section(out, "environment_variables").update(options.environment)
    return out


def drift(config: Mapping[str, Any], catalog: Catalog, metrics: bool = True) -> list[str]:
    """Where a proxy's config and the budgets disagree, one sentence each; [] when they agree.

    A catalog model is routable when an entry names it or a wildcard entry
    (``*``, ``openai/*``) matches it; entries of any owner count. Not drift:
    ``litellm_params`` that differ from what :func:`merge` would write (the
    proxy still routes the model), entries for models outside the catalog.

    Raises:
        ConfigError: ``config`` is not a LiteLLM config mapping.
    """
    config = _mapping(config)
    routes = [str(e.get("model_name", "")) for e in _entries(dict(config))]
    rerouted_from: dict[str, list[str]] = {}
    for m in catalog.models.values():
        for e in m.equivalents:
            rerouted_from.setdefault(e, []).append(m.name)
    out = []
    for m in catalog.models.values():
        if any(_routes(r, m.name) for r in routes):
            continue
        why = (f"a Reroute of {', '.join(rerouted_from[m.name])} picks it"
               if m.name in rerouted_from else "a budget's Reroute may name it")
        out.append(f"model_list: must route the catalog model {m.name!r} ({why}); "
                   "no entry names it, so the proxy would refuse it")
    settings = config.get("litellm_settings")
    settings = settings if isinstance(settings, Mapping) else {}
    wanted = [("callbacks", CALLBACK, "the proxy enforces no directive")]
    if metrics:
        wanted += [("callbacks", METRICS_CALLBACK, "the proxy exports no spend to read")]
        wanted += [("custom_prometheus_metadata_labels", label,
                    f"its spend has no {metric_label(label)} label for budgets to read")
                   for label in METADATA_LABELS]
    for key, value, consequence in wanted:
        present = settings.get(key)
        if not isinstance(present, list) or value not in present:
            out.append(f"litellm_settings.{key}: must include {value!r}; without it "
                       f"{consequence}")
    return out


def missing_environment(config: Mapping[str, Any]) -> list[tuple[str, bool, str]]:
    """The :data:`ENVIRONMENT` variables the config's ``environment_variables`` do not set."""
    env = config.get("environment_variables")
    env = env if isinstance(env, Mapping) else {}
    return [item for item in ENVIRONMENT if item[0] not in env]


def _fill(value: Any, model: api.CatalogModel) -> Any:
    if isinstance(value, str):
        return value.replace("{name}", model.name).replace("{provider}", model.provider)
    if isinstance(value, Mapping):
        return {k: _fill(v, model) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, model) for v in value]
    return value


def _mapping(config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise ConfigError("the config must be a mapping")
    return config


def _entries(config: dict[str, Any]) -> list[dict[str, Any]]:
    entries = config.get("model_list")
    if entries is None:
        return []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError("model_list must be a list of mappings")
    return entries


def _managed(entry: Mapping[str, Any]) -> bool:
    info = entry.get("model_info")
    return isinstance(info, Mapping) and info.get(MANAGED) is True


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    section = config.get(key)
    if section is None:
        section = config[key] = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{key} must be a mapping")
    return section


def _include(settings: dict[str, Any], key: str, values: Sequence[str]) -> None:
    present = settings.get(key)
    if present is None:
        present = settings[key] = []
    if not isinstance(present, list):
        raise ConfigError(f"litellm_settings.{key} must be a list")
    present += [v for v in values if v not in present]


def _routes(route: str, model: str) -> bool:
    """Whether a ``model_name`` routes a model: equal, or a LiteLLM wildcard matching it."""
    if "*" not in route:
        return route == model
    return re.fullmatch(".*".join(map(re.escape, route.split("*"))), model) is not None
