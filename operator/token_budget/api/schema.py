"""The API server's half of the verdict, offline: what a create is refused for before any webhook.

``tokenbudget validate`` must say what the cluster says. The cluster's verdict
on a create of one of our objects is, in order:

1. ``kubectl`` finds the kind: ``apiVersion`` and ``kind`` must name a served
   kind (else "no matches for kind");
2. strict field validation: unknown fields anywhere, ``metadata`` included
   (system fields such as ``resourceVersion`` are accepted: a create ignores them);
3. the object-metadata rules every API object obeys (name a DNS-1123
   subdomain, label and annotation syntax);
4. the CRD's structural schema, after the API server drops nulls and applies
   defaults: types (strict: ``"75"`` is not an integer), int64 bounds,
   formats, patterns, lengths, bounds, enums, required fields, and the CEL
   rules (evaluated through their Python twins, :mod:`token_budget.api.cel`);
5. the validating webhook (:mod:`token_budget.api.rules`, not here).

:func:`check` does 1-4 from the same source the cluster uses: the schema
generated from the models (:func:`token_budget.api.crds.crd`). Each
:class:`~token_budget.api.rules.Problem` names the path to the leaf that is
wrong and says what is allowed, with the field's own description where the
rule alone would not tell a reader what to write.

Patterns are matched with RE2, the engine the API server's Go regexp
implements, so ``$`` does not match before a trailing newline as Python's does.

Deliberately not here: the webhook's rules, reading files, anything about
``status`` (the API server resets it on create).
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import re2

from token_budget.api import cel, crds
from token_budget.api import v1alpha1 as api
from token_budget.api.rules import Problem
from token_budget.api.types import MONEY_PATTERN, WINDOW_PATTERN

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# What a pattern means, in words, when its field's description does not say it.
_PATTERN_WORDS = {
    MONEY_PATTERN: 'a decimal string such as "12.50" (up to 12 digits, 9 decimals)',
    WINDOW_PATTERN: "a rolling duration such as 30m, 24h, 7d or one of Day, Week, Month",
    r"^[a-zA-Z_][a-zA-Z0-9_]*$": "a Prometheus label name (letters, digits, _)",
    r"^[a-zA-Z_:][a-zA-Z0-9_:]*$": "a Prometheus metric name (letters, digits, _ and :)",
}

_META_FIELDS = {
    "name": str, "generateName": str, "namespace": str, "selfLink": str, "uid": str,
    "resourceVersion": str, "generation": int, "creationTimestamp": str,
    "deletionTimestamp": str, "deletionGracePeriodSeconds": int, "labels": dict,
    "annotations": dict, "ownerReferences": list, "finalizers": list, "managedFields": list,
}
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_ANNOTATIONS_MAX_BYTES = 256 * 1024
_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
# kube-openapi's strfmt.IsDateTime: the date, a "t", then this (the "." is any character).
_TIME = re.compile(r"^([0-9]{2}):([0-9]{2}):([0-9]{2})(.[0-9]+)?(z|([+-][0-9]{2}:[0-9]{2}))$")


@dataclass(frozen=True)
class Kind:
    """A kind this API serves: its name, plural, scope and the schema of its objects."""

    kind: str
    plural: str
    namespaced: bool
    schema: dict[str, Any] = field(repr=False, compare=False)


@functools.cache
def kinds() -> dict[str, Kind]:
    """The served kinds, by name, with the schemas of the CRDs generated from the models."""
    out = {}
    for body in crds.all_crds().values():
        spec = body["spec"]
        version = next(v for v in spec["versions"] if v["name"] == api.VERSION)
        out[spec["names"]["kind"]] = Kind(spec["names"]["kind"], spec["names"]["plural"],
                                          spec["scope"] == "Namespaced",
                                          version["schema"]["openAPIV3Schema"])
    return out


def ours(body: Mapping[str, Any]) -> bool:
    """Whether a manifest is meant for this API (a misspelt group or a bare kind included).

    ``tokenbudgets.io/v1alpha1`` or a ``TokenBudget`` without ``apiVersion`` are
    ours and wrong; a Deployment is someone else's and not checked.
    """
    version = body.get("apiVersion")
    group = version.split("/")[0] if isinstance(version, str) and "/" in version else ""
    return "tokenbudget" in group.lower() or body.get("kind") in kinds()


@dataclass(frozen=True)
class Checked:
    """What :func:`check` found, and the object as the webhook would receive it."""

    problems: list[Problem]
    body: dict[str, Any]  # nulls dropped and defaults applied, as the API server stores it
    kind: Kind | None


def check(body: Mapping[str, Any]) -> Checked:
    """The API server's verdict on creating ``body``, before the webhooks.

    Args:
        body: one manifest, as parsed from YAML or JSON.

    Returns:
        The problems (empty when the API server would pass it on to the
        webhooks), the defaulted object and the kind it resolved to.
    """
    obj = copy.deepcopy(dict(body))
    found = _kind_problems(obj)
    if found:
        return Checked(found, obj, None)
    kind = kinds()[obj["kind"]]
    found += [Problem(k, "must not be set: an API object has only apiVersion, kind, metadata, "
                         "spec and status (check its spelling and indentation)")
              for k in obj if k not in ("apiVersion", "kind", "metadata", "spec", "status")]
    found += _metadata_problems(obj.get("metadata"), kind)
    obj.pop("status", None)
    root = {k: v for k, v in kind.schema.items() if k != "properties"}
    root["properties"] = {"spec": kind.schema["properties"]["spec"]}
    root["required"] = ["spec"]
    target = {k: v for k, v in obj.items() if k == "spec"}
    _prune_nulls(target, root)
    _default(target, root)
    found += _validate(target, root, "")
    if "spec" in target:
        obj["spec"] = target["spec"]
    return Checked(found, obj, kind)


# ---------------------------------------------------------------------------
# 1. the kind
# ---------------------------------------------------------------------------


def _kind_problems(obj: Mapping[str, Any]) -> list[Problem]:
    served = ", ".join(kinds())
    version, kind = obj.get("apiVersion"), obj.get("kind")
    out = []
    if not isinstance(version, str) or not version:
        out.append(Problem("apiVersion", f"must be set to {api.API_VERSION}"))
    if not isinstance(kind, str) or not kind:
        out.append(Problem("kind", f"must be set to one of {served}"))
    if out:
        return out
    if kind not in kinds():
        return [Problem("kind", f"must be one of {served}: no API serves kind {kind!r} "
                                f"in {version} (kubectl says \"no matches for kind\")")]
    if version != api.API_VERSION:
        return [Problem("apiVersion", f"must be {api.API_VERSION}: no API serves kind {kind} "
                                      f"in {version!r} (kubectl says \"no matches for kind\")")]
    return []


# ---------------------------------------------------------------------------
# 2-3. metadata
# ---------------------------------------------------------------------------


def _metadata_problems(meta: Any, kind: Kind) -> list[Problem]:
    if meta is None:
        return [Problem("metadata.name", "must be set: every object needs a name")]
    if not isinstance(meta, Mapping):
        return [Problem("metadata", f"must be an object, not {_what(meta)}")]
    out = []
    typed: dict[str, Any] = {}
    for key, value in meta.items():
        want = _META_FIELDS.get(key)
        if want is None:
            out.append(Problem(f"metadata.{key}", "must not be set: object metadata has no "
                                                  "such field (check its spelling)"))
        elif value is not None and (not isinstance(value, want) or isinstance(value, bool)):
            out.append(Problem(f"metadata.{key}",
                               f"must be {_TYPE_WORDS[want]}, not {_what(value)}"))
        else:
            typed[key] = value
    meta = typed
    name, generate = meta.get("name"), meta.get("generateName")
    if not name and not generate:
        out.append(Problem("metadata.name", "must be set: every object needs a name"))
    elif name:
        out += _dns_subdomain("metadata.name", name)
    else:
        out += _dns_subdomain("metadata.generateName", str(generate).rstrip("-") or "a")
    namespace = meta.get("namespace")
    if kind.namespaced and namespace and not (len(namespace) <= 63
                                              and _DNS1123_LABEL.match(namespace)):
        out.append(Problem("metadata.namespace",
                           "must be a namespace name: at most 63 lowercase letters, digits "
                           f"and '-', starting and ending with a letter or digit, not "
                           f"{namespace!r}"))
    if (meta.get("generation") or 0) < 0:
        out.append(Problem("metadata.generation", "must be greater than or equal to 0"))
    for key, value in (meta.get("labels") or {}).items():
        path = f"metadata.labels[{json.dumps(key)}]"
        out += _qualified_name(path, key)
        if not isinstance(value, str):
            out.append(Problem(path, f"must be a string, not {_what(value)} (quote it)"))
        elif len(value) > 63 or not _LABEL_VALUE.match(value):
            out.append(Problem(path, "must be a label value: at most 63 letters, digits, "
                                     "'-', '_' and '.', starting and ending with a letter or "
                                     f"digit, not {value!r}"))
    size = 0
    for key, value in (meta.get("annotations") or {}).items():
        path = f"metadata.annotations[{json.dumps(key)}]"
        out += _qualified_name(path, key)
        if not isinstance(value, str):
            out.append(Problem(path, f"must be a string, not {_what(value)} (quote it)"))
        else:
            size += len(str(key)) + len(value.encode())
    if size > _ANNOTATIONS_MAX_BYTES:
        out.append(Problem("metadata.annotations", "must be at most 256 KiB in total"))
    for i, fin in enumerate(meta.get("finalizers") or ()):
        if not isinstance(fin, str):
            out.append(Problem(f"metadata.finalizers[{i}]", f"must be a string, not {_what(fin)}"))
        else:
            out += _qualified_name(f"metadata.finalizers[{i}]", fin)
    return out


def _dns_subdomain(path: str, name: str) -> list[Problem]:
    if len(name) <= 253 and _DNS1123_SUBDOMAIN.match(name):
        return []
    return [Problem(path, "must be a DNS-1123 subdomain: at most 253 lowercase letters, "
                          "digits, '-' and '.', starting and ending with a letter or digit, "
                          f"not {name!r}")]


def _qualified_name(path: str, key: Any) -> list[Problem]:
    """A label or annotation key: an optional DNS-subdomain prefix and '/', then a name."""
    if not isinstance(key, str):
        return [Problem(path, f"must have a string key, not {_what(key)}")]
    prefix, _, name = key.rpartition("/")
    ok = 0 < len(name) <= 63 and bool(_QUALIFIED_NAME.match(name))
    if "/" in key:
        ok = ok and len(prefix) <= 253 and bool(_DNS1123_SUBDOMAIN.match(prefix))
    if ok:
        return []
    return [Problem(path, "must have a key of at most 63 letters, digits, '-', '_' and '.', "
                          "starting and ending with a letter or digit, optionally after a "
                          f"DNS subdomain and '/' (example.com/team), not {key!r}")]


# ---------------------------------------------------------------------------
# 4. the structural schema
# ---------------------------------------------------------------------------


def _child(schema: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    props = schema.get("properties") or {}
    if key in props:
        found: Mapping[str, Any] = props[key]
        return found
    extra = schema.get("additionalProperties")
    return extra if isinstance(extra, Mapping) else None


def _prune_nulls(value: Any, schema: Mapping[str, Any] | None) -> None:
    """Drop null members that are not nullable and have no default (the API server does)."""
    if schema is None:
        return
    if isinstance(value, dict):
        for key in list(value):
            sub = _child(schema, key)
            if value[key] is None and sub is not None and not sub.get("nullable") \
                    and "default" not in sub:
                del value[key]
            else:
                _prune_nulls(value[key], sub)
    elif isinstance(value, list):
        for item in value:
            _prune_nulls(item, schema.get("items"))


def _default(value: Any, schema: Mapping[str, Any] | None) -> None:
    """Apply the schema's defaults to missing (or null) members, as the API server does."""
    if schema is None:
        return
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if "default" in sub and (key not in value or value[key] is None):
                value[key] = copy.deepcopy(sub["default"])
        for key in value:
            _default(value[key], _child(schema, key))
    elif isinstance(value, list):
        for item in value:
            _default(item, schema.get("items"))


