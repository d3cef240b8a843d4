"""The ``tokenbudget`` command.

Subcommands:
  crds       print the CustomResourceDefinitions generated from the models
  validate   check manifests against the schema and the cross-field rules
  simulate   evaluate budgets against a spend snapshot, offline
  gateway    print, apply or check an LLM proxy's configuration (LiteLLM)
  run        run the operator (see ``token_budget.handlers``)

Everything here is thin: parse arguments, read files, call the layers below,
print. Exit status 1 means "your input is wrong", 2 "usage".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pydantic
import yaml

from token_budget import __version__
from token_budget.api import crds, rules, schema
from token_budget.api import v1alpha1 as api
from token_budget.api.types import parse_window
from token_budget.errors import MetricsError
from token_budget.metrics import files
from token_budget.policy import costs, engine, planner
from token_budget.policy.catalog import Catalog
from token_budget.policy.decisions import Evaluation
from token_budget.policy.engine import World
from token_budget.policy.workloads import workload_of
from token_budget.reports import tables


@dataclass(frozen=True)
class Document:
    path: Path
    index: int
    body: dict[str, Any]

    @property
    def where(self) -> str:
        meta = self.body.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        name = meta.get("name") or meta.get("generateName") or "?"
        ns = meta.get("namespace")
        obj = f"{self.body.get('kind', '?')} {ns + '/' if ns else ''}{name}"
        return f"{self.path}#{self.index} ({obj})"


def _files(paths: Iterable[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(x for x in p.rglob("*") if x.suffix in (".yaml", ".yml", ".json"))
        else:
            out.append(p)
    return out


class _Loader(yaml.SafeLoader):
    """YAML as kubectl reads it for the API: timestamps stay strings, duplicate keys refused.

    PyYAML turns an unquoted ``2025-07-01`` into a date, which no JSON (and so no
    API server) ever sees; the API server sees the text and checks its format.
    Strict field validation refuses a key given twice; PyYAML would keep the last.
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate field {key!r}: a field may be given only once",
                key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_documents(paths: Iterable[str]) -> tuple[list[Document], list[str]]:
    """Every YAML/JSON document under ``paths``; unreadable files as error lines."""
    docs: list[Document] = []
    errors: list[str] = []
    for path in _files(paths):
        try:
            for i, body in enumerate(yaml.load_all(path.read_text(), Loader=_Loader)):
                if body is None:
                    continue
                if not isinstance(body, dict):
                    errors.append(f"{path}#{i}: must be a mapping (a Kubernetes object)")
                    continue
                docs.append(Document(path, i, body))
        except (OSError, yaml.YAMLError) as exc:
            errors.append(f"{path}: cannot be read: {exc}")
    return docs, errors


def _ours(doc: Document) -> bool:
    return schema.ours(doc.body)


# ---------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------


def validate(paths: Sequence[str], out: TextIO, catalogs: Sequence[str] = (),
             as_json: bool = False) -> int:
    """``tokenbudget validate``: the cluster's verdict on creating each object, offline.

    The API server's part (kind, metadata, the CRD schema with its CEL rules:
    :func:`schema.check`), then the validating webhook's (the same
    :mod:`rules` functions it calls), with the catalogs of ``paths`` and of
    ``catalogs`` (ModelCatalogs already in the cluster) for cross-object rules.
    Objects of other APIs are skipped; a file or directory without any object
    is itself a problem (a typo in a path must not pass CI).
    """
    docs, errors = load_documents(paths)
    context, context_errors = load_documents(catalogs)
    errors += context_errors
    if not docs and not errors:
        errors.append(f"{', '.join(paths)}: must hold at least one object; found none")
    problems: dict[str, list[str]] = {}
    parsed: list[tuple[Document, Any]] = []
    checked = 0
    for doc in docs:
        if not _ours(doc):
            continue
        checked += 1
        result = schema.check(doc.body)
        found = result.problems or rules.schema_problems(result.body)
        if found:
            problems[doc.where] = [str(p) for p in found]
            continue
        parsed.append((doc, api.parse(result.body)))
    catalog_models = [m for _, o in parsed if isinstance(o, api.ModelCatalog)
                      for m in o.spec.models]
    for doc in context:  # as read back from the cluster: metadata and status are not ours
        if doc.body.get("kind") == "ModelCatalog":
            try:
                catalog_models += api.ModelCatalogSpec.model_validate(doc.body["spec"]).models
            except (KeyError, pydantic.ValidationError) as exc:
                errors.append(f"{doc.where}: cannot be used as a catalog: {exc}")
    for doc, obj in parsed:
        found = rules.problems(obj, catalog_models if catalog_models else None)
        if found:
            problems[doc.where] = [str(p) for p in found]
    if as_json:
        json.dump({"errors": errors, "checked": checked,
                   "invalid": [{"object": where, "file": str(doc.path), "index": doc.index,
                                "problems": problems[where]}
                               for doc in docs if (where := doc.where) in problems]},
                  out, indent=2)
        print(file=out)
        return 1 if errors or problems else 0
    for e in errors:
        print(e, file=out)
    for where, found_lines in problems.items():
        for line in found_lines:
            print(f"{where}: {line}", file=out)
    if errors or problems:
        print(f"{len(errors) + len(problems)} problem object(s) of {checked} checked", file=out)
        return 1
    print(f"{checked} object(s) valid", file=out)
    return 0


