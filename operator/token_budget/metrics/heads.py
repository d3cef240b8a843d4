"""A rolling window's head from two levels (issue 16).

A rolling window read through the recording rules starts with a raw *head*: the spend
from the window's start to its first hourly bucket (see ``PrometheusSource._from_rules``).
Its end is a rule run, wholly in the past, and stays put for an hour; its start moves
with every evaluation. Read as the exact increase of every series
(:func:`token_budget.metrics.promql.common`), it cost Prometheus about as much as the tail
at 100,000 series (2.9 s of a 6.1 s evaluation), for spend that happened a day ago.

Per series that neither fell nor came or went, the head is its value at the end minus
its value at the start: both are sums of values at one instant (a *level*), one instant
read a series each. So:

* once per rule run, at the head's end: each group's level, how many series it sums and
  when its newest sample was scraped, and the (namespace, workload) pairs that cannot be
  read so (:func:`promql.head_checks`: a series in the hour and lookback before the end
  that fell, holds a NaN or an infinity, or has no value at the end);
* every evaluation, at the head's start: each group's level and how many series it sums
  (:func:`promql.levels`). A group whose count differs from the end's (a series born
  since the start, or in a gap at it) sends its pair to the exact reading, narrowed to
  those pairs, as the second step of :meth:`PrometheusSource.read_spend` does.

Why the rest is the exact reading, to the digit for integer counters:

* every series with a value at the start has a sample within the lookback before it,
  which lies in the hour and lookback the end's check saw, so it has a value at the end:
  equal counts mean the same series;
* none of them fell in that range, so the start value is the exact reading's start value
  and its sample is where the series' sums begin; a series with no sample between start
  and end adds 0, as the exact reading does not read it;
* which rows the exact reading returns: a group has a row for a counter when a series
  has a sample in the head's range, that is when its newest sample at the end is later
  than the start (a sample exactly at the start is in Prometheus 2's closed ranges and
  not in Prometheus 3's: that pair is read exactly);
* no gap rows: every series has its start value within the lookback.

A float counter (cost) differs from the exact reading in the last bits of the group's
lifetime level, not of the head (the exact reading subtracts per series before it sums):
7e-12 on lifetime totals of 12,345, found by review. Like :func:`promql.common`, this
assumes Prometheus's default lookback (5 minutes, ``--query.lookback-delta``). Two
Prometheus replicas behind one Service scrape at their own instants: a level read from
each differs by up to a scrape's spend a series, as the parts of a window read through
the rules already may where they join.

Memory and time, found by review at 33,334 groups of 3 counters (100,000 series): an end
kept as dicts of label pairs and objects held 32-36 MB and matching a start against it
took 0.78 s of the operator's CPU. Groups are keyed by their label values in the query's
order, the figures kept in arrays, the flagged pairs not kept at all.

Pure: the reads' answers in, the head's rows and the pairs to read exactly out.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from token_budget.errors import QueryFailed
from token_budget.metrics import promql

#: A group: the values of the grouping labels, in the order of ``Ends.labels``.
Key = tuple[str, ...]
Pair = tuple[str, str]
#: The answers of the queries of :func:`promql.levels`, each with its tag.
Answers = Iterable[tuple[str, Sequence[promql.ResultItem]]]


@dataclass(frozen=True)
class Ends:
    """What a head needs from its end: per group (a row of the arrays, ``index``) and
    counter kind (a column), the level, how many series (-1: none of that kind) and the
    newest sample's time in ms; and the pairs whose head is read exactly."""

    labels: tuple[str, ...]
    kinds: tuple[str, ...]
    index: Mapping[Key, int]
    totals: array[float]
    counts: array[int]
    latest: array[int]
    uncommon: frozenset[Pair]


def _figures(answers: Answers, labels: tuple[str, ...], kinds: tuple[str, ...]
             ) -> tuple[dict[Key, list[float]], set[Key]]:
    """Per group, its figures: for each kind in turn, (level, count, newest sample in s),
    NaN where absent; and the groups with a figure that is not a finite number."""
    width = 3 * len(kinds)
    out: dict[Key, list[float]] = {}
    broken: set[Key] = set()
    for tag, items in answers:
        kind, _, suffix = tag.partition(":")
        column = 3 * kinds.index(kind) + {"": 0, promql.COUNT_TAG: 1,
                                          promql.LATEST_TAG: 2}[suffix and ":" + suffix]
        try:
            for item in items:
                metric = item["metric"]
                key = tuple([metric.get(label, "") for label in labels])
                value = float(item["value"][1])
                if not math.isfinite(value):
                    broken.add(key)
                    continue
                row = out.get(key)
                if row is None:
                    row = out[key] = [math.nan] * width
                row[column] = value
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise QueryFailed(f"malformed sample in Prometheus result: {exc!r}") from exc
    return out, broken


