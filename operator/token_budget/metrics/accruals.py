"""The burn rate from reads an evaluation makes anyway (issue 16).

A window read through the recording rules ends in a raw *tail*: the spend from the
rule's last run to now, read every evaluation (see ``PrometheusSource._from_rules``).
Its start stays put until the rule runs again, so two tails of the same rule run
differ by exactly the spend between their two instants: per series, the last value
at the later instant minus the last value at the earlier one, whatever the start
value was. The burn rate over the last ``recent_seconds`` is that difference between
this evaluation's tail and the one kept from ``recent_seconds`` earlier, instead of
one more query that reads every series of the source again. At 20,000 series the
burn-rate query cost Prometheus 0.75-0.81 s of the 2.1-2.2 s of a further
evaluation (the tail and the rolling head cost the rest).

What the difference is, compared with the burn-rate query it replaces:

* a steady counter, an idle one, one gone: the same rows and figures, to the digit,
  when the two reads are ``recent_seconds`` apart. A tail keeps a row for every series
  with a sample since the rule ran, the query only for those with a sample in its
  window, and whether a scope has rows there decides whether its source is seen alive
  (``whenSpendUnknown``): so one cheap query (``promql.alive``: one read a series of the
  first counter) names the groups with a sample in the window, and only those are kept;
* a row without an old tail (a series born since, or missed by an incomplete read: two
  Prometheus replicas behind a Service) is read by the burn-rate query narrowed to its
  (namespace, workload) pairs, not counted whole;
* two reads further apart (an evaluation is rarely exactly ``recent_seconds`` after
  another): the difference over the span between them, at most
  :data:`MAX_LAG_SECONDS` longer, scaled to ``recent_seconds`` (a rate over
  600-660 s instead of 600 s);
* a counter reset inside the tail: each tail reads that series with ``increase()``,
  whose extrapolation (a fraction of one scrape) differs between the two reads; the
  query reads a reset in its own window the same way.

The burn rate decides when the loop looks again (the forecast) and the projected run-out
in status; no action of a ladder follows from it, so the scaled span or a reset's
extrapolation moves a look, never a Block.

It is not used, and the query runs, when no kept tail lies ``recent_seconds`` to
``recent_seconds`` + :data:`MAX_LAG_SECONDS` back (the first minutes after a start or
a leader change, an interval longer than the lag), when the rule ran since (its tail
starts anew: ten minutes an hour), when a scrape target of the source was seen down
from a minute before the old tail on (the old tail holds a down target's last sample
before its gap, and the difference would put the gap's spend into the burn rate), or
when a row fell or vanished between the two reads (Prometheus lost data, a reset read
two ways): a burn rate is never made up. Found by review, each with a test.

Pure: :class:`Accruals` keeps what it is given and :func:`derive` computes. A kept
tail holds its values in an ``array`` (8 bytes a figure), and a tail's keys are the
previous tail's objects: 27 tails of 33,334 rows (100,000 series) held 39 MB, measured
by review (about 1.5 MB a tail), and at most (``recent_seconds`` + lag) /
:data:`SPACING_SECONDS` + 1 tails are kept.
"""

from __future__ import annotations

import datetime as dt
import math
from array import array
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from token_budget.policy.inputs import SpendSeries

#: How much longer than the burn-rate window the span between the two tails may be.
MAX_LAG_SECONDS = 60
#: Tails are kept at least this far apart (evaluations woken by events come closer).
SPACING_SECONDS = 25

#: A row's (namespace, workload, model, extra labels).
RowKey = tuple[str, str, str, tuple[tuple[str, str], ...]]
_FIGURES = 4  # input, output, cached input, cost (NaN: the source reports no money)


@dataclass(frozen=True)
class Accrual:
    """One tail: its fixed start (``anchor``, ms), when it was read, its rows' figures."""

    anchor: int
    at: dt.datetime
    keys: tuple[RowKey, ...]
    values: array[float]


def row_key(s: SpendSeries) -> RowKey:
    """A row's (namespace, workload, model, extra labels): how tails and results sort."""
    return (s.namespace, s.workload, s.model, s.labels)



def accrual(anchor: int, at: dt.datetime, series: Sequence[SpendSeries],
            like: Accrual | None = None) -> Accrual:
    """A tail read at ``at``; its keys are ``like``'s when the rows are the same, and each
    key that ``like`` has is ``like``'s object (pods come and go: a new row must not copy
    every key; 33,334 rows in 27 tails held 277 MB so, 39 MB shared)."""
    keys = tuple(row_key(s) for s in series)
    if like is not None:
        if like.keys == keys:
            keys = like.keys
        else:
            same = {k: k for k in like.keys}
            keys = tuple(same.get(k, k) for k in keys)
    values = array("d")
    for s in series:
        values.extend((s.input_tokens, s.output_tokens, s.cached_input_tokens,
                       math.nan if s.cost is None else float(s.cost)))
    return Accrual(anchor, at, keys, values)


