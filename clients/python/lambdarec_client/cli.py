"""CLI over the lambdarec online API; prints the reply as JSON.

    python -m lambdarec_client recommend u1 -k 10 --explain --context i3 --category shoes
    python -m lambdarec_client recommend-batch --file requests.jsonl   # {"user_id", "k", ...}
    python -m lambdarec_client similar i42 -k 5 [--user u1]
    python -m lambdarec_client ingest --user u1 --item i3 --type view     # or --file events.jsonl
    python -m lambdarec_client ingest --user u1 --item i3 --type click --recommendation-id R
    python -m lambdarec_client upsert-items --item i3 --category shoes --unavailable
    python -m lambdarec_client health
    python -m lambdarec_client model-info | reload [--version V] | forget-user u1   (admin port)
    python -m lambdarec_client create-experiment --name t --arm control:0.5 \
        --arm challenger:0.5:v20261122-ab12 [--traffic 0.5]    (admin; see --help)
    python -m lambdarec_client list-experiments | get-experiment EXP | stop-experiment EXP

Targets: `--target` / `--admin-target`, else the server's own settings from the environment
(LAMBDAREC__SERVER__HOST, __PORT, __ADMIN_PORT), else 127.0.0.1:50051 / 127.0.0.1:50052.
Admin calls send `authorization: Bearer <token>`: `--token`, else
LAMBDAREC__SERVER__ADMIN_TOKEN, else the server's default token. Public calls send the
access key (`python -m online.keys create`) the same way: `--key`, else LAMBDAREC_KEY.
TLS: `--tls-ca FILE` (else LAMBDAREC_TLS_CA) is the PEM root the server's certificate is
checked against; `--tls-cert` / `--tls-key` (LAMBDAREC_TLS_CERT / _KEY) a client
certificate for servers that ask for one.

Exit status: 0 done; 1 the server answered with an error (printed as {"error": ...}) or,
for `ingest`, rejected some events, or for `health`, a status other than SERVING (so the
command is a container health check); 2 bad input (a flag, an unreadable JSON lines file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from lambdarec.v1 import recommender_pb2 as pb

from lambdarec_client.client import Client, recommend_request, to_dict

# The server's defaults (its `server.*` settings), so a bare CLI reaches a bare server.
DEFAULT_HOST, DEFAULT_PORT, DEFAULT_ADMIN_PORT, DEFAULT_TOKEN = "127.0.0.1", 50051, 50052, \
    "change-me"


class UsageError(Exception):
    """Bad input on the command line or in a file: one line, exit status 2."""


def default_targets(env: Mapping[str, str]) -> tuple[str, str, str]:
    host = env.get("LAMBDAREC__SERVER__HOST", DEFAULT_HOST)
    port = env.get("LAMBDAREC__SERVER__PORT", str(DEFAULT_PORT))
    admin_port = env.get("LAMBDAREC__SERVER__ADMIN_PORT", str(DEFAULT_ADMIN_PORT))
    token = env.get("LAMBDAREC__SERVER__ADMIN_TOKEN", DEFAULT_TOKEN)
    return f"{host}:{port}", f"{host}:{admin_port}", token


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lambdarec_client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="host:port of the Recommender service")
    p.add_argument("--admin-target", help="host:port of the Admin service")
    p.add_argument("--token", help="admin bearer token")
    p.add_argument("--key", help="access key of the public service (env LAMBDAREC_KEY)")
    p.add_argument("--tls-ca", type=Path, help="PEM root certificate: use TLS "
                   "(env LAMBDAREC_TLS_CA)")
    p.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS; "
                   "env LAMBDAREC_TLS_CERT)")
    p.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert (env LAMBDAREC_TLS_KEY)")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    sub = p.add_subparsers(dest="cmd", required=True)

    def add_filters(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-k", type=int, default=10)
        sp.add_argument("--include-seen", action="store_true", help="do not exclude seen items")
        sp.add_argument("--include-unavailable", action="store_true")
        sp.add_argument("--exclude", action="append", default=[], metavar="ITEM")
        sp.add_argument("--category", action="append", default=[], help="only these")
        sp.add_argument("--not-category", action="append", default=[])

    r = sub.add_parser("recommend", help="recommendations for a user")
    r.add_argument("user_id")
    add_filters(r)
    r.add_argument("--context", action="append", default=[], metavar="ITEM",
                   help="session/basket item folded in for this request only")
    r.add_argument("--explain", action="store_true")
    rb = sub.add_parser("recommend-batch",
                        help="many Recommend requests in one call (JSON lines from --file)")
    rb.add_argument("--file", type=Path, required=True,
                    help="JSON lines: user_id, k, context_item_ids, explain, exclude_seen, "
                         "exclude_item_ids, include_categories, exclude_categories, "
                         "only_available ('-' for stdin)")
    s = sub.add_parser("similar", help="items similar to an item")
    s.add_argument("item_id")
    s.add_argument("--user", default="", help="who is looking (recorded on the impression)")
    add_filters(s)
    i = sub.add_parser("ingest", help="send events (one from flags, or JSON lines from --file)")
    i.add_argument("--file", type=Path, help="JSON lines of events ('-' for stdin)")
    i.add_argument("--user")
    i.add_argument("--item")
    i.add_argument("--type", default="view")
    i.add_argument("--value", type=float)
    i.add_argument("--event-id")
    i.add_argument("--recommendation-id",
                   help="the recommendation_id of the answer that led to the event")
    i.add_argument("--atomic", action="store_true")
    u = sub.add_parser("upsert-items", help="insert/update catalogue items")
    u.add_argument("--file", type=Path, help="JSON lines of items ('-' for stdin)")
    u.add_argument("--item")
    u.add_argument("--category")
    u.add_argument("--price", type=float)
    u.add_argument("--title")
    u.add_argument("--unavailable", action="store_true")
    h = sub.add_parser("health", help="standard gRPC health check")
    h.add_argument("--service", default="")
    h.add_argument("--admin", action="store_true", help="check the admin port")
    sub.add_parser("model-info", help="(admin) the serving model")
    rl = sub.add_parser("reload", help="(admin) load a model version (default: CURRENT)")
    rl.add_argument("--version")
    fu = sub.add_parser("forget-user", help="(admin) erase a user online and in the lake")
    ce = sub.add_parser("create-experiment", help="(admin) start an A/B experiment")
    ce.add_argument("--name", required=True)
    ce.add_argument("--arm", action="append", required=True,
                    metavar="NAME:SHARE[:MODEL[:KEY=VALUE,...]]",
                    help="an arm: MODEL a version, empty or @champion for the champion, "
                         "@popularity for the popularity ranking; settings e.g. "
                         "blend_weight=0.3")
    ce.add_argument("--traffic", type=float, help="share of users taking part (default 1)")
    ce.add_argument("--salt", default="", help="assignment salt (default: a random one)")
    ce.add_argument("--description", default="")
    sub.add_parser("list-experiments", help="(admin) every experiment, newest first")
    for name, text in (("get-experiment", "one experiment"),
                       ("stop-experiment", "stop an experiment")):
        sub.add_parser(name, help=f"(admin) {text}").add_argument("experiment_id")
    fu.add_argument("user_id")
    return p


def _numbered_jsonl(path: Path) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """(the name to show, [(line number, JSON object)]); a bad line is a `UsageError`."""
    name = "<stdin>" if str(path) == "-" else str(path)
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as exc:
        raise UsageError(f"{name}: cannot read: {exc.strerror or exc}") from exc
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{name}:{n}: not valid JSON ({exc.msg} at column {exc.colno})"
                             ) from exc
        if not isinstance(row, dict):
            raise UsageError(f"{name}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append((n, row))
    return name, rows


def parse_arm(text: str) -> dict[str, Any]:
    """`NAME:SHARE[:MODEL[:KEY=VALUE,...]]` as an arm (`Client.create_experiment`); MODEL
    empty or `@champion`: the champion, `@popularity`: the popularity ranking."""
    parts = text.split(":", 3)
    try:
        share = float(parts[1]) if len(parts) >= 2 else None
    except ValueError:
        share = None
    if share is None:
        raise UsageError(f"--arm {text!r}: expected NAME:SHARE[:MODEL[:KEY=VALUE,...]] with a "
                         "numeric SHARE")
    model = parts[2] if len(parts) > 2 else ""
    settings: dict[str, str] = {}
    for pair in (parts[3].split(",") if len(parts) > 3 and parts[3] else []):
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--arm {text!r}: setting {pair!r} is not KEY=VALUE")
        settings[key.strip()] = value.strip()
    return {"name": parts[0], "share": share,
            "model_version": "" if model in ("", "@champion", "@popularity") else model,
            "popularity": model == "@popularity", "settings": settings}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """JSON objects, one a line ('-' reads stdin); a bad line is a `UsageError` naming it."""
    return [row for _, row in _numbered_jsonl(path)[1]]


REQUEST_FIELDS: dict[str, str] = {
    "user_id": "text", "k": "integer", "context_item_ids": "list of text",
    "explain": "boolean", "exclude_seen": "boolean", "exclude_item_ids": "list of text",
    "include_categories": "list of text", "exclude_categories": "list of text",
    "only_available": "boolean"}
"""The keys of one `recommend-batch` line (`Client.recommend`'s arguments) and their kinds."""


def _is(kind: str, v: Any) -> bool:
    if kind == "text":
        return isinstance(v, str)
    if kind == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "boolean":
        return isinstance(v, bool)
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def read_requests(path: Path) -> list[pb.RecommendRequest]:
    """Recommend requests, one JSON object a line; an unknown key or a wrong type is a
    `UsageError` naming the file, the line and the key."""
    name, rows = _numbered_jsonl(path)
    out = []
    for n, row in rows:
        unknown = sorted(set(row) - set(REQUEST_FIELDS))
        if unknown:
            raise UsageError(f"{name}:{n}: unknown field {unknown[0]!r} "
                             f"(known: {', '.join(REQUEST_FIELDS)})")
        for key, value in row.items():
            if not _is(REQUEST_FIELDS[key], value):
                raise UsageError(f"{name}:{n}: {key}: expected {REQUEST_FIELDS[key]}, got "
                                 f"{json.dumps(value)}")
        try:
            out.append(recommend_request(**{"user_id": "", **row}))
        except ValueError as exc:  # e.g. k beyond int32
            raise UsageError(f"{name}:{n}: {exc}") from exc
    return out


def run_cli(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[dict[str, Any], int]:
    """The reply as a dict and the exit status."""
    target, admin_target, token = default_targets(env)
    target, admin_target = args.target or target, args.admin_target or admin_target
    token = token if args.token is None else args.token
    key = args.key or env.get("LAMBDAREC_KEY") or None
    tls: dict[str, bytes] = {}
    for arg, var, kwarg in (("tls_ca", "LAMBDAREC_TLS_CA", "root_cert"),
                            ("tls_cert", "LAMBDAREC_TLS_CERT", "cert_chain"),
                            ("tls_key", "LAMBDAREC_TLS_KEY", "private_key")):
        path = getattr(args, arg) or env.get(var)
        if path:
            flag = "--" + arg.replace("_", "-")
            try:
                tls[kwarg] = Path(path).read_bytes()
            except OSError as exc:
                raise UsageError(f"{flag} ({var}): cannot read {path}: "
                                 f"{exc.strerror or exc}") from exc
    if ("cert_chain" in tls) != ("private_key" in tls):
        raise UsageError("--tls-cert and --tls-key: give both or neither")
    cmd = args.cmd
    with Client(target, admin_target, token=token, key=key, timeout=args.timeout,
                root_cert=tls.get("root_cert"), cert_chain=tls.get("cert_chain"),
                private_key=tls.get("private_key")) as c:
        if cmd in ("recommend", "similar"):
            filters = dict(exclude_item_ids=args.exclude, include_categories=args.category,
                           exclude_categories=args.not_category,
                           only_available=not args.include_unavailable)
            if cmd == "recommend":
                return to_dict(c.recommend(args.user_id, args.k, context_item_ids=args.context,
                                           explain=args.explain,
                                           exclude_seen=not args.include_seen, **filters)), 0
            return to_dict(c.similar(args.item_id, args.k, user_id=args.user, **filters)), 0
        if cmd == "recommend-batch":
            return to_dict(c.recommend_batch(read_requests(args.file))), 0
        if cmd == "ingest":
            if args.file:
                events = read_jsonl(args.file)
            elif args.user and args.item:
                events = [{"event_id": args.event_id, "user_id": args.user,
                           "item_id": args.item, "event_type": args.type, "value": args.value,
                           "recommendation_id": args.recommendation_id}]
            else:
                raise UsageError("ingest: give --file, or --user and --item")
            reply = to_dict(c.ingest(events, atomic=args.atomic))
            # A caller scripting ingest must notice lost events without parsing the JSON.
            return reply, 1 if reply.get("rejected") else 0
        if cmd == "upsert-items":
            if args.file:
                items = read_jsonl(args.file)
            elif args.item:
                items = [{"item_id": args.item, "category": args.category, "price": args.price,
                          "title": args.title, "available": not args.unavailable}]
            else:
                raise UsageError("upsert-items: give --file or --item")
            return to_dict(c.upsert_items(items)), 0
        if cmd == "health":
            status = c.health(args.service, admin=args.admin)
            return {"status": status}, 0 if status == "SERVING" else 1
        if cmd == "model-info":
            info = to_dict(c.model_info())
            info.pop("metrics_json", None)  # deprecated duplicate of metrics / baselines
            return info, 0
        if cmd == "reload":
            return to_dict(c.reload(args.version)), 0
        if cmd == "forget-user":
            return to_dict(c.forget_user(args.user_id)), 0
        if cmd == "create-experiment":
            return to_dict(c.create_experiment(
                args.name, [parse_arm(a) for a in args.arm], traffic=args.traffic,
                salt=args.salt, description=args.description)), 0
        if cmd == "list-experiments":
            return to_dict(c.list_experiments()), 0
        if cmd == "get-experiment":
            return to_dict(c.get_experiment(args.experiment_id)), 0
        if cmd == "stop-experiment":
            return to_dict(c.stop_experiment(args.experiment_id)), 0
    raise UsageError(f"unknown command {cmd}")


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        out, status = run_cli(args, os.environ if env is None else env)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        code = exc.code().name if exc.code() is not None else "UNKNOWN"
        print(json.dumps({"error": {"code": code, "message": exc.details()}}))
        return 1
    print(json.dumps(out, indent=2))
    if status and args.cmd == "ingest":
        n = len(out.get("rejected", []))
        print(f"error: {n} event(s) rejected (see \"rejected\" above)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