# ---------------------------------------------------------------------------
# simulate
# ---------------------------------------------------------------------------


def world_from(docs: Iterable[Document], memory: dict[Any, Any] | None = None) -> World:
    """Budgets, catalogs, namespaces and workloads found in manifests."""
    budgets: list[api.Budget] = []
    catalogs: list[api.ModelCatalog] = []
    namespaces: dict[str, dict[str, str]] = {}
    workloads = []
    for doc in docs:
        body = doc.body
        if _ours(doc):
            obj = api.parse(body)
            if isinstance(obj, api.ModelCatalog):
                catalogs.append(obj)
            else:
                budgets.append(obj)
        elif body.get("kind") == "Namespace":
            meta = body.get("metadata") or {}
            namespaces[meta["name"]] = dict(meta.get("labels") or {})
        else:
            w = workload_of(body)
            if w is not None:
                workloads.append(w)
    for b in budgets:
        if isinstance(b, api.TokenBudget):
            namespaces.setdefault(b.metadata.namespace or "default", {})
    for w in workloads:
        namespaces.setdefault(w.key.namespace, {})
    return World(budgets=budgets, catalog=Catalog(catalogs), namespaces=namespaces,
                 workloads=workloads, memory=memory or {})


def print_evaluation(result: Evaluation, world: World, out: TextIO) -> None:
    rows = [["BUDGET", "SCOPE", "WINDOW", "SPEND", "LIMIT", "USED", "STATE", "REASON"]]
    for d in result.decisions:
        scope = ",".join(d.namespaces) or "-"
        if not d.windows:
            rows.append([str(d.scope.budget), scope, "-", "?", "?", "?", d.state.value, d.reason])
        for w in d.windows:
            spend, limit = engine.describe(w, world.catalog.currency)
            window = w.window + (f"@{w.time_zone}" if w.resets_at else "") + \
                (f" ({w.model})" if w.model else "")
            rows.append([str(d.scope.budget), scope, window, spend, limit,
                         f"{w.used_percent:.1f}%", d.state.value, d.reason])
    tables.render(rows, out)
    if result.directives:
        print(file=out)
        rows = [["WORKLOAD", "STATE", "BUDGET", "MODEL", "TOKENS/MIN", "ALLOWED"]]
        for key, dr in sorted(result.directives.items()):
            rows.append([str(key), dr.state.value, dr.budget, dr.model or "-",
                         str(dr.tokens_per_minute or "-"),
                         ",".join(sorted(dr.allowed_models)) if dr.allowed_models is not None
                         else "*"])
        tables.render(rows, out)
    for d in result.decisions:
        print(f"{d.scope}: {d.state.value} ({d.reason}) {d.message}", file=out)


def simulate(budget_paths: Sequence[str], spend: str, at: dt.datetime, out: TextIO,
             as_json: bool = False) -> int:
    docs, errors = load_documents(budget_paths)
    if errors:
        for e in errors:
            print(e, file=sys.stderr)
        return 1
    bad = [(d, p) for d in docs if _ours(d) for p in rules.schema_problems(d.body)]
    if bad:
        for d, p in bad:
            print(f"{d.where}: {p}", file=sys.stderr)
        return 1
    world = world_from(docs)
    plan = planner.plan(world.budgets, at)
    try:
        snapshot = files.load(Path(spend), plan, at)
        snapshot = files.load_costs(Path(spend), costs.plan(
            world.budgets, world.catalog, at, snapshot.recent_seconds), snapshot)
    except (MetricsError, OSError) as exc:
        print(f"tokenbudget simulate: {exc}", file=sys.stderr)
        return 1
    result = engine.evaluate(world, snapshot, at)
    if as_json:
        json.dump(evaluation_json(result), out, indent=2, default=str)
        print(file=out)
    else:
        print_evaluation(result, world, out)
    return 0