class Accruals:
    """The tails of the last ``recent_seconds`` + :data:`MAX_LAG_SECONDS`, per reading."""

    def __init__(self) -> None:
        self._by: dict[Hashable, list[Accrual]] = {}

    def add(self, key: Hashable, anchor: int, at: dt.datetime,
            series: Sequence[SpendSeries], keep_seconds: float) -> None:
        """Keep the tail ``key`` read at ``at``; drop those older than ``keep_seconds`` +
        the lag, and all of them when ``at`` is not after the newest (a clock set back)."""
        kept = self._by.get(key, [])
        if kept and at == kept[-1].at:
            return  # the same instant collected again
        if kept and at < kept[-1].at:
            kept = []
        oldest = at - dt.timedelta(seconds=keep_seconds + MAX_LAG_SECONDS)
        kept = [a for a in kept if a.at >= oldest]
        if kept and (at - kept[-1].at).total_seconds() < SPACING_SECONDS:
            self._by[key] = kept
            return
        kept.append(accrual(anchor, at, series, kept[-1] if kept else None))
        self._by[key] = kept

    def prune(self, now: dt.datetime, keep_seconds: float) -> None:
        """Forget the readings with no tail since ``keep_seconds`` + the lag (a source or
        a grouping no budget reads any more)."""
        oldest = now - dt.timedelta(seconds=keep_seconds + MAX_LAG_SECONDS)
        for key in [k for k, v in self._by.items() if v[-1].at < oldest]:
            del self._by[key]

    def before(self, key: Hashable, now: dt.datetime, seconds: float) -> Accrual | None:
        """The newest tail read ``seconds`` to ``seconds`` + lag before ``now``, if the
        rule has not run since the newest one (then no tail of this run is that old)."""
        kept = self._by.get(key)
        if not kept:
            return None
        latest = now - dt.timedelta(seconds=seconds)
        earliest = latest - dt.timedelta(seconds=MAX_LAG_SECONDS)
        found = None
        for a in kept:
            if earliest <= a.at <= latest:
                found = a
        if found is None or found.anchor != kept[-1].anchor:
            return None
        return found

    def __len__(self) -> int:
        return sum(len(v) for v in self._by.values())


def derive(old: Accrual, anchor: int, now: dt.datetime, series: Sequence[SpendSeries],
           seconds: float, alive: Collection[RowKey]
           ) -> tuple[tuple[SpendSeries, ...], set[RowKey]] | None:
    """The spend of the last ``seconds`` from this evaluation's tail (``series``, read at
    ``now`` from ``anchor``) and ``old``, for the rows of ``alive`` (those with a sample
    in the last ``seconds``: the rows the burn-rate query would have); and the keys of
    the rows of ``alive`` that ``old`` lacks, which the caller reads by query (born, or
    missing from an incomplete read: their whole tail is no burn rate). None when they
    do not make one (see the module).
    """
    if anchor != old.anchor or now <= old.at:
        return None
    span = (now - old.at).total_seconds()
    if span < seconds or span > seconds + MAX_LAG_SECONDS:
        return None
    scale = seconds / span
    index = {k: i for i, k in enumerate(old.keys)}
    values = old.values
    out = []
    new = set(alive)  # less those of the tail: rows alive that the tail lacks are new too
    for s in series:
        key = row_key(s)
        i = index.pop(key, None)
        if key not in alive:
            continue  # no sample in the window: the query has no such row
        if i is not None:
            new.discard(key)
        else:
            continue
        figures = (s.input_tokens, s.output_tokens, s.cached_input_tokens,
                   math.nan if s.cost is None else float(s.cost))
        delta = [x - y if not math.isnan(y) else x
                 for x, y in zip(figures, values[i * _FIGURES:(i + 1) * _FIGURES],
                                 strict=True)]
        for d, x in zip(delta, figures, strict=True):
            # Sums of the same samples can differ in the last bit when Prometheus adds
            # a group's series in another order: that is no fall.
            if d < 0 and d < -1e-9 * max(1.0, abs(x)):
                return None
        i_tok, o_tok, c_tok, cost = (max(0.0, d) * scale if not math.isnan(d) else d
                                     for d in delta)
        out.append(SpendSeries(
            namespace=s.namespace, workload=s.workload, model=s.model,
            input_tokens=i_tok, output_tokens=o_tok, cached_input_tokens=c_tok,
            cost=None if s.cost is None else Decimal(repr(cost)), labels=s.labels))
    if index:
        return None  # a row vanished: the tail is no longer what was kept
    return tuple(out), new
