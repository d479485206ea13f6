"""Python client for the lambdarec online API, and a CLI that prints JSON.

    python -m online.client recommend u1 -k 10 --explain --context i3 --category shoes
    python -m online.client recommend-batch --file requests.jsonl   # {"user_id", "k", ...}
    python -m online.client similar i42 -k 5
    python -m online.client ingest --user u1 --item i3 --type view     # or --file events.jsonl
    python -m online.client upsert-items --item i3 --category shoes --unavailable
    python -m online.client health
    python -m online.client model-info | reload [--version V] | forget-user u1   (admin port)

Targets default to the configured host/ports (`--target`, `--admin-target` override);
admin calls send `authorization: Bearer <token>` (`--token`, default the configured one).
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from online.pb import admin_pb2, admin_pb2_grpc, recommender_pb2_grpc
from online.pb import recommender_pb2 as pb


def _filters(
    exclude_seen: bool | None = None,
    exclude_item_ids: Sequence[str] = (),
    include_categories: Sequence[str] = (),
    exclude_categories: Sequence[str] = (),
    only_available: bool | None = None,
) -> pb.Filters:
    f = pb.Filters(exclude_item_ids=list(exclude_item_ids),
                   include_categories=list(include_categories),
                   exclude_categories=list(exclude_categories))
    if exclude_seen is not None:
        f.exclude_seen = exclude_seen
    if only_available is not None:
        f.only_available = only_available
    return f


def _recommend_request(user_id: str, k: int = 10, *, context_item_ids: Sequence[str] = (),
                       explain: bool = False, **filters: Any) -> pb.RecommendRequest:
    return pb.RecommendRequest(user_id=user_id, k=k, filters=_filters(**filters),
                               context_item_ids=list(context_item_ids), explain=explain)


def make_event(e: Mapping[str, Any]) -> pb.Event:
    """A dict (ts as datetime, ISO string or epoch seconds; default now) as an Event."""
    ev = pb.Event(
        event_id=str(e.get("event_id") or uuid.uuid4().hex),
        user_id=str(e.get("user_id", "")),
        item_id=str(e.get("item_id", "")),
        event_type=str(e.get("event_type", "")),
        session_id=str(e.get("session_id") or ""),
        properties={str(k): str(v) for k, v in (e.get("properties") or {}).items()},
    )
    if e.get("value") is not None:
        ev.value = float(e["value"])
    ts = e.get("ts")
    if ts is None:
        ts = datetime.now(UTC)
    elif isinstance(ts, str):
        ts = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    elif isinstance(ts, int | float):
        ts = datetime.fromtimestamp(ts, UTC)
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    ev.ts.FromDatetime(ts)
    return ev


def to_dict(msg: Any) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True)


class Client:
    """Thin typed wrapper over both services; every call takes `timeout` (the deadline)."""

    def __init__(self, target: str, admin_target: str | None = None, *,
                 token: str | None = None, timeout: float = 5.0) -> None:
        self.channel = grpc.insecure_channel(target)
        self.admin_channel = grpc.insecure_channel(admin_target) if admin_target else None
        self.stub = recommender_pb2_grpc.RecommenderStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.admin_channel) if self.admin_channel else None
        self.token = token
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()
        if self.admin_channel:
            self.admin_channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recommend(self, user_id: str, k: int = 10, *, context_item_ids: Sequence[str] = (),
                  explain: bool = False, timeout: float | None = None,
                  **filters: Any) -> pb.RecommendResponse:
        req = _recommend_request(user_id, k, context_item_ids=context_item_ids,
                                 explain=explain, **filters)
        return self.stub.Recommend(req, timeout=timeout or self.timeout)

    def recommend_batch(self, requests: Iterable[Mapping[str, Any]], *,
                        timeout: float | None = None) -> pb.RecommendBatchResponse:
        """Several Recommend requests in one call; each a dict of `recommend`'s arguments
        (`user_id`, `k`, `context_item_ids`, `explain`, and the filter keywords)."""
        reqs = [_recommend_request(**{"user_id": "", **r}) for r in requests]
        return self.stub.RecommendBatch(pb.RecommendBatchRequest(requests=reqs),
                                        timeout=timeout or self.timeout)

    def similar(self, item_id: str, k: int = 10, *, timeout: float | None = None,
                **filters: Any) -> pb.SimilarItemsResponse:
        req = pb.SimilarItemsRequest(item_id=item_id, k=k, filters=_filters(**filters))
        return self.stub.SimilarItems(req, timeout=timeout or self.timeout)

    def ingest(self, events: Iterable[Mapping[str, Any] | pb.Event], *, atomic: bool = False,
               timeout: float | None = None) -> pb.IngestEventsResponse:
        evs = [e if isinstance(e, pb.Event) else make_event(e) for e in events]
        return self.stub.IngestEvents(pb.IngestEventsRequest(events=evs, atomic=atomic),
                                      timeout=timeout or self.timeout)

    def upsert_items(self, items: Iterable[Mapping[str, Any]], *,
                     timeout: float | None = None) -> pb.UpsertItemsResponse:
        msgs = []
        for it in items:
            m = pb.Item(item_id=str(it["item_id"]))
            for key in ("category", "price", "available", "title"):
                if it.get(key) is not None:
                    setattr(m, key, it[key])
            msgs.append(m)
        return self.stub.UpsertItems(pb.UpsertItemsRequest(items=msgs),
                                     timeout=timeout or self.timeout)

    def health(self, service: str = "", *, admin: bool = False) -> str:
        ch = self.admin_channel if admin else self.channel
        if ch is None:
            raise ValueError("no admin target configured")
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    # -- admin ---------------------------------------------------------------------------
    def _admin(self) -> tuple[admin_pb2_grpc.AdminStub, list[tuple[str, str]]]:
        if self.admin is None:
            raise ValueError("no admin target configured")
        md = [("authorization", f"Bearer {self.token}")] if self.token is not None else []
        return self.admin, md

    def model_info(self) -> admin_pb2.ModelInfoResponse:
        stub, md = self._admin()
        return stub.ModelInfo(admin_pb2.ModelInfoRequest(), metadata=md, timeout=self.timeout)

    def reload(self, version: str | None = None, *, timeout: float = 120.0
               ) -> admin_pb2.ReloadModelResponse:
        stub, md = self._admin()
        req = admin_pb2.ReloadModelRequest()
        if version:
            req.version = version
        return stub.ReloadModel(req, metadata=md, timeout=timeout)

    def forget_user(self, user_id: str, *, timeout: float = 60.0) -> admin_pb2.ForgetUserResponse:
        stub, md = self._admin()
        return stub.ForgetUser(admin_pb2.ForgetUserRequest(user_id=user_id), metadata=md,
                               timeout=timeout)


# -- CLI ---------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m online.client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="host:port of the Recommender service")
    p.add_argument("--admin-target", help="host:port of the Admin service")
    p.add_argument("--token", help="admin bearer token (default: server.admin_token)")
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
    add_filters(s)
    i = sub.add_parser("ingest", help="send events (one from flags, or JSON lines from --file)")
    i.add_argument("--file", type=Path, help="JSON lines of events ('-' for stdin)")
    i.add_argument("--user")
    i.add_argument("--item")
    i.add_argument("--type", default="view")
    i.add_argument("--value", type=float)
    i.add_argument("--event-id")
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
    fu.add_argument("user_id")
    return p


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    text = sys.stdin.read() if str(path) == "-" else path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run_cli(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    target, admin_target, token = args.target, args.admin_target, args.token
    if not (target and admin_target and token is not None):
        from lake.config import load_settings

        srv = load_settings().server
        target = target or f"{srv.host}:{srv.port}"
        admin_target = admin_target or f"{srv.host}:{srv.admin_port}"
        token = srv.admin_token if token is None else token
    with Client(target, admin_target, token=token, timeout=args.timeout) as c:
        cmd = args.cmd
        if cmd in ("recommend", "similar"):
            filters = dict(exclude_item_ids=args.exclude, include_categories=args.category,
                           exclude_categories=args.not_category,
                           only_available=not args.include_unavailable)
            if cmd == "recommend":
                return to_dict(c.recommend(args.user_id, args.k, context_item_ids=args.context,
                                           explain=args.explain,
                                           exclude_seen=not args.include_seen, **filters))
            return to_dict(c.similar(args.item_id, args.k, **filters))
        if cmd == "recommend-batch":
            return to_dict(c.recommend_batch(_read_jsonl(args.file)))
        if cmd == "ingest":
            if args.file:
                events = _read_jsonl(args.file)
            else:
                if not (args.user and args.item):
                    raise SystemExit("ingest: give --file, or --user and --item")
                events = [{"event_id": args.event_id, "user_id": args.user,
                           "item_id": args.item, "event_type": args.type, "value": args.value}]
            return to_dict(c.ingest(events, atomic=args.atomic))
        if cmd == "upsert-items":
            if args.file:
                items = _read_jsonl(args.file)
            else:
                if not args.item:
                    raise SystemExit("upsert-items: give --file or --item")
                items = [{"item_id": args.item, "category": args.category, "price": args.price,
                          "title": args.title, "available": not args.unavailable}]
            return to_dict(c.upsert_items(items))
        if cmd == "health":
            return {"status": c.health(args.service, admin=args.admin)}
        if cmd == "model-info":
            return to_dict(c.model_info())
        if cmd == "reload":
            return to_dict(c.reload(args.version))
        if cmd == "forget-user":
            return to_dict(c.forget_user(args.user_id))
    raise SystemExit(f"unknown command {args.cmd}")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        out = run_cli(argv)
    except grpc.RpcError as exc:
        err = {"error": {"code": exc.code().name, "message": exc.details()}}
        print(json.dumps(err, indent=2), file=sys.stdout)
        return 1
    print(json.dumps(out, indent=2, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
