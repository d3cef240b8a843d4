"""The Prometheus adapter: run a plan's queries, turn raw results into a SpendSnapshot.

Edge cases are separate and tested (after KEDA's Prometheus scaler):

* Prometheus unreachable -> :class:`MetricsUnavailable` for every source.
* An error answer (bad PromQL, 422/503, too many samples) -> :class:`QueryFailed`
  with Prometheus's own error text.
* NaN or an infinite value in any series -> :class:`InvalidValue`: a number no
  limit can be compared with is not silently taken as zero.
* An empty result is *data*: no series. Whether that means zero spend is the
  engine's call (it does not, unless series exist for the scope).

A failing source does not fail the evaluation: its error lands in
``SpendSnapshot.errors`` and each budget's ``whenSpendUnknown`` decides.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar, cast

import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.exceptions import MaxRetryError, ProtocolError
from urllib3.util import Retry

from token_budget.errors import InvalidValue, MetricsError, MetricsUnavailable, QueryFailed
from token_budget.metrics import accruals, heads, promql
from token_budget.metrics.promql import ResultItem
from token_budget.policy import inputs, planner
from token_budget.policy.inputs import Gap, SpendSeries, SpendSnapshot
from token_budget.policy.planner import Plan
from token_budget.policy.ratesources import RateSample, RateSource
from token_budget.policy.sources import Kind, ResolvedSource
from token_budget.policy.windows import WindowKey

log = logging.getLogger(__name__)




# What a part of a window read through the rules was read for: a raw part's (source, end,
# seconds, horizon, labels), the recorded buckets' (source, rule run, query).
_PartKey = tuple[object, ...]
_Part = tuple[tuple[SpendSeries, ...], dict[str, Gap]]
# A part, or what a part is read from (a head's end).
_T = TypeVar("_T")


@dataclass
class Auth:
    """How to talk to Prometheus: bearer token, basic auth, CA bundle, or none."""

    bearer_token: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    insecure_skip_verify: bool = False
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class QueryStats:
    """Counters the operator exports about its own PromQL use."""

    queries: int = 0
    errors: int = 0
    seconds: float = 0.0
    derived_rates: int = 0  # burn rates taken from two tails, no query (see metrics.accruals)


#: The burn-rate reads: series per source, the sources that failed, and for those whose
#: burn rate comes from the tails, the groups with a sample in its range.
_Recent = tuple[dict[ResolvedSource, tuple[SpendSeries, ...]], dict[ResolvedSource, str],
                dict[ResolvedSource, frozenset[accruals.RowKey]]]


class PrometheusSource:
    """Reads spend for a :class:`Plan` from one Prometheus (or Thanos/Mimir query API)."""

    def __init__(self, url: str, auth: Auth | None = None, timeout_seconds: float = 20.0,
                 on_query: Callable[[str, float, bool], None] | None = None,
                 scrape_interval_seconds: float = 15.0, max_samples: int = 50_000_000,
                 retention_ttl_seconds: float = 600.0,
                 rules_keep_labels: tuple[str, ...] = ()) -> None:
        """
        Args:
            url: base URL, e.g. ``http://prometheus.monitoring:9090``.
            auth: credentials and TLS settings.
            timeout_seconds: per query.
            on_query: called with (kind, seconds, ok) after every query (metrics hook).
            scrape_interval_seconds: how often the spend counters are scraped; with the
                series count it estimates how many samples a window query loads.
            max_samples: refuse a query estimated to load more (Prometheus's own
                ``--query.max-samples`` default is 50 million); 0 turns the guard off.
            retention_ttl_seconds: how long the server's retention, once read, is trusted.
            rules_keep_labels: the labels the installed recording rules keep besides
                namespace, workload and model (``tokenbudget rules --keep-label``); a
                long window grouped only by them reads the rules. Each is checked
                against the recorded series (see :meth:`kept_labels`).
        """
        self.rules_keep_labels = tuple(rules_keep_labels)
        # Per source: (rule run the check was made for, labels the rules were found to keep).
        self._kept_checked: dict[ResolvedSource, tuple[dt.datetime, frozenset[str]]] = {}
        self._rule_labels: dict[ResolvedSource, frozenset[str]] = {}
        self._said_raw: set[tuple[ResolvedSource, tuple[str, ...]]] = set()
        self.scrape_interval_seconds = scrape_interval_seconds
        self.max_samples = max_samples
        self._retention: tuple[float, int | None] | None = None
        self._rule_times: dict[ResolvedSource, tuple[dt.datetime | None, dt.datetime]] = {}
        # Parts of rule-read windows: the settled ones (the recorded buckets, a calendar
        # window's head) kept from the last evaluation (_kept) for this one (_parts); all
        # read in this evaluation (_fresh); and the ranges whose second step named too much.
        self._kept: dict[tuple[ResolvedSource, object], tuple[_PartKey, Any]] = {}
        self._parts: dict[tuple[ResolvedSource, object], tuple[_PartKey, Any]] = {}
        self._fresh: dict[_PartKey, Any] = {}
        # Settled parts read once, not kept yet: a part is kept when the next evaluation's
        # read of the same key returns the same (see _once); those of the last evaluation
        # (_unconfirmed) and of this one (_reads).
        self._unconfirmed: dict[tuple[ResolvedSource, object], tuple[_PartKey, Any]] = {}
        self._reads: dict[tuple[ResolvedSource, object], tuple[_PartKey, Any]] = {}
        self._dense: dict[tuple[Any, ...], float] = {}
        # The tails of rule-read windows: this evaluation's, per (source, labels), as
        # (rule run in ms, series); and those of the last minutes (burn rates, see collect).
        self._tails: dict[tuple[ResolvedSource, tuple[str, ...]],
                          tuple[int, tuple[SpendSeries, ...]]] = {}
        self._accruals = accruals.Accruals()
        self._down_at: dict[ResolvedSource, dt.datetime] = {}  # a target last seen down
        self._retention_ttl = retention_ttl_seconds
        auth = auth or Auth()
        headers = dict(auth.headers)
        if auth.bearer_token:
            headers["Authorization"] = f"Bearer {auth.bearer_token}"
        verify: bool | str = True
        if auth.ca_file:
            verify = auth.ca_file
        if auth.insecure_skip_verify:
            verify = False
        self.url = url.rstrip("/")
        self._timeout = timeout_seconds
        self._prom = PrometheusConnect(
            url=self.url,
            headers=headers or None,
            disable_ssl=verify is False,
            auth=(auth.username, auth.password or "") if auth.username else None,
            timeout=timeout_seconds,
            # No retries in here: the library's default (3 with backoff, also on 5xx) held an
            # evaluation ~6 s per source when Prometheus was down, and turned a 503 answer
            # into "cannot be reached". The next evaluation is the retry.
            retry=Retry(total=0, respect_retry_after_header=False),
        )
        # prometheus-api-client keeps a requests session; give it our CA bundle.
        if isinstance(verify, str):
            self._prom._session.verify = verify
        self._on_query = on_query
        self.stats = QueryStats()
        self._stats_lock = threading.Lock()  # the burn-rate reads run beside the windows'

    # -- raw -------------------------------------------------------------------

    def query(self, text: str, at: dt.datetime, kind: str = "spend",
              matrix: bool = False) -> list[ResultItem]:
        """Run one instant query at ``at``; raises a :class:`MetricsError`."""
        started = time.monotonic()
        ok = False
        try:
            params = {"time": f"{at.timestamp():.3f}"}
            try:
                result = self._prom.custom_query(query=text, params=params)
            except requests.exceptions.ConnectionError as exc:
                if not _broke_before_answer(exc) or \
                        time.monotonic() - started > min(1.0, self._timeout / 10):
                    raise
                # A kept-alive connection broke at once, before any answer (closed or cut by
                # the server or a proxy in between while idle, CI: BadStatusLine on one
                # reused across a restart). The pool dropped it: ask once more on a new one,
                # as Go's HTTP client does for idempotent requests. Not a refused connection
                # (Prometheus down), a timeout, or a break after a while (Prometheus killed
                # by the query itself): they fail as fast as before, the query run once.
                log.debug("Prometheus at %s: a kept-alive connection broke (%s); asking "
                          "once more on a new one", self.url, _short(exc))
                result = self._prom.custom_query(query=text, params=params)
            ok = True
        except requests.exceptions.JSONDecodeError as exc:
            # Answered, but not with Prometheus JSON (a proxy's sign-in page, say).
            raise QueryFailed(f"Prometheus at {self.url} answered with something that is not "
                              f"JSON: {_short(exc)}") from exc
        except (KeyError, TypeError) as exc:
            raise QueryFailed(f"Prometheus at {self.url} answered without data.result: "
                              f"{_short(exc)}") from exc
        except requests.exceptions.RequestException as exc:
            raise MetricsUnavailable(f"Prometheus at {self.url} cannot be reached: "
                                     f"{_short(exc)}") from exc
        except PrometheusApiClientException as exc:
            raise QueryFailed(f"Prometheus at {self.url} refused the query: {_short(exc)}") from exc
        finally:
            elapsed = time.monotonic() - started
            with self._stats_lock:
                self.stats.queries += 1
                self.stats.seconds += elapsed
                if not ok:
                    self.stats.errors += 1
            if self._on_query is not None:
                self._on_query(kind, elapsed, ok)
        if not isinstance(result, list) or (result and not matrix and not (
                isinstance(result[0], dict) and "value" in result[0])):
            raise QueryFailed(f"Prometheus at {self.url} returned a {type(result).__name__} "
                              "where an instant vector was expected")
        return result

    def retention_seconds(self) -> int | None:
        """The server's time-based retention in seconds (None when it cannot say).

        ``/api/v1/status/runtimeinfo`` gives the effective value ("15d", or "15d or
        10GiB" with a size limit too; only the time part is used). Thanos and Mimir
        do not serve it: None, and no window is marked incomplete.
        """
        try:
            resp = self._prom._session.get(f"{self.url}/api/v1/status/runtimeinfo",
                                           headers=self._prom.headers, timeout=10)
            resp.raise_for_status()
            value = str(resp.json()["data"].get("storageRetention", ""))
        except (requests.exceptions.RequestException, KeyError, ValueError, TypeError):
            return None
        return _duration_seconds(value.split(" or ")[0].strip())

    # -- plan ------------------------------------------------------------------

    def retention(self) -> int | None:
        """The server's retention in seconds, read at most every ``retention_ttl_seconds``."""
        now = time.monotonic()
        if self._retention is None or now - self._retention[0] > self._retention_ttl:
            self._retention = (now, self.retention_seconds())
        return self._retention[1]

    def series_count(self, rs: ResolvedSource, at: dt.datetime) -> int:
        """How many raw series a source's window query would read."""
        names = sorted({sel.metric for _, sel in rs.counters})
        text = f"count({{__name__=~{promql.quote('|'.join(names))}}})"
        items = self.query(text, at, "estimate")
        return int(_value(items[0])) if items else 0

    def last_recorded(self, rs: ResolvedSource, at: dt.datetime) -> dt.datetime | None:
        """When the source's recording rule last ran; None without fresh rules.

        Read from the raw samples of the last two hours (a range selector returns
        their true timestamps; ``timestamp()`` inside a subquery gives step times),
        and remembered until the next run is due, so most evaluations ask nothing.
        """
        step = promql.RULE_STEP_SECONDS
        cached = self._rule_times.get(rs)
        if cached is not None and cached[0] is not None and \
                cached[0] <= at < cached[0] + dt.timedelta(seconds=step + 60):
            return cached[0]
        if cached is not None and cached[0] is None and \
                (at - cached[1]).total_seconds() < 300:
            return None  # no rules: ask again in five minutes
        result: list[Any] = list(self.query(promql.last_recorded(rs), at, "estimate",
                                            matrix=True))
        try:
            stamps = [float(v[0]) for item in result for v in item.get("values", [])]
        except (AttributeError, TypeError, ValueError, IndexError) as exc:
            raise QueryFailed(f"Prometheus at {self.url} returned no range vector for "
                              f"{promql.rule_name(rs)}: {result!r:.200}") from exc
        when = dt.datetime.fromtimestamp(max(stamps), dt.UTC) if stamps else None
        if when is not None and (at - when).total_seconds() > 2 * step:
            when = None  # the rules stopped: their buckets would miss recent spend
        self._rule_times[rs] = (when, at)
        self._rule_labels[rs] = frozenset(
            k for item in result if isinstance(item.get("metric"), dict) for k in item["metric"])
        return when

    def kept_labels(self, rs: ResolvedSource, last: dt.datetime) -> frozenset[str]:
        """The labels of ``rules_keep_labels`` the installed rules are found to keep.

        The operator is told which labels the rules keep; a rules file generated
        without them would put every value's spend under an empty label (each
        person's allowance reading zero). So a label counts as kept unless raw
        series of the source carried it when the rules last ran while none of the
        recorded series of the last two runs does; such a label is dropped (its
        windows read the raw series) and logged. Checked once per rule run.
        """
        if not self.rules_keep_labels:
            return frozenset()
        checked = self._kept_checked.get(rs)
        if checked is not None and checked[0] == last:
            return checked[1]
        recorded = self._rule_labels.get(rs, frozenset())
        unsure = [x for x in self.rules_keep_labels if x not in recorded]
        carried: set[str] = set()
        if unsure:
            carried = {_labels(it).get(promql.KIND_LABEL, "")
                       for it in self.query(promql.carries(rs, tuple(unsure)), last, "estimate")}
        missing = sorted(carried)
        if missing:
            log.warning("the recording rule %s keeps no label %s, though the operator was told "
                        "it does (--rules-keep-label) and series of %s carry it: windows grouped "
                        "by it read the raw series; regenerate the rules with `tokenbudget rules "
                        "--keep-label`", promql.rule_name(rs), ", ".join(missing), rs.preset)
        found = frozenset(self.rules_keep_labels) - carried
        self._kept_checked[rs] = (last, found)
        return found

    def _read(self, rs: ResolvedSource, text: str, at: dt.datetime, kind: str,
              extra: tuple[str, ...] = ()) -> tuple[tuple[SpendSeries, ...], dict[str, Gap]]:
        """One spend query: its series and its gap rows."""
        items = self.query(text, at, kind)
        return to_series(rs, items, extra), gaps_of(rs, items)

    def read_spend(self, rs: ResolvedSource, seconds: float, at: dt.datetime, kind: str = "spend",
              extra: tuple[str, ...] = (), narrow: tuple[tuple[str, str], ...] = (),
              horizon: int | None = None, part: object = None) -> list[ResultItem]:
        """The exact spend of the ``seconds`` before ``at``, in two steps.

        First :func:`promql.common`: every group whose series all have a start value
        within the lookback and did not fall is read there, exactly. Then
        :func:`promql.spend` reads the (namespace, workload) pairs of the other groups
        (the rows tagged :data:`promql.UNCOMMON`, and any sum that is not finite: a
        counter holding NaN or an infinity, which the second step's reading refuses),
        narrowed to them; their rows of the first step are dropped. Together they are
        what :func:`promql.spend` returns for the whole source. When the pairs are
        too many to name in a selector, the whole source is read in one query
        instead, and so it is for the next :data:`DENSE_SECONDS` for that ``part``.
        """
        dense = (rs, kind, extra, narrow, horizon, part if part is not None else seconds)
        whole = promql.spend(rs, seconds, extra, horizon_seconds=horizon, narrow=narrow)
        if self._dense.get(dense, 0.0) > time.monotonic():
            return self.query(whole, at, kind)
        first = self.query(promql.common(rs, seconds, extra, narrow), at, kind)
        where = [_labels(it) for it in first
                 if _labels(it).get(promql.KIND_LABEL) == promql.UNCOMMON
                 or not _finite(it)]
        if not where:
            return first
        named = _naming(rs, where)
        if named is None:
            self._dense[dense] = time.monotonic() + DENSE_SECONDS
            return self.query(whole, at, kind)
        kept = [it for it in first if _labels(it).get(promql.KIND_LABEL) != promql.UNCOMMON
                and not _picks(named, _labels(it))]
        return kept + self.query(promql.spend(rs, seconds, extra, horizon_seconds=horizon,
                                              narrow=narrow + _matchers(named)), at, kind)

    def _part(self, rs: ResolvedSource, seconds: float, at: dt.datetime, now: dt.datetime,
              horizon: int, part: object, extra: tuple[str, ...] = ()
              ) -> tuple[tuple[SpendSeries, ...], dict[str, Gap]]:
        """A raw part of a window read through the rules: read once per evaluation (the
        windows share their tail), and kept while it lies wholly in the past and does not
        move (a calendar window's head, until the next rule run; a rolling window's head
        moves with every evaluation)."""
        def read() -> _Part:
            items = self.read_spend(rs, seconds, at, "spend", extra, horizon=horizon, part=part)
            return to_series(rs, items, extra), gaps_of(rs, items)

        # Settled once no sample will still arrive for it.
        settled = (now - at).total_seconds() >= max(60.0, 4 * self.scrape_interval_seconds)
        return self._once((rs, part), (rs, at, seconds, horizon, extra), read, settled)

    def _head(self, rs: ResolvedSource, seconds: float, end: dt.datetime, now: dt.datetime,
              horizon: int, part: object, extra: tuple[str, ...] = ()) -> _Part:
        """A rolling window's head, whose start moves every evaluation, from two levels
        (:mod:`token_budget.metrics.heads`): the end's, read once per rule run (kept once
        two reads agree, as the buckets), and the start's; the pairs that cannot be read so
        are read exactly, narrowed to them, or the whole head when they are too many to
        name. Prometheus's time for a head at 100,000 series: see ``bench/README.md``."""
        start_ms = _ms(end) - round(seconds * 1000)

        def read() -> _Part:
            ns, wl = rs.namespace_label, rs.workload_label
            labels = promql.group_labels(rs, extra)
            kinds = tuple(kind.value for kind, _ in rs.counters)

            def ends() -> heads.Ends:
                return heads.ends([(tag, self.query(q, end, "head end"))
                                   for tag, q in promql.levels(rs, extra, latest=True)],
                                  self.query(promql.head_checks(rs), end, "head end"),
                                  labels, kinds, ns, wl)

            found = self._once((rs, ("end", part)), (rs, end, "head end", extra), ends, True)
            at = dt.datetime.fromtimestamp(start_ms / 1000, dt.UTC)
            rows, pairs = heads.head(
                found, [(tag, self.query(q, at, "head")) for tag, q in promql.levels(rs, extra)],
                start_ms, ns, wl)
            exact: list[ResultItem] = []
            if pairs:
                named = _naming(rs, [{ns: p[0], wl: p[1]} for p in pairs])
                if named is None:
                    items = self.read_spend(rs, seconds, end, "spend", extra, horizon=horizon,
                                            part=part)
                    return to_series(rs, items, extra), gaps_of(rs, items)
                # The exact reading selects these too (the regexes' cross product).
                drop = {key for key in {r[0] for r in rows}
                        if _picks(named, dict(zip(labels, key, strict=True)))}
                rows = [r for r in rows if r[0] not in drop]
                exact = self.query(promql.spend(rs, seconds, extra, horizon_seconds=horizon,
                                                narrow=_matchers(named)), end, "spend")
            acc: dict[accruals.RowKey, dict[Kind, float]] = defaultdict(dict)
            keys: dict[heads.Key, accruals.RowKey] = {}
            for key, kind, value in rows:
                row = keys.get(key)
                if row is None:
                    row = keys[key] = _row_key(rs, dict(zip(labels, key, strict=True)), extra)
                acc[row][Kind(kind)] = value
            _add(acc, rs, exact, extra)
            return _fold(rs, acc), gaps_of(rs, exact)

        return self._once((rs, part), (rs, end, seconds, horizon, extra), read, False)

    def _recorded(self, rs: ResolvedSource, span: int, last: dt.datetime, part: object,
                  extra: tuple[str, ...] = ()) -> _Part:
        """The recorded buckets of a window, kept (once two reads agree) until the rule runs
        again or the window takes another bucket: read at the rule's last run, they cannot
        change before.
        Reading them every evaluation cost 0.5-0.7 s of Prometheus's time per window at
        20,000 series (a third of an evaluation once the raw parts were cheaper)."""
        text = promql.recorded(rs, span, extra)
        return self._once((rs, ("recorded", part)), (rs, last, text),
                          lambda: self._read(rs, text, last, "recorded", extra), True)

    def _once(self, slot: tuple[ResolvedSource, object], key: _PartKey,
              read: Callable[[], _T], settled: bool) -> _T:
        """``read()`` at most once per evaluation for each ``key`` (windows share parts), and
        a settled part, once two evaluations in a row read the same, not again while its
        ``slot`` (a window's head, say) keeps the key."""
        kept = self._kept.get(slot)
        if kept is not None and kept[0] == key:
            self._parts[slot] = kept
            return cast(_T, kept[1])
        found = self._fresh.get(key)
        if found is None:
            found = self._fresh[key] = read()
        if settled:
            # Kept once two reads in a row agree, never after one: a read can be incomplete
            # and still succeed (two Prometheus replicas behind one Service, one not done
            # with the rule run the other has; a Thanos partial response), and kept it
            # would under-read until the rule runs again, up to an hour (found by review).
            if self._unconfirmed.get(slot) == (key, found):
                self._parts[slot] = (key, found)
            else:
                self._reads[slot] = (key, found)
        return found

    def _from_rules(self, rs: ResolvedSource, seconds: int, now: dt.datetime,
                    last: dt.datetime, key: object = None, extra: tuple[str, ...] = ()
                    ) -> tuple[tuple[SpendSeries, ...], dict[str, Gap]]:
        """A long window as hourly recorded buckets plus the raw series at both ends.

        ::

            start        first bucket's start        last rule run        now
              |-- raw --|======= recorded hourly buckets =======|-- raw --|

        Each recorded sample at T covers (T - 1h, T]; the raw parts are shorter
        than an hour, so a 30-day window reads 720 samples a series, not 172,800.
        """
        step = promql.RULE_STEP_SECONDS
        # The raw parts join the buckets, which bridge gaps as far back as this: with the
        # same horizon the parts tile, and a gap across a join is counted once.
        horizon = promql.MAX_HORIZON_SECONDS
        start = now - dt.timedelta(seconds=seconds)
        buckets = int((last - start).total_seconds() // step)  # (T - 1h, T] inside the window
        parts: list[tuple[tuple[SpendSeries, ...], dict[str, Gap]]] = []
        if buckets >= 1:
            first_start = last - dt.timedelta(seconds=buckets * step)
            # Samples at last, last - 1h, ...; +1 s takes the oldest one whether range
            # selectors are closed (Prometheus 2) or left-open (Prometheus 3).
            span = (buckets - 1) * step + 1
            parts.append(self._recorded(rs, span, last, key, extra))
        else:
            first_start = last
        # The raw parts meet the buckets to the millisecond (Prometheus's precision; rules
        # run at a hash-chosen phase such as :31:25.512): a range rounded to whole seconds
        # took the sample just before the window's start as the head's start value, one
        # scrape's spend too much for every series whose sample lay within that second.
        head = (_ms(first_start) - (_ms(now) - round(seconds * 1000))) / 1000
        if head > 0:
            moves = isinstance(key, WindowKey) and not key.is_calendar
            parts.append((self._head if moves else self._part)(
                rs, head, first_start, now, horizon, ("head", key), extra))
        # From the last rule run exactly: the bucket's last sample is the tail's start value.
        tail = (_ms(now) - _ms(last)) / 1000
        tail_series: tuple[SpendSeries, ...] = ()
        if tail > 0:
            parts.append(self._part(rs, tail, now, now, horizon, ("tail", extra), extra))
            tail_series = parts[-1][0]
        self._tails[(rs, extra)] = (_ms(last), tail_series)
        return _sum_series([p[0] for p in parts]), _sum_gaps([p[1] for p in parts])

    def collect(self, plan: Plan, now: dt.datetime) -> SpendSnapshot:
        """Run every query of the plan at ``now``; failures are recorded per source.

        The burn-rate reads run in a thread of their own beside the windows' reads: they
        share no part with them, and Prometheus answers two queries at once on two cores
        (a quiet evaluation of 1,000 budgets waited for three queries in a row). A source
        whose windows are read through the rules, with a tail kept from the burn-rate
        window's length ago, takes its burn rate from that tail and this evaluation's
        instead (:mod:`token_budget.metrics.accruals`): no query.
        """
        derive = {rs: old for rs in plan.sources if (old := self._accruals.before(
            (rs, plan.group_labels.get(rs, ())), now, plan.recent_seconds)) is not None
            # A target down since: the old tail took its last sample before the gap, and
            # the difference would put the gap's spend into the burn rate.
            and self._down_at.get(rs, _EPOCH) < old.at - dt.timedelta(seconds=60)}
        with concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="prometheus-recent") as pool:
            recent_reads = pool.submit(self._recent, plan, now, frozenset(derive))
            try:
                return self._collect(plan, now, recent_reads, derive)
            except BaseException as exc:
                # A programming error: the burn-rate reads are waited for (the next
                # collect must not overlap them) and their own failure is not lost.
                if not recent_reads.cancel():
                    failed = recent_reads.exception()
                    if failed is not None and failed is not exc:
                        log.error("the burn-rate reads failed too", exc_info=failed)
                raise

    def _recent(self, plan: Plan, now: dt.datetime,
                derived: frozenset[ResolvedSource] = frozenset()) -> _Recent:
        """Every source's spend over the burn-rate range (but those ``derived`` from their
        tails), and the sources that failed."""
        recent: dict[ResolvedSource, tuple[SpendSeries, ...]] = {}
        errors: dict[ResolvedSource, str] = {}
        alive: dict[ResolvedSource, frozenset[accruals.RowKey]] = {}
        for rs in plan.sources:
            try:
                if rs in derived:
                    extra = plan.group_labels.get(rs, ())
                    items = self.query(promql.alive(rs, plan.recent_seconds, extra,
                                                    plan.narrow.get(rs, ())), now, "alive")
                    alive[rs] = frozenset(_row_key(rs, _labels(it), extra) for it in items)
                else:
                    recent[rs] = self._read_recent(plan, rs, now)
            except MetricsError as exc:
                errors[rs] = str(exc)
        return recent, errors, alive

    def _read_recent(self, plan: Plan, rs: ResolvedSource, now: dt.datetime
                     ) -> tuple[SpendSeries, ...]:
        extra = plan.group_labels.get(rs, ())
        items = self.read_spend(rs, plan.recent_seconds, now, "recent", extra,
                                plan.narrow.get(rs, ()), part="recent")
        return to_series(rs, items, extra)

    def _derived(self, plan: Plan, now: dt.datetime,
                 derive: Mapping[ResolvedSource, accruals.Accrual],
                 alive: Mapping[ResolvedSource, frozenset[accruals.RowKey]],
                 recent: dict[ResolvedSource, tuple[SpendSeries, ...]],
                 errors: dict[ResolvedSource, str]) -> None:
        """The burn rates of ``derive`` from this evaluation's tails, or read when they do
        not make one (the rule ran since, a row fell); then this evaluation's tails kept."""
        for rs, old in derive.items():
            if rs in errors:
                continue
            extra = plan.group_labels.get(rs, ())
            tail = self._tails.get((rs, extra))
            try:
                found = None if tail is None or rs not in alive else accruals.derive(
                    old, tail[0], now, tail[1], plan.recent_seconds, alive[rs])
                if found is None:
                    recent[rs] = self._read_recent(plan, rs, now)
                    continue
                rows, new = found
                if new:
                    # Rows without an old tail are read by query, narrowed to their pairs.
                    named = _naming(rs, [{rs.namespace_label: k[0], rs.workload_label: k[1]}
                                         for k in new])
                    if named is None:
                        recent[rs] = self._read_recent(plan, rs, now)
                        continue
                    read = to_series(rs, self.read_spend(
                        rs, plan.recent_seconds, now, "recent", extra,
                        plan.narrow.get(rs, ()) + _matchers(named), part="recent"), extra)
                    rows = tuple(sorted(
                        [x for x in rows if not _picks(named, {rs.namespace_label: x.namespace,
                                                               rs.workload_label: x.workload})]
                        + list(read), key=accruals.row_key))
                recent[rs] = rows
                with self._stats_lock:
                    self.stats.derived_rates += 1
            except MetricsError as exc:
                errors[rs] = str(exc)
        if plan.recent_seconds + accruals.MAX_LAG_SECONDS < promql.RULE_STEP_SECONDS:
            for rs in plan.sources:
                tail = self._tails.get((rs, plan.group_labels.get(rs, ())))
                if tail is not None and rs not in errors:
                    self._accruals.add((rs, plan.group_labels.get(rs, ())), tail[0], now,
                                       tail[1], plan.recent_seconds)
        self._accruals.prune(now, plan.recent_seconds)

    def _collect(self, plan: Plan, now: dt.datetime,
                 recent_reads: concurrent.futures.Future[_Recent],
                 derive: Mapping[ResolvedSource, accruals.Accrual]) -> SpendSnapshot:
        windows: dict[Any, tuple[SpendSeries, ...]] = {}
        gaps: dict[Any, dict[str, Gap]] = {}
        errors: dict[ResolvedSource, str] = {}
        window_errors: dict[Any, str] = {}
        counts: dict[ResolvedSource, int] = {}
        rule_times: dict[ResolvedSource, dt.datetime | None] = {}
        self._kept, self._parts, self._fresh = self._parts, {}, {}
        self._unconfirmed, self._reads = self._reads, {}
        self._tails = {}
        for (rs, key), seconds in plan.windows.items():
            if rs in errors:
                continue
            extra = plan.labels_of(rs, key)
            own = {rs.namespace_label, rs.workload_label, rs.model_label}
            # Labels the window needs that the rules do not keep (told, then found).
            beyond = sorted(set(extra) - own - set(self.rules_keep_labels))
            try:
                if seconds > planner.RULES_MIN_SECONDS and not beyond:
                    if rs not in rule_times:
                        rule_times[rs] = self.last_recorded(rs, now)
                    last = rule_times[rs]
                    if last is not None:
                        kept = self.kept_labels(rs, last) if set(extra) - own else frozenset()
                        beyond = sorted(set(extra) - own - kept)
                        if not beyond:
                            windows[(rs, key)], gaps[(rs, key)] = self._from_rules(
                                rs, seconds, now, last, key, extra)
                            continue
                if seconds > planner.RULES_MIN_SECONDS and beyond and \
                        (rs, tuple(beyond)) not in self._said_raw:  # once, not per evaluation
                    self._said_raw.add((rs, tuple(beyond)))
                    log.info("%s: long windows grouped by %s read the raw series, as the "
                             "recording rules keep no such label (tokenbudget rules "
                             "--keep-label, --rules-keep-label)", rs.preset, ", ".join(beyond))
                if self.max_samples and seconds > 86400:
                    # Long windows only: a day of 15 s samples is 5,760 per series.
                    if rs not in counts:
                        counts[rs] = self.series_count(rs, now)
                    # What one range selector over the window holds at once: Prometheus
                    # limits the samples a query holds in memory, and reads each
                    # selector of the query in turn.
                    samples = counts[rs] * seconds / max(self.scrape_interval_seconds, 1.0)
                    if samples > self.max_samples:
                        window_errors[(rs, key)] = (
                            f"the {key} query would hold about {samples:,.0f} samples from "
                            f"{counts[rs]:,} series, more than the {self.max_samples:,} a "
                            "query may load: " + (
                                f"the recording rules keep no label {', '.join(beyond)}: "
                                "regenerate them with `tokenbudget rules --keep-label` and run "
                                "the operator with --rules-keep-label" if beyond else
                                "install the recording rules (rules/token-budget.rules.yaml)")
                            + " or raise --prometheus-max-samples")
                        continue
                items = self.read_spend(rs, seconds, now, "spend", extra, plan.narrow.get(rs, ()),
                                   part=key)
                windows[(rs, key)], gaps[(rs, key)] = (to_series(rs, items, extra),
                                                       gaps_of(rs, items))
            except MetricsError as exc:
                errors[rs] = str(exc)
        recent, failed, alive = recent_reads.result()
        for rs, message in failed.items():
            errors.setdefault(rs, message)  # a window's error first, as it came first
        self._derived(plan, now, derive, alive, recent, errors)
        recent = {rs: series for rs, series in recent.items() if rs not in errors}
        outcomes: dict[str, tuple[tuple[str, tuple[tuple[str, str], ...], float], ...]] = {}
        outcome_errors: dict[str, str] = {}
        for oq in plan.outcomes:
            seconds = next((v for (_, k), v in plan.windows.items() if k == oq.window),
                           None) or _fallback_seconds(oq.window, now)
            try:
                items = self.query(promql.outcomes(oq.metric, oq.namespace_label, seconds,
                                                   oq.group_labels), now, "outcome")
                outcomes[oq.key] = tuple(
                    (_labels(it).get(oq.namespace_label, ""),
                     tuple((k, _labels(it).get(k, "")) for k in oq.group_labels),
                     _value(it))
                    for it in items
                )
            except MetricsError as exc:
                outcome_errors[oq.key] = str(exc)
        retention = self.retention() if errors.keys() != set(plan.sources) else None
        down: dict[ResolvedSource, dict[str, str]] = {}
        if errors.keys() != set(plan.sources):
            try:
                down = self.down_targets([rs for rs in plan.sources if rs not in errors], now)
                for rs in down:
                    self._down_at[rs] = now
            except MetricsError as exc:
                for rs in plan.sources:
                    errors.setdefault(rs, str(exc))
        return SpendSnapshot(taken_at=now, windows=windows, recent=recent, down=down,
                             recent_seconds=plan.recent_seconds, errors=errors,
                             returned=_returned(windows, recent),
                             outcomes=outcomes, outcome_errors=outcome_errors,
                             window_errors=window_errors, retention_seconds=retention,
                             gaps={k: v for k, v in gaps.items() if v})


    def read_rate_limits(self, keys: Iterable[tuple[RateSource, int]], now: dt.datetime
                         ) -> tuple[dict[tuple[RateSource, int], tuple[RateSample, ...]],
                                    dict[tuple[RateSource, int], str]]:
        """Requests and 429 answers per (namespace, model), one query per (source, window).

        Returns the samples of every pair read and, for a pair that could not be
        read, why (the engine then starts no rate-limit reroute for it). A pair
        whose counters do not exist reads as no samples: no requests, nothing to
        judge. A model with 429 answers but no request series is dropped (the
        share needs both).
        """
        samples: dict[tuple[RateSource, int], tuple[RateSample, ...]] = {}
        errors: dict[tuple[RateSource, int], str] = {}
        for key in keys:
            rs, seconds = key
            try:
                items = self.query(promql.rate_limits(rs, seconds), now, "ratelimit")
                per: dict[tuple[str, str], list[float]] = {}
                for it in items:
                    labels = _labels(it)
                    row = per.setdefault((labels.get(rs.namespace_label, ""),
                                          labels.get(rs.model_label, "")), [0.0, 0.0])
                    tag = labels.get(promql.KIND_LABEL)
                    row[0 if tag == promql.RATE_REQUESTS else 1] += _value(it)
                samples[key] = tuple(
                    RateSample(ns, model, requests, min(limited, requests))
                    for (ns, model), (requests, limited) in sorted(per.items()) if requests > 0)
            except MetricsError as exc:
                errors[key] = str(exc)
        return samples, errors

    def down_targets(self, resolved: list[ResolvedSource], now: dt.datetime
                     ) -> dict[ResolvedSource, dict[str, str]]:
        """Per source, the namespaces whose series came from a scrape target that is
        down now, with the targets named.

        ``up == 0`` first (one small instant query; nothing more when every target
        answers), then, only for the down targets, which namespaces their series of
        the source named within :data:`DOWN_LOOKBACK_SECONDS`.
        """
        # Fresh samples only: a target dropped from the configuration by a reload keeps
        # its last `up` for the lookback (Prometheus 2.42 writes no staleness marker then).
        fresh = max(60, int(4 * self.scrape_interval_seconds))
        items = self.query(f"(up == 0) unless on (job, instance) "
                           f"(timestamp(up) < time() - {fresh})", now, "targets")
        targets = sorted({(_labels(it).get("job", ""), _labels(it).get("instance", ""))
                          for it in items})
        if not targets:
            return {}
        instances = promql.quote("|".join(planner.re_literal(i) for _, i in targets))
        jobs = promql.quote("|".join(sorted({planner.re_literal(j) for j, _ in targets})))
        named = ", ".join(f"{j}/{i}" for j, i in targets[:5]) + \
            (f" and {len(targets) - 5} more" if len(targets) > 5 else "")
        out: dict[ResolvedSource, dict[str, str]] = {}
        for rs in resolved:
            metrics = promql.quote("|".join(rs.metrics))
            text = (f"count by ({rs.namespace_label}) (last_over_time({{__name__=~{metrics}, "
                    f"job=~{jobs}, instance=~{instances}}}[{DOWN_LOOKBACK_SECONDS}s]) "
                    f"and on (job, instance) ((up == 0) unless on (job, instance) "
                    f"(timestamp(up) < time() - {fresh})))")
            for it in self.query(text, now, "targets"):
                ns = _labels(it).get(rs.namespace_label, "")
                out.setdefault(rs, {})[ns] = f"scrape target(s) down (up == 0): {named}"
        return out


#: How long a range whose second step could not be narrowed is read in one query.
DENSE_SECONDS = 600.0


def _matchers(named: Mapping[str, set[str]]) -> tuple[tuple[str, str], ...]:
    """Regex matchers selecting the values :func:`_naming` found."""
    return tuple((k, "|".join(sorted(planner.re_literal(x) for x in v)))
                 for k, v in named.items())


def _picks(named: Mapping[str, set[str]], labels: Mapping[str, str]) -> bool:
    """Whether the matchers of ``named`` select a series with ``labels``."""
    return all(labels.get(k, "") in v for k, v in named.items())


def _naming(rs: ResolvedSource, where: list[Mapping[str, str]]) -> dict[str, set[str]] | None:
    """The values of the namespace and workload labels of ``where``, per label whose regex
    is short enough to send; None when neither is. Selecting them keeps every pair of
    ``where`` (and perhaps more: the second step reads those whole as well)."""
    out = {}
    for label in dict.fromkeys((rs.namespace_label, rs.workload_label)):
        values = {w.get(label, "") for w in where}
        if len("|".join(planner.re_literal(v) for v in values)) <= planner.MAX_NARROW_CHARS:
            out[label] = values
    return out or None


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _row_key(rs: ResolvedSource, labels: Mapping[str, str], extra: tuple[str, ...]
             ) -> accruals.RowKey:
    """The (namespace, workload, model, extra labels) a result row is folded into."""
    return (labels.get(rs.namespace_label, ""), labels.get(rs.workload_label, ""),
            labels.get(rs.model_label, ""), tuple((x, labels.get(x, "")) for x in extra))


def _ms(t: dt.datetime) -> int:
    """A time in milliseconds, as a query's ``time`` parameter sends it."""
    return round(t.timestamp() * 1000)


def _finite(item: Any) -> bool:
    try:
        return math.isfinite(float(item["value"][1]))
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise QueryFailed(f"malformed sample in Prometheus result: {item!r}") from exc


#: How far back a down target's series are linked to namespaces: a target down for longer
#: has no series left to say whose spend it exported (pods of a per-pod source that still
#: run then say it; see the engine).
DOWN_LOOKBACK_SECONDS = 3600


def _fallback_seconds(window: Any, now: dt.datetime) -> int:
    from token_budget.policy import windows as w

    return w.range_seconds(window, now)


def _labels(item: Any) -> Mapping[str, str]:
    labels = item.get("metric") if isinstance(item, Mapping) else None
    if not isinstance(labels, Mapping):
        raise QueryFailed(f"malformed sample in Prometheus result: {item!r}")
    return labels


def _value(item: Mapping[str, Any]) -> float:
    try:
        value = float(item["value"][1])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise QueryFailed(f"malformed sample in Prometheus result: {item!r}") from exc
    if math.isnan(value) or math.isinf(value):
        raise InvalidValue(f"series {item.get('metric', {})} has value {value}: "
                           "spend must be a finite number")
    return value


def to_series(rs: ResolvedSource, items: list[ResultItem],
              extra: tuple[str, ...] = ()) -> tuple[SpendSeries, ...]:
    """Fold a tagged spend result into one SpendSeries per (namespace, workload, model, extra).

    The gap rows of the result (see :func:`gaps_of`) are left out. When the source's
    input counter includes the cached input (``rs.cached_in_input``), input is read as
    input minus cached, so each token is counted and priced once.
    """
    acc: dict[accruals.RowKey, dict[Kind, float]] = defaultdict(dict)
    _add(acc, rs, items, extra)
    return _fold(rs, acc)


def _add(acc: dict[accruals.RowKey, dict[Kind, float]], rs: ResolvedSource,
         items: list[ResultItem], extra: tuple[str, ...]) -> None:
    """Add a tagged spend result's figures to ``acc``, per row and kind."""
    for item in items:
        labels = _labels(item)
        tag = labels.get(promql.KIND_LABEL, "")
        if tag in _GAP_TAGS:
            continue
        try:
            kind = Kind(tag)
        except ValueError as exc:
            raise QueryFailed(f"result series without a {promql.KIND_LABEL} tag: {labels}") from exc
        key = _row_key(rs, labels, extra)
        acc[key][kind] = acc[key].get(kind, 0.0) + _value(item)


def _fold(rs: ResolvedSource, acc: Mapping[accruals.RowKey, Mapping[Kind, float]]
          ) -> tuple[SpendSeries, ...]:
    """One SpendSeries per row of ``acc``, sorted."""
    out = []
    for (ns, workload, model, extra_labels), kinds in sorted(acc.items()):
        cost = kinds.get(Kind.COST)
        cached = kinds.get(Kind.CACHED_INPUT, 0.0)
        input_tokens = kinds.get(Kind.INPUT, 0.0)
        if rs.cached_in_input:
            # Each request's cached tokens are part of its input (Envoy AI Gateway), so the
            # increases nest; max() only guards a reset's extrapolation in one of the two.
            input_tokens = max(0.0, input_tokens - cached)
        out.append(SpendSeries(
            namespace=ns, workload=workload, model=model,
            input_tokens=input_tokens,
            output_tokens=kinds.get(Kind.OUTPUT, 0.0),
            cached_input_tokens=cached,
            cost=Decimal(repr(cost)) if cost is not None else None,
            labels=extra_labels,
        ))
    return tuple(out)


_GAP_TAGS = {promql.GAP_BRIDGED: 0, promql.GAP_UNKNOWN: 1}


def gaps_of(rs: ResolvedSource, items: list[ResultItem]) -> dict[str, Gap]:
    """The gap rows of a spend result: per namespace, series whose start was bridged
    across a scrape gap and series whose start was unknown."""
    out: dict[str, list[int]] = {}
    for item in items:
        labels = _labels(item)
        i = _GAP_TAGS.get(labels.get(promql.KIND_LABEL, ""))
        if i is not None:
            counts = out.setdefault(labels.get(rs.namespace_label, ""), [0, 0])
            counts[i] += int(_value(item))
    return {ns: Gap(bridged=b, unknown=u) for ns, (b, u) in out.items()}


def _sum_gaps(parts: list[dict[str, Gap]]) -> dict[str, Gap]:
    out: dict[str, Gap] = {}
    for part in parts:
        for ns, g in part.items():
            out[ns] = out[ns] + g if ns in out else g
    return out


def _sum_series(parts: list[tuple[SpendSeries, ...]]) -> tuple[SpendSeries, ...]:
    acc: dict[tuple[str, str, str, tuple[tuple[str, str], ...]], SpendSeries] = {}
    for part in parts:
        for x in part:
            key = (x.namespace, x.workload, x.model, x.labels)
            y = acc.get(key)
            if y is None:
                acc[key] = x
                continue
            cost = None if x.cost is None and y.cost is None else \
                (x.cost or Decimal(0)) + (y.cost or Decimal(0))
            acc[key] = SpendSeries(x.namespace, x.workload, x.model,
                                   x.input_tokens + y.input_tokens,
                                   x.output_tokens + y.output_tokens,
                                   x.cached_input_tokens + y.cached_input_tokens, cost, x.labels)
    return tuple(acc[k] for k in sorted(acc))


def _broke_before_answer(exc: requests.exceptions.ConnectionError) -> bool:
    """True when a connection broke before an answer (aborted, reset, garbled status line).

    Not for a refused or timed-out connection: those are urllib3's other errors."""
    cause = exc.args[0] if exc.args else None
    if isinstance(cause, MaxRetryError):
        cause = cause.reason
    return isinstance(cause, ProtocolError)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def _duration_seconds(text: str) -> int | None:
    """Prometheus durations such as ``15d``, ``1y``, ``2w3d``."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    total = 0.0
    num = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit():
            num += ch
            i += 1
            continue
        unit = text[i:i + 2] if text[i:i + 2] == "ms" else ch
        if not num or unit not in units:
            return None
        total += int(num) * units[unit]
        num = ""
        i += len(unit)
    return int(total) if total and not num else None


def _returned(windows: Mapping[Any, tuple[SpendSeries, ...]],
              recent: Mapping[ResolvedSource, tuple[SpendSeries, ...]]
              ) -> dict[ResolvedSource, inputs.SourceSample]:
    """Per source, how many series its queries returned and a few namespace-label values."""
    found: dict[ResolvedSource, set[tuple[str, str, str, tuple[tuple[str, str], ...]]]] = {}
    parts = [(rs, series) for (rs, _), series in windows.items()] + list(recent.items())
    for rs, series in parts:
        keys = found.setdefault(rs, set())
        keys.update((s.namespace, s.workload, s.model, s.labels) for s in series)
    out = {}
    for rs, keys in found.items():
        values = sorted({k[0] for k in keys})
        out[rs] = inputs.SourceSample(
            series=len(keys), label=rs.namespace_label,
            values=tuple(values[:inputs.SAMPLE_VALUES]),
            more=max(0, len(values) - inputs.SAMPLE_VALUES))
    return out