_TYPE_WORDS: dict[Any, str] = {
    "object": "an object", "array": "a list", "string": "a string", "integer": "an integer",
    "number": "a number", "boolean": "true or false",
    str: "a string", int: "an integer", dict: "an object (a map)", list: "a list",
}


def _what(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {json.dumps(value)}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__} ({value})"


def _type_ok(value: Any, type_: str) -> bool:
    if type_ == "object":
        return isinstance(value, dict)
    if type_ == "array":
        return isinstance(value, list)
    if type_ == "string":
        return isinstance(value, str)
    if type_ == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if type_ == "integer":
        # kube-openapi's schema check takes 5.0 for an integer, but a CEL rule that reads
        # it fails ("expected int, got float64"), and every integer of a budget sits under
        # one (the differential test found it): refused everywhere, "write 5".
        return isinstance(value, int)
    if type_ == "number":
        return isinstance(value, int | float)
    return True


def _about(schema: Mapping[str, Any]) -> str:
    """' (description)' to append when a message alone does not say what to write."""
    text = str(schema.get("description") or "").strip()
    return f" ({text.rstrip('.')})" if text else ""


def _hint(type_: str, value: Any) -> str:
    if type_ in ("integer", "number") and isinstance(value, str):
        return ": write the number without quotes"
    if type_ == "integer" and isinstance(value, float) and value.is_integer():
        return f": write {int(value)}"
    if type_ == "string" and isinstance(value, int | float) and not isinstance(value, bool):
        return ": put it in quotes"
    return ""