def evaluation_json(result: Evaluation) -> dict[str, Any]:
    return {
        "decisions": [
            {"budget": str(d.scope.budget), "kind": d.scope.budget.kind,
             "namespaces": list(d.namespaces), "state": d.state.value, "reason": d.reason,
             "message": d.message,
             "windows": [{"window": w.window, "timeZone": w.time_zone, "model": w.model,
                          "tokens": w.tokens, "cost": str(w.cost),
                          "limitTokens": w.limit_tokens,
                          "limitCost": str(w.limit_cost) if w.limit_cost is not None else None,
                          "usedPercent": float(round(w.used_percent, 2)),
                          "runOut": w.run_out.isoformat() if w.run_out else None}
                         for w in d.windows]}
            for d in result.decisions
        ],
        "directives": {
            str(k): {"state": v.state.value, "budget": v.budget, "model": v.model,
                     "tokensPerMinute": v.tokens_per_minute,
                     "allowedModels": sorted(v.allowed_models)
                     if v.allowed_models is not None else None}
            for k, v in sorted(result.directives.items())
        },
    }


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def _duration(text: str) -> int:
    try:
        value = parse_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not isinstance(value, int):
        raise argparse.ArgumentTypeError(f"{text!r} must be a duration such as 30d or 1h")
    return value


