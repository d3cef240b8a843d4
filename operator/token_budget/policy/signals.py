"""Which pods show that they call an LLM: the signals that enrol a workload.

In a namespace under mandatory enrolment the mutating webhook labels a new pod
or workload that shows one of these signals (issue 19). A signal is an entry
of an admin-extendable list:

* ``NAME`` or ``env:NAME``: an environment variable of a container or init
  container, by its name or, for ``valueFrom.secretKeyRef`` /
  ``configMapKeyRef``, by the key it reads (a key ``OPENAI_API_KEY`` in a
  Secret mounted as ``KEY`` counts);
* ``annotation:KEY``: an annotation of the pod (template).

``NAME`` and ``KEY`` are globs (``LITELLM_*``, matched case-sensitively, as
Kubernetes compares names). What the webhook cannot see, it does not guess: a
variable that comes whole from ``envFrom`` (a Secret or ConfigMap the webhook
does not read), a key read from a mounted file, a URL in the command line.
Signals are a convenience that puts the pod-level checks on most agents, not a
fence: the fence is the namespace's mandatory enrolment itself (every workload
there is governed by listing, whatever its labels).

Pure: strings and dicts in, values out.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from token_budget.policy.workloads import MODEL_ANNOTATION

ANNOTATION = "annotation:"

#: What counts when the admin says nothing more (``enrolment_signals_extra`` adds to it).
#: The model variables the operator reads (``--model-env``) count as well.
DEFAULT = (
    ANNOTATION + MODEL_ANNOTATION,
    # provider keys
    "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "AZURE_OPENAI_API_KEY", "GEMINI_API_KEY",
    "GOOGLE_API_KEY", "MISTRAL_API_KEY", "COHERE_API_KEY", "CO_API_KEY", "GROQ_API_KEY",
    # Bedrock: its API key, and the switches of the Anthropic clients that call it (the
    # plain AWS credentials are left out: they enrol every pod that reads S3)
    "AWS_BEARER_TOKEN_BEDROCK", "CLAUDE_CODE_USE_BEDROCK", "ANTHROPIC_BEDROCK_BASE_URL",
    # gateway and endpoint URLs
    "OPENAI_BASE_URL", "OPENAI_API_BASE", "AZURE_OPENAI_ENDPOINT", "ANTHROPIC_BASE_URL",
    "LITELLM_*",
)


def _matcher(patterns: Iterable[str]) -> re.Pattern[str] | None:
    found = list(dict.fromkeys(patterns))
    if not found:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in found))


@dataclass(frozen=True)
class Signals:
    """Compiled signals: env name globs and annotation key globs."""

    env: tuple[str, ...] = ()
    annotations: tuple[str, ...] = ()
    _env: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    _annotations: re.Pattern[str] | None = field(default=None, init=False, repr=False,
                                                 compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_env", _matcher(self.env))
        object.__setattr__(self, "_annotations", _matcher(self.annotations))

    @classmethod
    def parse(cls, entries: Iterable[str], model_env: Iterable[str] = ()) -> Signals:
        """Signals from list entries (see the module), plus the model variables.

        Raises:
            ValueError: an entry is empty or has a prefix other than ``env:``
                or ``annotation:`` (a typo would otherwise never match).
        """
        found: dict[str, list[str]] = {"env": [*model_env], "annotation": []}
        for raw in entries:
            kind, sep, name = raw.strip().partition(":")
            if not sep:
                kind, name = "env", kind
            if kind not in found or not name:
                raise ValueError(f"enrolment signal {raw!r} must be NAME, env:NAME or "
                                 "annotation:KEY")
            found[kind].append(name)
        env, annotations = found["env"], found["annotation"]
        return cls(tuple(dict.fromkeys(env)), tuple(dict.fromkeys(annotations)))

    def shown(self, pod: Mapping[str, Any]) -> str | None:
        """The first signal ``pod`` (a pod or a pod template) shows, in words; None if none.

        Annotations first, then each container's variables in order.
        """
        if self._annotations is not None:
            annotations = (pod.get("metadata") or {}).get("annotations") or {}
            for key in annotations:
                if self._annotations.fullmatch(str(key)):
                    return f"annotation {key}"
        if self._env is not None:
            for container, name in _env_names(pod):
                if self._env.fullmatch(name):
                    return f"variable {name} of container {container}"
        return None


def _env_names(pod: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(container, name) of every variable the pod spec names, and the keys it reads."""
    spec = pod.get("spec") or {}
    for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        if not isinstance(c, Mapping):
            continue
        for env in c.get("env") or []:
            if not isinstance(env, Mapping):
                continue
            if env.get("name"):
                yield str(c.get("name")), str(env["name"])
            source = env.get("valueFrom") or {}
            for ref in ("secretKeyRef", "configMapKeyRef"):
                key = (source.get(ref) or {}).get("key") if isinstance(source, Mapping) else None
                if key:
                    yield str(c.get("name")), str(key)
