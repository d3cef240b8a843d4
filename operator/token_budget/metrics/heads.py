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
  read so (:func:`promql.head_ends`: a series in the hour and lookback before the end
  that fell, holds a NaN or an infinity, or has no value at the end);
* every evaluation, at the head's start: each group's level and how many series it sums
  (:func:`promql.levels`). A group whose count differs from the end's (a series born
  since the start, or in a gap at it) sends its pair to the exact reading, narrowed to
  those pairs, as the second step of :meth:`PrometheusSource.read_spend` does.

Why the rest is the exact reading, to the digit for integer counters (the exact reading
subtracts per series before it sums, so a float counter such as cost may differ in its
last bits, as the hourly buckets do):

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

Pure: the two reads' items in, the head's items and the pairs to read exactly out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from token_budget.metrics import promql

#: A group's labels, as a result row carries them besides its tag.
Group = tuple[tuple[str, str], ...]
Pair = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Level:
    """One counter's figures for one group at one instant."""

    total: float
    count: int
    latest_ms: int = 0


@dataclass(frozen=True)
class Ends:
    """What a head needs from its end: per group, its labels and each kind's level there,
    and the pairs whose head is read exactly."""

    groups: Mapping[Group, Mapping[str, Level]]
    uncommon: frozenset[Pair]


#: The answers of the queries of :func:`promql.levels`, each with its tag.
Answers = Iterable[tuple[str, Sequence[promql.ResultItem]]]


def _split(answers: Answers) -> tuple[dict[Group, dict[str, dict[str, float]]], set[Group]]:
    """Per group and kind, its figures by tag suffix ("" for the sum); the groups with a
    figure that is not a finite number."""
    out: dict[Group, dict[str, dict[str, float]]] = {}
    broken: set[Group] = set()
    for tag, items in answers:
        kind, _, suffix = tag.partition(":")
        for item in items:
            group = tuple(sorted(item["metric"].items()))
            value = float(item["value"][1])
            if not math.isfinite(value):
                broken.add(group)
                continue
            out.setdefault(group, {}).setdefault(kind, {})[suffix and ":" + suffix] = value
    return out, broken


def _pair(group: Group, namespace_label: str, workload_label: str) -> Pair:
    labels = dict(group)
    return labels.get(namespace_label, ""), labels.get(workload_label, "")


def ends(answers: Answers, checks: Iterable[promql.ResultItem], namespace_label: str,
         workload_label: str) -> Ends:
    """What a head needs from its end: the answers of :func:`promql.levels` (``latest``)
    and of :func:`promql.head_checks` there."""
    split, broken = _split(answers)
    uncommon = {_pair(g, namespace_label, workload_label) for g in broken}
    uncommon.update((it["metric"].get(namespace_label, ""), it["metric"].get(workload_label, ""))
                    for it in checks)
    groups: dict[Group, dict[str, Level]] = {}
    for group, kinds in split.items():
        for kind, figures in kinds.items():
            if "" not in figures or promql.COUNT_TAG not in figures \
                    or promql.LATEST_TAG not in figures:
                uncommon.add(_pair(group, namespace_label, workload_label))
                continue
            groups.setdefault(group, {})[kind] = Level(
                figures[""], int(figures[promql.COUNT_TAG]),
                round(figures[promql.LATEST_TAG] * 1000))
    return Ends(groups, frozenset(uncommon))


def head(end: Ends, starts: Answers, start_ms: int, namespace_label: str,
         workload_label: str) -> tuple[list[promql.ResultItem], frozenset[Pair]]:
    """The head's rows for every pair it can read from levels, as items of a spend query
    (tagged by kind), and the pairs to read exactly: ``starts`` are the answers of
    :func:`promql.levels` at the head's start, ``start_ms``."""
    split, broken = _split(starts)
    bad = set(end.uncommon) | {_pair(g, namespace_label, workload_label) for g in broken}
    for group, kinds in split.items():
        there = end.groups.get(group, {})
        for kind, figures in kinds.items():
            level = there.get(kind)
            if level is None or int(figures.get(promql.COUNT_TAG, -1)) != level.count \
                    or "" not in figures:
                bad.add(_pair(group, namespace_label, workload_label))
    items: list[promql.ResultItem] = []
    for group, kinds_at_end in end.groups.items():
        pair = _pair(group, namespace_label, workload_label)
        if pair in bad:
            continue
        at_start = split.get(group, {})
        rows: list[tuple[str, float]] = []
        for kind, level in kinds_at_end.items():
            got = at_start.get(kind)
            if got is None or level.latest_ms == start_ms:
                # Born since the start, or a sample exactly at it (read exactly).
                bad.add(pair)
                break
            if level.latest_ms > start_ms:
                rows.append((kind, level.total - got[""]))
        if pair in bad:
            continue
        labels = dict(group)
        items.extend({"metric": {**labels, promql.KIND_LABEL: kind}, "value": [0, repr(value)]}
                     for kind, value in rows)
    if bad:
        items = [it for it in items
                 if (it["metric"].get(namespace_label, ""),
                     it["metric"].get(workload_label, "")) not in bad]
    return items, frozenset(bad)