def ends(answers: Answers, checks: Iterable[promql.ResultItem], labels: tuple[str, ...],
         kinds: tuple[str, ...], namespace_label: str, workload_label: str) -> Ends:
    """What a head needs from its end: the answers of :func:`promql.levels` (``latest``)
    and of :func:`promql.head_checks` there; groups keyed by ``labels``' values."""
    at = labels.index(namespace_label), labels.index(workload_label)
    figures, broken = _figures(answers, labels, kinds)
    try:
        uncommon = {(it["metric"].get(namespace_label, ""), it["metric"].get(workload_label, ""))
                    for it in checks}
    except (KeyError, TypeError, AttributeError) as exc:
        raise QueryFailed(f"malformed sample in Prometheus result: {exc!r}") from exc
    uncommon.update((k[at[0]], k[at[1]]) for k in broken)
    for key, row in figures.items():
        # A kind with a level but no count or newest sample (or the reverse): an answer
        # incomplete, read exactly.
        if any(math.isnan(row[i]) != math.isnan(row[i + j])
               for i in range(0, len(row), 3) for j in (1, 2)):
            uncommon.add((key[at[0]], key[at[1]]))
    index: dict[Key, int] = {}
    totals, counts, latest = array("d"), array("q"), array("q")
    # In order: two reads of the same end are equal whatever order the rows came in (a
    # query frontend merging shards), so the end is kept (found by review).
    for key in sorted(figures):
        row = figures[key]
        if (key[at[0]], key[at[1]]) in uncommon:
            continue
        index[key] = len(index)
        for i in range(0, len(row), 3):
            present = not math.isnan(row[i])
            totals.append(row[i] if present else 0.0)
            counts.append(int(row[i + 1]) if present else -1)
            latest.append(round(row[i + 2] * 1000) if present else 0)
    return Ends(labels, kinds, index, totals, counts, latest, frozenset(uncommon))


def head(end: Ends, starts: Answers, start_ms: int, namespace_label: str,
         workload_label: str) -> tuple[list[tuple[Key, str, float]], frozenset[Pair]]:
    """The head's rows for every pair it reads from levels, as (group, kind, spend), and
    the pairs to read exactly: ``starts`` are the answers of :func:`promql.levels` at the
    head's start, ``start_ms``."""
    at = end.labels.index(namespace_label), end.labels.index(workload_label)
    figures, broken = _figures(starts, end.labels, end.kinds)
    bad = set(end.uncommon)
    bad.update((k[at[0]], k[at[1]]) for k in broken)
    width = len(end.kinds)
    levels: dict[int, list[float]] = {}
    for key, row in figures.items():
        i = end.index.get(key)
        if i is None:  # no series of the group at the end, or its pair flagged there
            bad.add((key[at[0]], key[at[1]]))
            continue
        for c in range(width):
            n, count = row[3 * c + 1], end.counts[i * width + c]
            # A level without its count or the reverse (answers that disagree: two replicas,
            # a partial response; found by review), or another count than at the end.
            if math.isnan(n) != math.isnan(row[3 * c]) or (math.isnan(n) and count >= 0) \
                    or (not math.isnan(n) and n != count):
                bad.add((key[at[0]], key[at[1]]))
                break
        levels[i] = row
    rows: list[tuple[Key, str, float]] = []
    for key, i in end.index.items():
        pair = (key[at[0]], key[at[1]])
        if pair in bad:
            continue
        start = levels.get(i)
        found: list[tuple[Key, str, float]] = []
        for c, kind in enumerate(end.kinds):
            j = i * width + c
            if end.counts[j] < 0:
                continue
            newest = end.latest[j]
            if start is None or math.isnan(start[3 * c]) or newest == start_ms:
                # Born since the start (or in a gap at it), or a sample exactly at it.
                bad.add(pair)
                break
            if newest > start_ms:
                found.append((key, kind, end.totals[j] - start[3 * c]))
        else:
            rows.extend(found)
    if bad:
        rows = [r for r in rows if (r[0][at[0]], r[0][at[1]]) not in bad]
    return rows, frozenset(bad)
