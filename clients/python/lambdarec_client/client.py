"""Typed Python client for the lambdarec online API (Recommender + Admin services).

    from lambdarec_client import Client
    with Client("127.0.0.1:50051", "127.0.0.1:50052", key="lrk_...", token="...") as c:
        c.ingest([{"user_id": "u1", "item_id": "i3", "event_type": "view"}])
        c.recommend("u1", k=10, explain=True)

`key` is the public service's access key (`python -m online.keys create`), `token` the
admin token; `root_cert` (PEM bytes or a file) turns on TLS for both channels, and
`cert_chain` / `private_key` present a client certificate (mutual TLS).

Needs only grpcio and protobuf (and the standard health-check stubs).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from os import PathLike
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lambdarec.v1 import admin_pb2, admin_pb2_grpc, recommender_pb2_grpc
from lambdarec.v1 import recommender_pb2 as pb

USER_HEADER = "x-lambdarec-user"
"""Sent on every call that carries a user id: a fleet's front door hashes it, so a user's
calls go to one replica while it is up (HAProxy `balance hdr(x-lambdarec-user)`)."""


def _user(user_id: str) -> list[tuple[str, str]]:
    # gRPC metadata values are ASCII: a non-ASCII id is sent escaped (still one per user)
    return [(USER_HEADER, user_id.encode("unicode_escape").decode("ascii"))] if user_id else []


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


def recommend_request(user_id: str, k: int = 10, *, context_item_ids: Sequence[str] = (),
                       explain: bool = False, **filters: Any) -> pb.RecommendRequest:
    return pb.RecommendRequest(user_id=user_id, k=k, filters=_filters(**filters),
                               context_item_ids=list(context_item_ids), explain=explain)


def make_event(e: Mapping[str, Any]) -> pb.Event:
    """A dict (ts as datetime, ISO string or epoch seconds; default now) as an Event.

    `recommendation_id`: the id of the answer (Recommend, SimilarItems) whose list led to
    the event, when known; it attributes the event to that list."""
    ev = pb.Event(
        event_id=str(e.get("event_id") or uuid.uuid4().hex),
        user_id=str(e.get("user_id", "")),
        item_id=str(e.get("item_id", "")),
        event_type=str(e.get("event_type", "")),
        session_id=str(e.get("session_id") or ""),
        properties={str(k): str(v) for k, v in (e.get("properties") or {}).items()},
        recommendation_id=str(e.get("recommendation_id") or ""),
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


Pem = bytes | str | PathLike[str]
"""PEM data, or the path of a PEM file."""


def _pem(value: Pem | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def _channel(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, credentials)


def to_dict(msg: Any) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True)


class Client:
    """Thin typed wrapper over both services; every call takes `timeout` (the deadline)."""

    def __init__(self, target: str, admin_target: str | None = None, *,
                 token: str | None = None, key: str | None = None,
                 root_cert: Pem | None = None, cert_chain: Pem | None = None,
                 private_key: Pem | None = None, timeout: float = 5.0) -> None:
        creds = None
        if root_cert is not None or cert_chain is not None:
            creds = grpc.ssl_channel_credentials(_pem(root_cert), _pem(private_key),
                                                 _pem(cert_chain))
        self.channel = _channel(target, creds)
        self.admin_channel = _channel(admin_target, creds) if admin_target else None
        self.stub = recommender_pb2_grpc.RecommenderStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.admin_channel) if self.admin_channel else None
        self.token = token
        self.md = [("authorization", f"Bearer {key}")] if key else []
        """Metadata of every public call: the access key, if any."""
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
        req = recommend_request(user_id, k, context_item_ids=context_item_ids,
                                 explain=explain, **filters)
        return self.stub.Recommend(req, metadata=self.md + _user(user_id),
                                   timeout=timeout or self.timeout)

    def recommend_batch(self, requests: Iterable[Mapping[str, Any] | pb.RecommendRequest], *,
                        timeout: float | None = None) -> pb.RecommendBatchResponse:
        """Several Recommend requests in one call; each a `RecommendRequest` or a dict of
        `recommend`'s arguments (`user_id`, `k`, `context_item_ids`, `explain`, and the
        filter keywords)."""
        reqs = [r if isinstance(r, pb.RecommendRequest)
                else recommend_request(**{"user_id": "", **r}) for r in requests]
        return self.stub.RecommendBatch(pb.RecommendBatchRequest(requests=reqs),
                                        metadata=self.md + _user(reqs[0].user_id if reqs else ""),
                                        timeout=timeout or self.timeout)

    def similar(self, item_id: str, k: int = 10, *, user_id: str = "",
                timeout: float | None = None, **filters: Any) -> pb.SimilarItemsResponse:
        """Items similar to `item_id`; `user_id`: who is looking (optional), recorded on the
        answer's impression so their clicks are attributed to it."""
        req = pb.SimilarItemsRequest(item_id=item_id, k=k, filters=_filters(**filters),
                                     user_id=user_id)
        return self.stub.SimilarItems(req, metadata=self.md + _user(user_id),
                                      timeout=timeout or self.timeout)

    def ingest(self, events: Iterable[Mapping[str, Any] | pb.Event], *, atomic: bool = False,
               timeout: float | None = None) -> pb.IngestEventsResponse:
        evs = [e if isinstance(e, pb.Event) else make_event(e) for e in events]
        return self.stub.IngestEvents(pb.IngestEventsRequest(events=evs, atomic=atomic),
                                      metadata=self.md + _user(evs[0].user_id if evs else ""),
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
                                     metadata=self.md, timeout=timeout or self.timeout)

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
        return stub.ForgetUser(admin_pb2.ForgetUserRequest(user_id=user_id),
                               metadata=md + _user(user_id),
                               timeout=timeout)

    # -- experiments (admin) -------------------------------------------------------------
    def create_experiment(self, name: str, arms: Iterable[Mapping[str, Any]], *,
                          traffic: float | None = None, salt: str = "",
                          description: str = "", timeout: float = 120.0
                          ) -> admin_pb2.Experiment:
        """Start an experiment (the server loads its arms' models first: `timeout`).

        Each arm is a dict of `ExperimentArm`'s fields: `name`, `share`, `model_version`
        ("" = the champion), `popularity`, `settings` (e.g. {"blend_weight": "0.3"})."""
        stub, md = self._admin()
        req = admin_pb2.CreateExperimentRequest(
            name=name, salt=salt, description=description,
            arms=[admin_pb2.ExperimentArm(
                name=str(a["name"]), share=float(a["share"]),
                model_version=str(a.get("model_version") or ""),
                popularity=bool(a.get("popularity", False)),
                settings={str(k): str(v) for k, v in (a.get("settings") or {}).items()})
                for a in arms])
        if traffic is not None:
            req.traffic = traffic
        return stub.CreateExperiment(req, metadata=md, timeout=timeout)

    def list_experiments(self) -> admin_pb2.ListExperimentsResponse:
        stub, md = self._admin()
        return stub.ListExperiments(admin_pb2.ListExperimentsRequest(), metadata=md,
                                    timeout=self.timeout)

    def get_experiment(self, experiment_id: str) -> admin_pb2.Experiment:
        stub, md = self._admin()
        return stub.GetExperiment(admin_pb2.GetExperimentRequest(experiment_id=experiment_id),
                                  metadata=md, timeout=self.timeout)

    def stop_experiment(self, experiment_id: str) -> admin_pb2.Experiment:
        stub, md = self._admin()
        return stub.StopExperiment(
            admin_pb2.StopExperimentRequest(experiment_id=experiment_id), metadata=md,
            timeout=self.timeout)