def _validate(value: Any, schema: Mapping[str, Any], path: str) -> list[Problem]:
    type_ = schema.get("type")
    where = path or "(object)"
    if value is None and not schema.get("nullable"):
        return [Problem(where, f"must be {_TYPE_WORDS.get(type_, 'set')}, not null")]
    if type_ and not _type_ok(value, type_):
        words = _PATTERN_WORDS.get(schema.get("pattern", ""))
        if words:  # money, windows, names: say the form, which "a string" would not
            return [Problem(where, f"must be {words}, not {_what(value)}"
                                   f"{_hint(type_, value)}")]
        return [Problem(where, f"must be {_TYPE_WORDS[type_]}, not {_what(value)}"
                               f"{_hint(type_, value)}{_about(schema)}")]
    out: list[Problem] = []
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(str(v) for v in schema["enum"])
        out.append(Problem(where, f"must be one of {allowed}, not {_what(value)}"))
    if isinstance(value, str):
        out += _string_problems(value, schema, where)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
            out.append(Problem(where, f"must be at most {INT64_MAX} (a 64-bit integer), "
                                      f"not {value}"))
        if "minimum" in schema and value < schema["minimum"]:
            out.append(Problem(where, f"must be greater than or equal to {schema['minimum']}, "
                                      f"not {value}"))
        if "maximum" in schema and value > schema["maximum"]:
            out.append(Problem(where, f"must be less than or equal to {schema['maximum']}, "
                                      f"not {value}"))
    elif isinstance(value, list):
        out += _list_problems(value, schema, path)
    elif isinstance(value, dict):
        out += _object_problems(value, schema, path)
    if out:
        return out  # CEL rules see only values the schema passed (and would only repeat it)
    for entry in schema.get("x-kubernetes-validations") or ():
        rule = cel.RULES.get(entry["rule"])
        if rule is None:
            raise LookupError(f"the CEL rule {entry['rule']!r} has no Python twin in "
                              "token_budget.api.cel.RULES")
        if not rule.holds(value):
            at = path + (entry.get("fieldPath") or "")
            out.append(Problem(at or "(object)", _cel_message(entry["message"])))
    return out