def _time(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an RFC 3339 time") from exc
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenbudget", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"tokenbudget {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("crds", help="print the CRDs generated from the API models")
    c.add_argument("--out-dir", help="write one file per CRD into this directory instead")

    ru = sub.add_parser("rules", help="print the Prometheus recording rules for long windows")
    ru.add_argument("--out", help="write the rules file here instead")
    ru.add_argument("--keep-label", action="append", default=[], metavar="LABEL",
                    help="also keep this label in the hourly buckets (repeatable), so budgets "
                    "partitioned or matched on it read the rules; run the operator with the "
                    "same --rules-keep-label")

    v = sub.add_parser("validate", help="check manifests (files or directories) as the "
                       "cluster would: API server, CRD schema and the operator's webhook")
    v.add_argument("paths", nargs="+")
    v.add_argument("--catalog", action="append", default=[], metavar="PATH",
                   help="ModelCatalogs already in the cluster, for the cross-object rules "
                   "(reroute targets); not themselves reported")
    v.add_argument("-o", "--output", choices=("text", "json"), default="text")

    s = sub.add_parser("simulate", help="evaluate budgets against a spend snapshot, offline")
    s.add_argument("--budgets", nargs="+", required=True,
                   help="manifests: budgets, catalogs, namespaces, workloads")
    s.add_argument("--spend", required=True, help="JSON snapshot or Prometheus text exposition")
    s.add_argument("--at", type=_time, default=None, help="evaluation time (RFC 3339); now")
    s.add_argument("-o", "--output", choices=("table", "json"), default="table")

    st = sub.add_parser("status", help="a table of budgets in the cluster (kubeconfig)")
    st.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    st.add_argument("-n", "--namespace", help="only TokenBudgets of this namespace")
    st.add_argument("--kubeconfig", default=None)

    for name, helptext in (("report", "spend by namespace, budget, model and workload"),
                           ("backtest", "replay a budget against Prometheus history")):
        rp = sub.add_parser(name, help=helptext)
        rp.add_argument("--prometheus-url", default=os.environ.get(
            "TOKENBUDGET_PROMETHEUS_URL", "http://localhost:9090"))
        rp.add_argument("--since", type=_duration, default=30 * 86400,
                        help="how far back (30d, 24h, ...)")
        rp.add_argument("--at", type=_time, default=None, help="end of the period; now")
        rp.add_argument("--catalog", nargs="*", default=None,
                        help="ModelCatalog manifests; default: the cluster's")
        rp.add_argument("--kubeconfig", default=None)
        if name == "report":
            rp.add_argument("--budgets", nargs="*", default=None,
                            help="budget and namespace manifests; default: the cluster's")
            rp.add_argument("-o", "--output", choices=("table", "json", "csv"),
                            default="table")
            rp.add_argument("--html", help="also write an HTML report with charts here")
            rp.add_argument("--top", type=int, default=None,
                            help="partitioned budgets: how many values (people) to list, "
                            "most spent first; default: each budget's statusTop")
        else:
            rp.add_argument("--budget", required=True, help="the budget manifest to replay")
            rp.add_argument("--step", type=_duration, default=3600, help="1h, 15m, ...")
            rp.add_argument("--namespaces", nargs="*", default=None,
                            help="Namespace manifests (labels for a ClusterTokenBudget); "
                            "default: the cluster's")
            rp.add_argument("-o", "--output", choices=("table", "json"), default="table")

    _gateway_parser(sub)

    r = sub.add_parser("run", help="run the operator")
    from token_budget.settings import add_arguments

    add_arguments(r)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "crds":
        all_crds = crds.all_crds()
        if args.out_dir:
            out = Path(args.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            for name, body in all_crds.items():
                (out / name).write_text(dump_yaml(body))
            return 0
        sys.stdout.write("---\n".join(dump_yaml(b) for b in all_crds.values()))
        return 0
    if args.command == "rules":
        from token_budget.metrics import promql
        from token_budget.policy import sources

        keep = tuple(dict.fromkeys(args.keep_label))
        kept = f" and {', '.join(keep)}" if keep else ""
        text = ("# Generated by `tokenbudget rules` (make crds): hourly spend per namespace,\n"
                f"# workload, model{kept} and kind for every preset. Load it into Prometheus\n"
                "# and the operator reads long windows from it" + (
                    f" (run it with --rules-keep-label {' --rules-keep-label '.join(keep)})"
                    if keep else "") + ".\n" + dump_yaml(promql.rules_file(
                    [sources.resolve(api.SpendSource(preset=p)) for p in api.Preset], keep)))
        if args.out:
            Path(args.out).write_text(text)
        else:
            sys.stdout.write(text)
        return 0
    if args.command == "validate":
        return validate(args.paths, sys.stdout, args.catalog, args.output == "json")
    if args.command == "simulate":
        at = args.at or dt.datetime.now(dt.UTC)
        return simulate(args.budgets, args.spend, at, sys.stdout, args.output == "json")
    if args.command == "status":
        return status(args, sys.stdout)
    if args.command in ("report", "backtest"):
        return report_or_backtest(args, sys.stdout)
    if args.command == "gateway":
        return gateway_litellm(args, sys.stdout)
    if args.command == "run":
        from token_budget.handlers import run
        from token_budget.settings import SettingsError

        try:
            return run(args)
        except SettingsError as exc:
            print(f"tokenbudget run: invalid settings: {exc}", file=sys.stderr)
            return 2
    return 2  # pragma: no cover - argparse enforces the choices


def status(args: argparse.Namespace, out: TextIO) -> int:
    from token_budget.kube import CLUSTERTOKENBUDGETS, TOKENBUDGETS, Kube, api_client

    kube = Kube(api_client(args.kubeconfig))
    items = kube.list(TOKENBUDGETS, args.namespace)
    if not args.namespace:
        items += kube.list(CLUSTERTOKENBUDGETS)
    if args.output == "json":
        json.dump([_status_row(b) for b in items], out, indent=2)
        print(file=out)
        return 0
    if args.output == "yaml":
        out.write(dump_yaml([_status_row(b) for b in items]))
        return 0
    rows = [["NAMESPACE", "NAME", "WINDOW", "SPEND", "LIMIT", "USED", "STATE", "RUN-OUT"]]
    for b in items:
        r = _status_row(b)
        rows.append([r["namespace"] or "*", r["name"], r["window"] or "-", r["spend"] or "-",
                     r["limit"] or "-", f"{r['usedPercent']}%" if r["usedPercent"] is not None
                     else "-", r["state"] or "-", r["runOut"] or "-"])
    if len(rows) == 1:
        print("no budgets", file=out)
        return 0
    tables.render(rows, out)
    return 0


def _status_row(b: dict[str, Any]) -> dict[str, Any]:
    st = b.get("status") or {}
    windows = st.get("windows") or []
    worst: dict[str, Any] = max(windows, key=lambda w: w.get("usedPercent", 0), default={})
    return {"kind": b.get("kind"), "namespace": b["metadata"].get("namespace"),
            "name": b["metadata"]["name"], "window": worst.get("window"),
            "spend": st.get("spend"), "limit": st.get("limit"),
            "usedPercent": st.get("usedPercent"), "state": st.get("state"),
            "reason": st.get("reason"), "runOut": st.get("projectedRunOutTime")}


def report_or_backtest(args: argparse.Namespace, out: TextIO) -> int:
    from token_budget.metrics.prometheus import PrometheusSource
    from token_budget.reports import backtest, spend

    at = args.at or dt.datetime.now(dt.UTC)
    source = PrometheusSource(args.prometheus_url)
    cluster: Any = None

    def from_cluster() -> Any:
        nonlocal cluster
        if cluster is None:
            from token_budget.kube import Kube, api_client

            cluster = Kube(api_client(args.kubeconfig))
        return cluster

    if args.catalog is not None:
        docs, errors = load_documents(args.catalog)
        catalogs = [api.ModelCatalog.model_validate(d.body) for d in docs
                    if d.body.get("kind") == "ModelCatalog"]
    else:
        from token_budget.kube import MODELCATALOGS

        catalogs = [api.ModelCatalog.model_validate(b) for b in from_cluster().list(MODELCATALOGS)]
    catalog = Catalog(catalogs)
    try:
        if args.command == "report":
            if args.budgets is not None:
                docs, errors = load_documents(args.budgets)
                world = world_from(docs)
                budgets, namespaces = list(world.budgets), dict(world.namespaces)
            else:
                from token_budget.kube import CLUSTERTOKENBUDGETS, NAMESPACES, TOKENBUDGETS

                k = from_cluster()
                budgets = [api.TokenBudget.model_validate(b) for b in k.list(TOKENBUDGETS)]
                budgets += [api.ClusterTokenBudget.model_validate(b)
                            for b in k.list(CLUSTERTOKENBUDGETS)]
                namespaces = {n["metadata"]["name"]: n["metadata"].get("labels") or {}
                              for n in k.list(NAMESPACES)}
            rep = spend.build(source, budgets, catalog, namespaces, args.since, at,
                              top=args.top)
            if args.html:
                Path(args.html).write_text(spend.html(rep))
            if args.output == "json":
                json.dump(rep.to_json(), out, indent=2)
                print(file=out)
            elif args.output == "csv":
                out.write(spend.to_csv(rep))
            else:
                out.write(spend.table(rep))
            return 0
        docs, errors = load_documents([args.budget])
        if errors:
            for e in errors:
                print(e, file=sys.stderr)
            return 1
        found = [d for d in docs if d.body.get("kind") in ("TokenBudget", "ClusterTokenBudget")]
        if len(found) != 1:
            print(f"{args.budget}: must hold exactly one TokenBudget or ClusterTokenBudget",
                  file=sys.stderr)
            return 1
        problems = rules.schema_problems(found[0].body)
        if problems:
            for p in problems:
                print(f"{found[0].where}: {p}", file=sys.stderr)
            return 1
        budget = api.parse(found[0].body)
        if args.namespaces is not None:
            ndocs, _ = load_documents(args.namespaces)
            namespaces = {d.body["metadata"]["name"]: d.body["metadata"].get("labels") or {}
                          for d in ndocs if d.body.get("kind") == "Namespace"}
        elif isinstance(budget, api.TokenBudget):
            namespaces = {budget.metadata.namespace or "default": {}}
        else:
            from token_budget.kube import NAMESPACES

            namespaces = {n["metadata"]["name"]: n["metadata"].get("labels") or {}
                          for n in from_cluster().list(NAMESPACES)}
        if isinstance(budget, api.TokenBudget):
            namespaces.setdefault(budget.metadata.namespace or "default", {})
        bt = backtest.run(source, budget, catalog, namespaces, args.since,  # type: ignore[arg-type]
                          args.step, at)
        if args.output == "json":
            json.dump(bt.to_json(), out, indent=2)
            print(file=out)
        else:
            out.write(backtest.table(bt))
        return 0
    except MetricsError as exc:
        print(f"tokenbudget {args.command}: {exc}", file=sys.stderr)
        return 1

# ---------------------------------------------------------------------------
# gateway
# ---------------------------------------------------------------------------

#: The field manager of ``gateway litellm --apply`` (server-side apply).
FIELD_MANAGER = "tokenbudget"


class _InputError(Exception):
    """A problem with the command's input, printed as is; exit status 1."""


def _assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"{text!r} must be KEY=VALUE")
    return key, value


def _gateway_parser(sub: Any) -> None:
    g = sub.add_parser("gateway", help="print, apply or check an LLM proxy's configuration, "
                       "so that it routes every model a budget can reroute to")
    proxies = g.add_subparsers(dest="proxy", required=True)
    lp = proxies.add_parser(
        "litellm", help="the LiteLLM proxy's config.yaml from the ModelCatalogs",
        description="Print (default), apply to a ConfigMap (--apply) or check (--check) the "
        "LiteLLM proxy's config.yaml: a model_list entry for every catalog model (so every "
        "equivalent a Reroute picks is routable), the token budget callback, and LiteLLM's "
        "metrics labelled by caller as the LiteLLM preset reads them. Merges into an existing "
        "config: the user's other keys and entries are kept.")
    lp.add_argument("--catalog", action="append", default=None, metavar="PATH",
                    help="ModelCatalog manifests (files or directories); default: the "
                    "cluster's ModelCatalogs, merged as the operator merges them")
    lp.add_argument("--catalog-name", action="append", default=None, metavar="NAME",
                    help="only these ModelCatalogs of the cluster")
    lp.add_argument("--kubeconfig", default=None)
    lp.add_argument("--upstream", action="append", default=[], type=_assignment,
                    metavar="PROVIDER=URL", help="the api_base of the models whose catalog "
                    "provider is PROVIDER (* for any)")
    lp.add_argument("--params", metavar="PATH", help="YAML: catalog provider (or *) to a "
                    "litellm_params template, {name} and {provider} filled in; default "
                    "{model: <provider>/{name}} (google: gemini/{name})")
    lp.add_argument("--no-metrics", dest="metrics", action="store_false",
                    help="leave out LiteLLM's prometheus callback and the caller labels "
                    "(no budget reads the proxy's spend)")
    lp.add_argument("--directive-url", help="TOKENBUDGET_DIRECTIVE_BASE_URL, written into "
                    "the config's environment_variables")
    lp.add_argument("--ca-file", help="TOKENBUDGET_DIRECTIVE_CA_FILE, likewise")
    lp.add_argument("--env", action="append", default=[], type=_assignment,
                    metavar="NAME=VALUE", help="another environment_variables entry "
                    "(TOKENBUDGET_GATEWAY_REPLICAS=3)")
    lp.add_argument("--config", metavar="PATH", help="the proxy's current config.yaml, "
                    "merged into (printing) or checked (--check) instead of the ConfigMap")
    mode = lp.add_mutually_exclusive_group()
    mode.add_argument("--apply", action="store_true", help="create or update the ConfigMap "
                      "(server-side apply) and print what changed")
    mode.add_argument("--check", action="store_true", help="exit 1 listing where the "
                      "proxy's config and the catalogs disagree")
    lp.add_argument("-n", "--namespace", help="the ConfigMap's namespace (--apply, --check)")
    lp.add_argument("--configmap", default="litellm-config", help="the ConfigMap's name")
    lp.add_argument("--key", default="config.yaml", help="the ConfigMap's key")


def gateway_litellm(args: argparse.Namespace, out: TextIO) -> int:
    """``tokenbudget gateway litellm``: the proxy's config as the catalogs imply it.

    Printing merges into ``--config`` when given; ``--apply`` reads the
    ConfigMap, merges into its config and writes it (:func:`apply_litellm`);
    ``--check`` lists the drift of ``--config`` or of the ConfigMap
    (:func:`token_budget.proxies.litellm.drift`).
    """
    from token_budget.errors import EnforcementError
    from token_budget.proxies import litellm

    prog = "tokenbudget gateway litellm"
    if args.apply and args.config:
        print(f"{prog}: --apply writes the ConfigMap; --config is for printing and --check",
              file=sys.stderr)
        return 2
    if args.catalog is not None and args.catalog_name:
        print(f"{prog}: --catalog-name picks the cluster's catalogs; --catalog reads files "
              "instead: give one of them", file=sys.stderr)
        return 2
    if (args.apply or args.check) and not args.config and not args.namespace:
        print(f"{prog}: --apply and --check need the ConfigMap's -n/--namespace "
              "(or --check --config PATH)", file=sys.stderr)
        return 2
    environment = dict(args.env)
    if args.directive_url:
        environment["TOKENBUDGET_DIRECTIVE_BASE_URL"] = args.directive_url
    if args.ca_file:
        environment["TOKENBUDGET_DIRECTIVE_CA_FILE"] = args.ca_file
    try:
        catalogs = _gateway_catalogs(args)
        options = litellm.Options(params=_gateway_params(args.params),
                                  upstreams=dict(args.upstream), metrics=args.metrics,
                                  environment=environment)
        catalog = Catalog(catalogs)
        if args.apply:
            from token_budget.kube import Kube, api_client

            return apply_litellm(Kube(api_client(args.kubeconfig)), args.namespace,
                                 args.configmap, args.key, catalog, options, out)
        if args.check:
            if args.config:
                where, config = args.config, _proxy_config(_read_text(args.config), args.config)
            else:
                where, config = _configmap_config(args)
            found = litellm.drift(config or {}, catalog, args.metrics)
            for line in found:
                print(f"{where}: {line}", file=out)
            if found:
                print(f"{len(found)} disagreement(s) between {where} and the catalog",
                      file=out)
                return 1
            print(f"{where} agrees with the catalog: all {len(catalog.models)} models "
                  "routable", file=out)
            return 0
        existing = _proxy_config(_read_text(args.config), args.config) if args.config \
            else None
        merged = litellm.merge(existing, catalog, options)
    except (_InputError, litellm.ConfigError, EnforcementError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    out.write(_litellm_header(catalogs, merged) + dump_yaml(merged))
    return 0


def _gateway_catalogs(args: argparse.Namespace) -> list[api.ModelCatalog]:
    """The catalogs named by ``--catalog`` files or the cluster's, each valid."""
    found: list[api.ModelCatalog] = []
    problems: list[str] = []
    if args.catalog is not None:
        docs, errors = load_documents(args.catalog)
        problems += errors
        for doc in docs:
            if doc.body.get("kind") != "ModelCatalog" or not _ours(doc):
                continue
            bad = rules.schema_problems(doc.body)
            if bad:
                problems += [f"{doc.where}: {p}" for p in bad]
                continue
            cat = api.ModelCatalog.model_validate(doc.body)
            problems += [f"{doc.where}: {p}" for p in rules.problems(cat)]
            found.append(cat)
    else:
        from token_budget.kube import MODELCATALOGS, Kube, api_client

        names = set(args.catalog_name or ())
        for body in Kube(api_client(args.kubeconfig)).list(MODELCATALOGS):
            if names and body["metadata"]["name"] not in names:
                continue
            try:
                cat = api.ModelCatalog.model_validate(body)
            except pydantic.ValidationError as exc:
                problems.append(f"ModelCatalog {body['metadata']['name']}: {exc}")
                continue
            problems += [f"ModelCatalog {cat.metadata.name}: {p}" for p in rules.problems(cat)]
            found.append(cat)
        missing = names - {c.metadata.name for c in found}
        if missing:
            problems.append(f"no ModelCatalog named {', '.join(sorted(missing))} in the cluster")
    if problems:
        raise _InputError("the catalogs cannot be used:\n  " + "\n  ".join(problems))
    if not found:
        raise _InputError("found no ModelCatalog: give --catalog PATH or create one")
    return found


def _gateway_params(path: str | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return {}
    try:
        body = yaml.load(_read_text(path), Loader=_Loader)
    except yaml.YAMLError as exc:
        raise _InputError(f"{path}: cannot be read: {exc}") from exc
    if not isinstance(body, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) for k, v in body.items()):
        raise _InputError(f"{path}: must map catalog providers (or *) to litellm_params "
                          "mappings")
    return body


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise _InputError(f"{path}: cannot be read: {exc}") from exc


def _proxy_config(text: str, where: str) -> dict[str, Any] | None:
    """A config.yaml's mapping (None when empty)."""
    try:
        body = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise _InputError(f"{where}: is not YAML: {exc}") from exc
    if body is not None and not isinstance(body, dict):
        raise _InputError(f"{where}: must be a mapping (a LiteLLM config)")
    return body


def _configmap_config(args: argparse.Namespace) -> tuple[str, dict[str, Any] | None]:
    from token_budget.errors import TargetNotFound
    from token_budget.kube import Kube, api_client

    where = f"ConfigMap {args.namespace}/{args.configmap}"
    try:
        cm = Kube(api_client(args.kubeconfig)).get(_configmaps(), args.namespace, args.configmap)
    except TargetNotFound as exc:
        raise _InputError(f"{where} does not exist") from exc
    text = (cm.get("data") or {}).get(args.key)
    if text is None:
        raise _InputError(f"{where} has no key {args.key}")
    return f"{where} ({args.key})", _proxy_config(text, where)


def apply_litellm(kube: Any, ns: str, name: str, key: str, catalog: Catalog, options: Any,
                  out: TextIO) -> int:
    """``--apply``: merge into the ConfigMap's config and write it; print what changed.

    Creates the ConfigMap, or updates it by server-side apply (this command's
    field manager owns only its key; other keys stay whoever's they are) with
    the read's resourceVersion as a precondition. Either way a change made
    between the read and the write (409) is read and merged into again, not
    overwritten; nothing is written when the merge changes nothing.

    Args:
        kube: a :class:`token_budget.kube.Kube` (``get`` and ``request``).
    """
    import difflib

    from token_budget.errors import Conflict, TargetNotFound
    from token_budget.proxies import litellm

    where = f"ConfigMap {ns}/{name}"
    for _ in range(3):
        try:
            current: dict[str, Any] | None = kube.get(_configmaps(), ns, name)
        except TargetNotFound:
            current = None
        text = ((current or {}).get("data") or {}).get(key)
        existing = _proxy_config(text, where) if text is not None else None
        merged = litellm.merge(existing, catalog, options)
        if existing == merged:
            print(f"{where} ({key}) unchanged", file=out)
            return 0
        new_text = dump_yaml(merged)
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap",
                                "metadata": {"name": name, "namespace": ns},
                                "data": {key: new_text}}
        try:
            if current is None:  # created meanwhile -> 409, merge into theirs
                kube.request("POST", _configmaps().path(ns), {"fieldManager": FIELD_MANAGER},
                             body)
            else:  # the read's version as a precondition: changed since -> 409, merge again
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                kube.request("PATCH", _configmaps().path(ns, name),
                             {"fieldManager": FIELD_MANAGER, "force": "true"},
                             json.dumps(body), content_type="application/apply-patch+yaml")
        except Conflict:
            continue
        print(f"{where} ({key}) {'created' if current is None else 'updated'}", file=out)
        out.writelines(difflib.unified_diff(
            dump_yaml(existing).splitlines(keepends=True) if existing else [],
            new_text.splitlines(keepends=True), f"{key} (before)", f"{key} (after)"))
        return 0
    print(f"tokenbudget gateway litellm: {where} changed under us three times; run it again",
          file=sys.stderr)
    return 1


def _litellm_header(catalogs: Sequence[api.ModelCatalog], config: dict[str, Any]) -> str:
    from token_budget.proxies import litellm

    names = ", ".join(c.metadata.name for c in catalogs)
    lines = [f"# The LiteLLM proxy's config.yaml for ModelCatalog {names}",
             "# (tokenbudget gateway litellm). Entries whose model_info has "
             f"{litellm.MANAGED} are",
             "# rewritten by every run; edit the others, and every other key, freely."]
    missing = litellm.missing_environment(config)
    if missing:
        lines.append("# The proxy's environment (or this config's environment_variables):")
        width = max(len(n) for n, _, _ in missing)
        lines += [f"#   {n:<{width}}  {'(required) ' if required else ''}{what}"
                  for n, required, what in missing]
    labels = litellm.SOURCE.labels
    assert labels is not None
    lines += [
        "# The operator lets the proxy read every directive: --directive-readers="
        "NAMESPACE:SERVICEACCOUNT",
        "# (chart: webhooks.directives.readers). Budgets reading the proxy's spend:",
        f"#   source: {{preset: LiteLLM, labels: {{namespace: {labels.namespace}, "
        f"workload: {labels.workload}}}}}",
        "# Agents name themselves in each request's metadata:",
        '#   {"namespace": "$TOKENBUDGET_POD_NAMESPACE", "pod": "$TOKENBUDGET_POD_NAME"}',
    ]
    return "\n".join(lines) + "\n"


def _configmaps() -> Any:
    from token_budget.kube import Resource  # not at import: the kubernetes client is slow

    return Resource("ConfigMap", "v1", "configmaps")


def dump_yaml(body: Any) -> str:
    return yaml.safe_dump(body, sort_keys=False, width=100, allow_unicode=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
