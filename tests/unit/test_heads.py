"""metrics.heads: a rolling window's head from the levels at its end and at its start.

Pure: the answers of the level queries in, the head's rows and the pairs to read exactly
out. The real Prometheus proves the figures equal to the exact reading
(``tests/e2e/test_head_from_levels.py``); here, which pair goes where, and why.
"""

from __future__ import annotations

import pytest

from token_budget.errors import QueryFailed
from token_budget.metrics import heads, promql
from token_budget.metrics.promql import ResultItem

NS, WL = "namespace", "pod"
START = 1_000_000  # ms


def _item(value: float, pod: str, model: str = "m") -> ResultItem:
    return {"metric": {NS: "ns", WL: pod, "model": model}, "value": [0, repr(value)]}


def _answers(rows: dict[tuple[str, str], tuple[float, int, float]], latest: bool
             ) -> list[tuple[str, list[ResultItem]]]:
    """(pod, model) -> (level, count, newest sample in s), for the input counter only."""
    out = [("input", [_item(v, pod, model) for (pod, model), (v, _, _) in rows.items()]),
           ("input" + promql.COUNT_TAG,
            [_item(n, pod, model) for (pod, model), (_, n, _) in rows.items()])]
    if latest:
        out.append(("input" + promql.LATEST_TAG,
                    [_item(t, pod, model) for (pod, model), (_, _, t) in rows.items()]))
    return out


def _check(pod: str) -> ResultItem:
    return {"metric": {NS: "ns", WL: pod}, "value": [0, "1"]}


LABELS = (NS, WL, "model")
KINDS = ("input", "output")


def _head(end: dict[tuple[str, str], tuple[float, int, float]],
          start: dict[tuple[str, str], tuple[float, int, float]],
          checks: tuple[str, ...] = ()) -> tuple[dict[tuple[str, str], float], set[str]]:
    found = heads.ends(_answers(end, latest=True), [_check(p) for p in checks], LABELS, KINDS,
                       NS, WL)
    rows, pairs = heads.head(found, _answers(start, latest=False), START, NS, WL)
    assert all(kind == "input" for _, kind, _ in rows)
    return {(key[1], key[2]): value for key, _, value in rows}, {wl for _, wl in pairs}


LATER = (START + 5000) / 1000  # a sample after the start, in seconds


def test_a_steady_group_is_its_end_level_minus_its_start_level() -> None:
    rows, exact = _head({("a", "m"): (1500.0, 2, LATER)}, {("a", "m"): (1000.0, 2, 0)})
    assert rows == {("a", "m"): 500.0} and not exact


def test_a_group_without_a_sample_since_the_start_has_no_row_as_the_exact_reading() -> None:
    rows, exact = _head({("a", "m"): (1000.0, 1, (START - 1) / 1000)},
                        {("a", "m"): (1000.0, 1, 0)})
    assert rows == {} and not exact


def test_a_sample_exactly_at_the_start_is_read_exactly() -> None:
    # In a closed range (Prometheus 2) and not in a left-open one (Prometheus 3).
    rows, exact = _head({("a", "m"): (1000.0, 1, START / 1000)}, {("a", "m"): (1000.0, 1, 0)})
    assert rows == {} and exact == {"a"}


def test_a_series_missing_at_the_start_sends_its_pair_whole() -> None:
    # Born since the start, or in a gap at it: both models of the pod are read exactly.
    rows, exact = _head({("a", "m"): (1500.0, 2, LATER), ("a", "m2"): (10.0, 1, LATER),
                         ("b", "m"): (7.0, 1, LATER)},
                        {("a", "m"): (1000.0, 1, 0), ("a", "m2"): (5.0, 1, 0),
                         ("b", "m"): (3.0, 1, 0)})
    assert rows == {("b", "m"): 4.0} and exact == {"a"}


def test_a_group_with_no_series_at_the_start_or_none_at_the_end_is_read_exactly() -> None:
    _, exact = _head({("a", "m"): (1500.0, 1, LATER)}, {})
    assert exact == {"a"}
    _, exact = _head({}, {("a", "m"): (1500.0, 1, 0)})
    assert exact == {"a"}


def test_the_pairs_the_end_check_names_are_read_exactly() -> None:
    rows, exact = _head({("a", "m"): (1500.0, 1, LATER), ("b", "m"): (9.0, 1, LATER)},
                        {("a", "m"): (1000.0, 1, 0), ("b", "m"): (3.0, 1, 0)}, checks=("a",))
    assert rows == {("b", "m"): 6.0} and exact == {"a"}


def test_a_figure_that_is_not_finite_sends_its_pair() -> None:
    rows, exact = _head({("a", "m"): (float("nan"), 1, LATER)}, {("a", "m"): (1.0, 1, 0)})
    assert rows == {} and exact == {"a"}
    rows, exact = _head({("a", "m"): (5.0, 1, LATER)}, {("a", "m"): (float("inf"), 1, 0)})
    assert rows == {} and exact == {"a"}