def _cel_message(message: str) -> str:
    # CEL messages name the field first ("cost must be ..."); the path already names it.
    first, _, rest = message.partition(" ")
    return rest if rest.startswith("must ") and first[:1].islower() else message


def _size_problems(size: int, schema: Mapping[str, Any], where: str, keyword: str,
                   unit: str) -> list[Problem]:
    """minLength/maxLength (keyword "Length") or minItems/maxItems ("Items")."""
    low, high = schema.get(f"min{keyword}"), schema.get(f"max{keyword}")
    if low is not None and size < low:
        return [Problem(where, f"must have at least {low} {unit}{_about(schema)}")]
    if high is not None and size > high:
        return [Problem(where, f"must have at most {high} {unit}, not {size}")]
    return []


def _string_problems(value: str, schema: Mapping[str, Any], where: str) -> list[Problem]:
    out = _size_problems(len(value), schema, where, "Length", "character(s)")
    pattern = schema.get("pattern")
    if pattern and _compiled(pattern).search(value) is None:
        words = _PATTERN_WORDS.get(pattern)
        allowed = words if words else f"match {pattern}"
        verb = "be " if words else ""
        out.append(Problem(where, f"must {verb}{allowed}, not {json.dumps(value)}"
                                  f"{'' if words else _about(schema)}"))
    if schema.get("format") == "date-time" and not is_date_time(value):
        out.append(Problem(where, "must be an RFC 3339 time with seconds and a time-zone "
                                  "offset, such as 2025-07-01T00:00:00Z or "
                                  f"2025-07-01T09:00:00+02:00, not {json.dumps(value)}"))
    return out


