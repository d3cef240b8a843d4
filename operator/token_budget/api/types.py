"""Value types shared by the API models: money, windows, model patterns, selectors.

Each type validates at the boundary (a manifest, a webhook request, a status
read back from the API) and carries its own JSON-schema fragment, so the CRD
generated from the models says the same thing the Python code enforces.

Deliberately not here: anything that reads a clock or talks to a server.
"""

from __future__ import annotations

import datetime as dt
import enum
import fnmatch
import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel

MONEY_PATTERN = r"^[0-9]{1,12}(\.[0-9]{1,9})?$"
_MONEY_RE = re.compile(MONEY_PATTERN)


def _parse_money(value: Any) -> Decimal:
    # Floats are refused on purpose: 0.1 + 0.2 is not 0.3, and a bill is exact.
    if isinstance(value, Decimal):
        return value
    # Bare numbers are refused too: the CRD types money as a string, so the API
    # server rejects `cost: 300`, and `tokenbudget validate` must say the same.
    if isinstance(value, bool | int | float):
        what = {bool: "a boolean", int: "an integer", float: "a float"}[type(value)]
        raise ValueError(f"money must be a decimal string such as \"12.50\", not {what}")
    if not isinstance(value, str) or not _MONEY_RE.match(value):
        raise ValueError(f"money must be a decimal string such as \"12.50\", got {value!r}")
    try:
        return Decimal(value)
    except InvalidOperation as exc:  # pragma: no cover - the pattern excludes it
        raise ValueError(f"{value!r} is not a decimal number") from exc


def format_money(value: Decimal) -> str:
    """Render money without exponent and without trailing zeros past cents."""
    q = value.quantize(Decimal("0.000001")).normalize()
    text = format(q, "f")
    if "." not in text:
        return text
    whole, frac = text.split(".")
    return f"{whole}.{frac.ljust(2, '0')}"


_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£"}
_CENT = Decimal("0.01")
_TEN_THOUSANDTH = Decimal("0.0001")


def display_money(value: Decimal, currency: str, per_unit: bool = False) -> str:
    """Money as people read it: ``$1,234.56``, ``1,234.56 CHF``.

    The one formatter of money for people (status messages, reports, the
    CLI); :func:`format_money` is the API's string.

    Args:
        value: the amount.
        currency: an ISO 4217 code; USD, EUR and GBP get their symbol.
        per_unit: a price per unit (cost per outcome): an amount below one
            keeps four decimals ($0.0004, not $0.00).
    """
    if per_unit and value < 1:
        text = f"{value.quantize(_TEN_THOUSANDTH)}"
    else:
        text = f"{value.quantize(_CENT):,.2f}"
    symbol = _SYMBOLS.get(currency)
    return f"{symbol}{text}" if symbol else f"{text} {currency}"


def plain_money(value: Decimal, quantum: Decimal = _CENT) -> str:
    """Money for files (report JSON and CSV): fixed point rounded to ``quantum``, ``"1234.50"``.

    The third and last formatter of money: :func:`format_money` is the API's
    string, :func:`display_money` the one for people.
    """
    return str(value.quantize(quantum))


Money = Annotated[
    Decimal,
    BeforeValidator(_parse_money),
    PlainSerializer(format_money, return_type=str),
    WithJsonSchema({"type": "string", "pattern": MONEY_PATTERN}),
]
"""A non-negative decimal amount of money, written as a string ("12.50")."""


# ---------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------

WINDOW_PATTERN = r"^([1-9][0-9]{0,4}(m|h|d)|Day|Week|Month)$"
_WINDOW_RE = re.compile(WINDOW_PATTERN)
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400}


class Calendar(str, enum.Enum):
    """Calendar windows reset at midnight, on Monday, or on the 1st, in a time zone."""

    DAY = "Day"
    WEEK = "Week"
    MONTH = "Month"


def parse_window(text: str) -> int | Calendar:
    """Parse a window: rolling seconds for ``30m``/``24h``/``7d``, else a Calendar.

    Raises:
        ValueError: the text is neither a rolling duration nor a calendar name.
    """
    if not _WINDOW_RE.match(text):
        raise ValueError(
            f"window {text!r} must be a rolling duration such as 1h, 24h, 7d, 30d "
            "or one of Day, Week, Month"
        )
    if text in ("Day", "Week", "Month"):
        return Calendar(text)
    return int(text[:-1]) * _UNIT_SECONDS[text[-1]]


# ---------------------------------------------------------------------------
# Model-name patterns
# ---------------------------------------------------------------------------

MODEL_PATTERN_RE = r"^[A-Za-z0-9*?\[\]][A-Za-z0-9._:/@*?\[\]-]{0,252}$"


def pattern_matches(pattern: str, name: str) -> bool:
    """Shell-style, case-insensitive match of a model name (``gpt-4o*``, ``*/claude-*``)."""
    return fnmatch.fnmatchcase(name.lower(), pattern.lower())


ModelPattern = Annotated[
    str,
    Field(
        pattern=MODEL_PATTERN_RE,
        description="A model name or shell-style pattern (gpt-4o*, anthropic/*).",
    ),
]


# ---------------------------------------------------------------------------
# Label selectors (the Kubernetes kind, evaluated in Python)
# ---------------------------------------------------------------------------


class _Base(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown keys refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_enum_values=False,
    )


class SelectorOperator(str, enum.Enum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(_Base):
    key: str = Field(min_length=1, max_length=317, description="The label key.")
    operator: SelectorOperator = Field(description="In, NotIn, Exists or DoesNotExist.")
    values: tuple[str, ...] = Field(
        default=(),
        description="Values for In and NotIn; must be empty for Exists and DoesNotExist.",
    )


class LabelSelector(_Base):
    """The Kubernetes label selector: every term must hold (AND)."""

    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-map-type": "atomic"},
    )

    match_labels: dict[str, str] = Field(
        default_factory=dict, description="Labels that must be present with these values."
    )
    match_expressions: tuple[LabelSelectorRequirement, ...] = Field(
        default=(), description="Set-based requirements, all of which must hold."
    )

    def matches(self, labels: dict[str, str] | Any) -> bool:
        """True when ``labels`` satisfy every term; an empty selector matches all."""
        for key, value in self.match_labels.items():
            if labels.get(key) != value:
                return False
        for req in self.match_expressions:
            present = req.key in labels
            if req.operator is SelectorOperator.IN:
                if not present or labels[req.key] not in req.values:
                    return False
            elif req.operator is SelectorOperator.NOT_IN:
                if present and labels[req.key] in req.values:
                    return False
            elif req.operator is SelectorOperator.EXISTS:
                if not present:
                    return False
            elif present:  # DoesNotExist
                return False
        return True

    def problems(self) -> list[str]:
        """What the schema cannot say: values must fit the operator."""
        out = []
        for i, req in enumerate(self.match_expressions):
            needs = req.operator in (SelectorOperator.IN, SelectorOperator.NOT_IN)
            if needs and not req.values:
                out.append(f"matchExpressions[{i}].values must be non-empty for "
                           f"{req.operator.value}")
            if not needs and req.values:
                out.append(f"matchExpressions[{i}].values must be empty for {req.operator.value}")
        return out


def utc(value: dt.datetime) -> dt.datetime:
    """Naive datetimes are taken as UTC; aware ones are converted to it."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)