def test_two_reads_of_the_same_end_are_equal_so_the_end_is_kept() -> None:
    def read(count: int) -> heads.Ends:
        return heads.ends(_answers({("a", "m"): (1500.0, count, LATER)}, True), [], LABELS,
                          KINDS, NS, WL)

    assert read(2) == read(2) and read(2) != read(3)


def test_a_kind_at_one_end_only_sends_its_pair() -> None:
    end = heads.ends(_answers({("a", "m"): (5.0, 1, LATER)}, True), [], LABELS, KINDS, NS, WL)
    start = [*_answers({("a", "m"): (1.0, 1, 0)}, False),
             ("output", [_item(2.0, "a")]), ("output" + promql.COUNT_TAG, [_item(1, "a")])]
    rows, pairs = heads.head(end, start, START, NS, WL)
    assert not rows and pairs == {("ns", "a")}


def test_an_end_answer_without_its_count_or_newest_sample_is_read_exactly() -> None:
    answers = _answers({("a", "m"): (5.0, 1, LATER), ("b", "m"): (5.0, 1, LATER)}, True)
    answers[1] = (answers[1][0], [it for it in answers[1][1] if it["metric"][WL] == "b"])
    end = heads.ends(answers, [], LABELS, KINDS, NS, WL)
    assert end.uncommon == {("ns", "a")} and list(end.index) == [("ns", "b", "m")]


def test_a_malformed_answer_is_a_query_failure_not_a_crash() -> None:
    with pytest.raises(QueryFailed, match="malformed"):
        heads.ends([("input", [{"value": [0, "1"]}])], [], LABELS, KINDS, NS, WL)  # type: ignore[list-item]
    with pytest.raises(QueryFailed, match="malformed"):
        heads.ends([("input", [_item(1.0, "a") | {"value": [0, "x"]}])], [], LABELS, KINDS,  # type: ignore[operator]
                   NS, WL)


def test_a_start_level_without_its_count_sends_its_pair() -> None:
    # The end has output only; the start has an input level but no input count (answers
    # that disagree: two replicas behind one Service, a partial response).
    end = heads.ends([("output", [_item(30.0, "a")]), ("output:n", [_item(1, "a")]),
                      ("output:t", [_item(LATER, "a")])], [], LABELS, KINDS, NS, WL)
    start = [("input", [_item(24.0, "a")]), ("input:n", []),
             ("output", [_item(10.0, "a")]), ("output:n", [_item(1, "a")])]
    rows, pairs = heads.head(end, start, START, NS, WL)
    assert not rows and pairs == {("ns", "a")}


def test_two_reads_of_an_end_in_another_row_order_are_equal() -> None:
    rows = {("a", "m"): (1.0, 1, LATER), ("b", "m"): (2.0, 1, LATER)}
    one = _answers(rows, True)
    other = [(tag, list(reversed(items))) for tag, items in one]
    assert heads.ends(one, [], LABELS, KINDS, NS, WL) == heads.ends(other, [], LABELS, KINDS,
                                                                    NS, WL)


def test_a_kept_end_holds_under_450_bytes_a_group_of_three_counters() -> None:
    """The README's figure: about 13 MB for the 33,334 groups of 100,000 series (3
    counters). Kept as dicts of label pairs and an object per kind, the first version held
    32-36 MB (found by review). Counted object by object (the index, its keys, the label
    strings they keep, the arrays), not with tracemalloc: other tests' threads allocate
    beside it in a full run (485 bytes a group measured so in CI, 376 alone)."""
    import json
    import sys

    kinds = ("input", "output", "cached_input")
    n = 5000

    def answer(value: str) -> list[ResultItem]:
        # Decoded from JSON as the client does: every answer brings its own strings.
        return json.loads(json.dumps([
            {"metric": {NS: f"ns-{i % 50}", WL: f"agent-{i:06d}-abcdef", "model": "gpt-4o-mini"},
             "value": [0, value]} for i in range(n)]))

    tags = [k + suffix for k in kinds for suffix in ("", promql.COUNT_TAG, promql.LATEST_TAG)]
    end = heads.ends([(tag, answer("1733140000.512" if tag.endswith(promql.LATEST_TAG) else
                                   "1" if tag.endswith(promql.COUNT_TAG) else "123456"))
                      for tag in tags], [], LABELS, kinds, NS, WL)
    strings = {id(x): x for key in end.index for x in key}
    held = (sys.getsizeof(end.index) + sum(sys.getsizeof(key) for key in end.index)
            + sum(sys.getsizeof(x) for x in strings.values())
            + sum(sys.getsizeof(a) for a in (end.totals, end.counts, end.latest)))
    assert len(end.index) == n
    assert held / n < 450, held / n