@functools.cache
def _compiled(pattern: str) -> Any:
    options = re2.Options()
    options.log_errors = False
    return re2.compile(pattern, options)


def is_date_time(text: str) -> bool:
    """The API server's ``date-time`` format (kube-openapi ``strfmt.IsDateTime``), exactly.

    Seconds and an offset (``Z``, ``+02:00``) are required; ``2025-07-01``, a Unix
    timestamp or ``2025-07-01T00:00:00`` (no offset) are not date-times.
    """
    if len(text) < 4:
        return False
    parts = text.lower().split("t")
    if len(parts) < 2 or not _is_date(parts[0]):
        return False
    m = _TIME.match(parts[1])
    return m is not None and m.group(1) <= "23" and m.group(2) <= "59" and m.group(3) <= "59"


def _is_date(text: str) -> bool:
    m = _DATE.match(text)
    if not m:
        return False
    try:
        dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return False
    return True


def _list_problems(value: list[Any], schema: Mapping[str, Any], path: str) -> list[Problem]:
    where = path or "(object)"
    out = _size_problems(len(value), schema, where, "Items", "item(s)")
    items = schema.get("items") or {}
    for i, item in enumerate(value):
        out += _validate(item, items, f"{path}[{i}]")
    if schema.get("x-kubernetes-list-type") == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or ()
        seen: dict[str, int] = {}
        for i, item in enumerate(value):
            if isinstance(item, dict):
                key = json.dumps([item.get(k) for k in keys])
                if key in seen:
                    out.append(Problem(f"{path}[{i}]", f"must not repeat {path}[{seen[key]}] "
                                                      f"(same {', '.join(keys)})"))
                seen.setdefault(key, i)
    return out


def _object_problems(value: dict[str, Any], schema: Mapping[str, Any],
                     path: str) -> list[Problem]:
    out = []
    prefix = f"{path}." if path else ""
    props = schema.get("properties") or {}
    extra = schema.get("additionalProperties")
    for key in schema.get("required") or ():
        if key not in value:
            out.append(Problem(f"{prefix}{key}", f"must be set{_about(props.get(key) or {})}"))
    for key, item in value.items():
        if key in props:
            out += _validate(item, props[key], f"{prefix}{key}")
        elif isinstance(extra, Mapping):
            out += _validate(item, extra, f"{path}[{json.dumps(key)}]")
        else:
            known = ", ".join(props) or "none"
            out.append(Problem(f"{prefix}{key}", "must not be set: the API has no such field "
                                                 f"(check its spelling; known here: {known})"))
    return out
