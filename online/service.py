"""gRPC servicers for `lambdarec.v1.Recommender` and `lambdarec.v1.Admin`.

Handlers parse and validate requests (`InvalidArgument` names the field), check the
deadline before heavy work, and call the engine. They never set status codes: the one
`ServiceInterceptor` maps every exception through `online.errors.status_of`, records
per-RPC metrics, and runs its port's guard (`online.auth`: access keys or the admin token).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from lake.bundle import BundleError, check_version_name
from lake.config import Settings
from lake.experiments import Experiment
from lake.validation import EventLimits, id_problem, text_problem, validate_event
from online.auth import CALLER, AccessKeys, AdminToken, caller_has, caller_tenant
from online.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    status_of,
)
from online.experiment_arms import ExperimentArms
from online.impressions import RECOMMEND, SIMILAR, SIMILAR_STRATEGY, new_recommendation_id
from online.metrics import Metrics, rpc_labels
from online.model_info import evaluation_fields
from online.pb import admin_pb2, admin_pb2_grpc, recommender_pb2_grpc
from online.pb import recommender_pb2 as pb
from online.rate_limits import IngestGate, RateLimits
from online.recommender import (
    FALLBACK,
    MAX_BECAUSE,
    POPULARITY,
    FilterSpec,
    Recommender,
    Result,
)
from online.state import OnlineState

log = logging.getLogger(__name__)

DEADLINE_MARGIN_S = 0.0005
RETRY_AFTER_MS = "retry-after-ms"
"""Trailing metadata of a RESOURCE_EXHAUSTED answer: milliseconds to wait before retrying."""
RATE_LIMITED_PREFIX = f"/{pb.DESCRIPTOR.services_by_name['Recommender'].full_name}/"
"""Calls/s limits apply to the public service's methods (not health checks, reflection)."""
UNDECODABLE_LOG_INTERVAL_S = 60.0


class _Undecodable:
    """Stands in for a request whose bytes are not a valid message: gRPC itself would log a
    traceback and answer INTERNAL; the handler wrapper answers INVALID_ARGUMENT instead."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class EveryInterval:
    """Logs a warning at most once per interval, with how many occurrences it stands for."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last = -interval_s
        self._count = 0

    def __call__(self, message: str, **extra: Any) -> None:
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now - self._last < self.interval_s:
                return
            count, self._count, self._last = self._count, 0, now
        log.warning(message, extra={**extra, "occurrences": count,
                                    "interval_s": self.interval_s})


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's bytes
            return _Undecodable(exc)
    return parse


# -- the one place exceptions become status codes --------------------------------------
class ServiceInterceptor(grpc.ServerInterceptor):
    """Maps exceptions to status codes, records metrics, and runs the port's guard.

    gRPC runs `intercept_service` for every call; the wrapped handler of each method is
    built once and reused (the guard's check for the method, if any, runs inside it on the
    call's metadata), so a call costs one dict lookup here on top of the handler.
    """

    def __init__(self, metrics: Metrics, *, guard: AccessKeys | AdminToken | None = None,
                 undecodable_log: EveryInterval | None = None,
                 limits: RateLimits | None = None) -> None:
        self.metrics = metrics
        self._guard = guard
        self._limits = limits  # calls/s per key, for the Recommender service's methods
        self._wrapped: dict[str, tuple[Any, Any]] = {}
        # shared by a server's ports: one line per interval for the whole process
        self._undecodable_log = undecodable_log or EveryInterval(UNDECODABLE_LOG_INTERVAL_S)

    def intercept_service(self, continuation: Callable[..., Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        if handler.unary_unary is not None:
            wrapped = self._wrap(handler, details.method)
        else:  # streaming RPCs (reflection, health Watch): only undecodable bytes are mapped
            wrapped = self._wrap_streaming(handler, details.method)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: Any, full_method: str) -> Any:
        inner = handler.unary_unary
        guard = self._guard.checker(full_method) if self._guard is not None else None
        method = full_method.rsplit("/", 1)[-1]
        limit_call = self._limits.call if self._limits is not None and \
            self._limits.limits_calls and full_method.startswith(RATE_LIMITED_PREFIX) else None
        metrics = self.metrics
        rpc = rpc_labels(full_method)
        ok = metrics.child(metrics.requests, *rpc, grpc.StatusCode.OK.name)
        latency = metrics.child(metrics.latency, *rpc)
        clock = time.perf_counter

        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            t0 = clock()
            try:
                if isinstance(request, _Undecodable):
                    raise self._undecodable(full_method, request)
                token = CALLER.set(guard(context.invocation_metadata())
                                   if guard is not None else None)
                try:
                    if limit_call is not None:  # after the guard: the key is the budget
                        limit_call(method)
                    out = inner(request, context)
                finally:
                    CALLER.reset(token)
            except Exception as exc:  # noqa: BLE001 - this IS the single mapping point
                code, message = status_of(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("rpc failed", extra={"method": full_method})
                elif not isinstance(exc, ServiceError | ValueError):
                    log.warning("rpc error", extra={"method": full_method, "error": message})
                metrics.observe_rpc(rpc, code.name, clock() - t0)
                if isinstance(exc, ResourceExhausted):  # the hint, machine-readable
                    context.set_trailing_metadata(
                        ((RETRY_AFTER_MS, str(math.ceil(exc.retry_after_s * 1000))),))
                context.abort(code, message)
            ok.inc()
            latency.observe(clock() - t0)
            return out

        return grpc.unary_unary_rpc_method_handler(
            wrapper,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _undecodable(self, full_method: str, request: _Undecodable) -> InvalidArgument:
        self._undecodable_log("undecodable requests answered INVALID_ARGUMENT",
                              method=full_method, error=str(request.error)[:200])
        return InvalidArgument("request", f"not a valid message for {full_method}")

    def _wrap_streaming(self, handler: Any, full_method: str) -> Any:
        def reject(request: _Undecodable, context: grpc.ServicerContext) -> None:
            code, message = status_of(self._undecodable(full_method, request))
            context.abort(code, message)

        def checked(requests: Iterable[Any], context: grpc.ServicerContext) -> Any:
            for request in requests:
                if isinstance(request, _Undecodable):
                    reject(request, context)
                yield request

        deserialize = _tolerant(handler.request_deserializer)
        serialize = handler.response_serializer
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    reject(request, context)
                return inner_us(request, context)
            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=deserialize, response_serializer=serialize)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary
            return grpc.stream_unary_rpc_method_handler(
                lambda it, context: inner_su(checked(it, context), context),
                request_deserializer=deserialize, response_serializer=serialize)
        inner_ss = handler.stream_stream
        return grpc.stream_stream_rpc_method_handler(
            lambda it, context: inner_ss(checked(it, context), context),
            request_deserializer=deserialize, response_serializer=serialize)


def deadline_check(context: grpc.ServicerContext) -> Callable[[str], None]:
    def check(what: str) -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= DEADLINE_MARGIN_S:
            raise DeadlineExceeded(f"deadline exceeded before {what}")
    return check


# -- request validation ------------------------------------------------------------------
class Validator:
    def __init__(self, settings: Settings) -> None:
        s = settings.server
        self.max_k = s.max_k
        self.max_batch = s.max_batch
        self.max_id = s.max_id_length
        self.max_title = s.max_title_length
        self.event_limits = EventLimits.from_settings(s)  # what bronze and ingest accept

    def id(self, field: str, value: str) -> str:
        problem = id_problem(value, self.max_id)
        if problem:
            raise InvalidArgument(field, problem)
        return value

    def ids(self, field: str, values: Iterable[str]) -> list[str]:
        values = list(values)
        if len(values) > self.max_batch:
            raise InvalidArgument(field, f"at most {self.max_batch} entries "
                                  f"(server.max_batch), got {len(values)}")
        max_id = self.max_id
        for i, v in enumerate(values):  # the entry's field name only when it is wrong
            problem = id_problem(v, max_id)
            if problem:
                raise InvalidArgument(f"{field}[{i}]", problem)
        return values

    def k(self, field: str, k: int) -> int:
        if k <= 0 or k > self.max_k:
            raise InvalidArgument(field, f"must be in [1, {self.max_k}], got {k}")
        return k

    def batch(self, field: str, n: int) -> None:
        if n == 0:
            raise InvalidArgument(field, "must not be empty")
        if n > self.max_batch:
            raise InvalidArgument(field, f"at most {self.max_batch} entries (server.max_batch), "
                                  f"got {n}")

    def filters(self, f: pb.Filters, *, prefix: str = "filters") -> FilterSpec:
        empty: frozenset[str] = frozenset()
        return FilterSpec(
            exclude_seen=f.exclude_seen if f.HasField("exclude_seen") else True,
            exclude_item_ids=frozenset(self.ids(f"{prefix}.exclude_item_ids",
                                                f.exclude_item_ids))
            if f.exclude_item_ids else empty,
            include_categories=frozenset(self.ids(f"{prefix}.include_categories",
                                                  f.include_categories))
            if f.include_categories else empty,
            exclude_categories=frozenset(self.ids(f"{prefix}.exclude_categories",
                                                  f.exclude_categories))
            if f.exclude_categories else empty,
            only_available=f.only_available if f.HasField("only_available") else True,
        )


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _add_items(items: Any, result: Result) -> None:
    """Append `result`'s items to a repeated ScoredItem field (`add` is about twice as
    fast as constructing ScoredItem messages and a list of them)."""
    add = items.add
    for i, s, b in result.items:
        item = add(item_id=i, score=s)
        if b:
            item.because.extend(b)


def event_to_dict(e: pb.Event) -> dict[str, Any]:
    """A protobuf Event as the dict `lake.validation.validate_event` checks."""
    ts: Any = None
    if e.HasField("ts"):
        try:
            ts = e.ts.ToDatetime(tzinfo=UTC)
        except (ValueError, OverflowError):
            ts = f"<invalid Timestamp seconds={e.ts.seconds} nanos={e.ts.nanos}>"
    return {
        "event_id": e.event_id,
        "user_id": e.user_id,
        "item_id": e.item_id,
        "event_type": e.event_type,
        "value": e.value if e.HasField("value") else None,
        "ts": ts,
        "session_id": e.session_id or None,
        "properties": dict(e.properties) or None,
        "recommendation_id": e.recommendation_id,  # "" = none
    }


# -- servicers ---------------------------------------------------------------------------
class RecommenderServicer(recommender_pb2_grpc.RecommenderServicer):
    def __init__(self, settings: Settings, engine: Recommender, ingest: Any,
                 metrics: Metrics, *, limits: RateLimits | None = None,
                 experiments: ExperimentArms | None = None) -> None:
        """`limits`: the per-key rate limits (the events/s half is counted here, calls/s by
        the interceptor); None = no events/s limit. `experiments`: the running experiment
        (`arm_for(user_id)` picks each Recommend's arm); None = no experiments."""
        self.settings = settings
        self.engine = engine
        self.experiments = experiments
        self.ingest = ingest
        self.metrics = metrics
        self.v = Validator(settings)
        self.limits = limits
        self.gate = IngestGate.from_settings(settings.server)
        self.gate_min_events = settings.server.ingest_gate_min_events
        self._by_strategy: dict[str, Any] = {}  # strategy -> its counter child
        # Impressions (`online.impressions`): every answer gets an id; the recorder (None
        # for an ingest without one) keeps the sampled ones for bronze_impressions.
        self.impressions = getattr(ingest, "impressions", None)
        self._by_impression: dict[tuple[str, str, str, str], Any] = {}  # counter children

    def Recommend(self, request: pb.RecommendRequest,  # noqa: N802 (gRPC names)
                  context: grpc.ServicerContext) -> pb.RecommendResponse:
        call = self._recommend_call(request)
        check = deadline_check(context)
        check("recommend")
        resp = pb.RecommendResponse()
        self._answer(call, check, resp)
        return resp

    def RecommendBatch(self, request: pb.RecommendBatchRequest,  # noqa: N802
                       context: grpc.ServicerContext) -> pb.RecommendBatchResponse:
        self.v.batch("requests", len(request.requests))
        calls = [self._recommend_call(r, f"requests[{i}].")
                 for i, r in enumerate(request.requests)]  # all valid before any work
        self._check_answer_fits(calls)
        check = deadline_check(context)
        resp = pb.RecommendBatchResponse()
        add = resp.responses.add
        for call in calls:
            check("recommend")
            self._answer(call, check, add())
        return resp

    def _check_answer_fits(self, calls: list[tuple[str, int, FilterSpec, list[str], bool]]
                           ) -> None:
        """Refuse up front a batch whose answer may exceed `server.max_message_bytes`
        (rather than computing it and failing on the way out)."""
        items, id_bytes, version_bytes = self.engine.answer_bounds()
        # wire bytes: ScoredItem = tag + length + (tag + length + id) + float; explain adds
        # up to MAX_BECAUSE ids; each answer adds its wrapper, version and strategy
        per_item = 4 + _varint_len(id_bytes) + id_bytes + 5
        per_because = 1 + _varint_len(id_bytes) + id_bytes
        total = 0
        for _, k, _, _, explain in calls:
            n = min(k, items)
            item_bytes = per_item + (MAX_BECAUSE * per_because if explain else 0)
            answer = n * item_bytes + version_bytes + 4
            total += answer + 1 + _varint_len(answer)
        limit = self.settings.server.max_message_bytes
        if total > limit:
            raise InvalidArgument("requests", f"the answer may take {total} bytes "
                                  f"({len(calls)} requests, up to {sum(c[1] for c in calls)} "
                                  f"items), above server.max_message_bytes {limit}: send "
                                  "fewer requests per call or a smaller k")

    def _recommend_call(self, request: pb.RecommendRequest,
                        prefix: str = "") -> tuple[str, int, FilterSpec, list[str], bool]:
        v = self.v
        return (v.id(f"{prefix}user_id", request.user_id), v.k(f"{prefix}k", request.k),
                v.filters(request.filters, prefix=f"{prefix}filters"),
                v.ids(f"{prefix}context_item_ids", request.context_item_ids),
                # the "because" items are the user's history: only for keys allowed to read it
                request.explain and caller_has("history"))

    def _answer(self, call: tuple[str, int, FilterSpec, list[str], bool],
                check: Callable[[str], None], resp: pb.RecommendResponse) -> None:
        user_id, k, filters, ctx_items, explain = call
        # the user's experiment arm (None: none running, or outside its traffic)
        arm = self.experiments.arm_for(user_id) if self.experiments is not None else None
        result = self.engine.recommend(user_id, k, filters, context_item_ids=ctx_items,
                                       explain=explain, check=check, arm=arm)
        counter = self._by_strategy.get(result.strategy)
        if counter is None:  # first answer of this strategy
            counter = self._by_strategy[result.strategy] = self.metrics.child(
                self.metrics.strategy, result.strategy)
        counter.inc()
        resp.model_version = result.model_version
        resp.strategy = pb.STRATEGY_FALLBACK if result.strategy in (FALLBACK, POPULARITY) \
            else pb.STRATEGY_PERSONALISED
        experiment_id, arm_name = (arm.experiment_id, arm.arm) if arm is not None else ("", "")
        if arm is not None:
            resp.experiment_id = experiment_id
            resp.arm = arm_name
        _add_items(resp.items, result)
        resp.recommendation_id = self._shown(RECOMMEND, user_id, None, result, result.strategy,
                                             experiment_id, arm_name, filters, ctx_items)

    def _shown(self, surface: str, user_id: str | None, anchor_item_id: str | None,
               result: Result, strategy: str, experiment_id: str, arm: str,
               filters: FilterSpec, context_item_ids: list[str]) -> str:
        """The answer's new recommendation_id: counted, and recorded for bronze_impressions
        when sampled (an append to the recorder's list: no I/O here)."""
        rec_id = new_recommendation_id()
        key = (result.model_version, strategy, experiment_id, arm)
        counter = self._by_impression.get(key)
        if counter is None:  # first answer with these labels
            counter = self._by_impression[key] = self.metrics.impression_counter(*key)
        counter.inc()
        if self.impressions is not None:
            self.impressions.record(rec_id, caller_tenant(), surface, user_id, anchor_item_id,
                                    result.items, result.model_version, strategy,
                                    experiment_id, arm, filters, context_item_ids)
        return rec_id

    def SimilarItems(self, request: pb.SimilarItemsRequest,  # noqa: N802
                     context: grpc.ServicerContext) -> pb.SimilarItemsResponse:
        item_id = self.v.id("item_id", request.item_id)
        k = self.v.k("k", request.k)
        filters = self.v.filters(request.filters)
        # optional: who is looking (recorded on the impression, the answer ignores it)
        viewer = self.v.id("user_id", request.user_id) if request.user_id else None
        check = deadline_check(context)
        check("similar items")
        result = self.engine.similar(item_id, k, filters, check=check)
        resp = pb.SimilarItemsResponse(model_version=result.model_version)
        _add_items(resp.items, result)
        resp.recommendation_id = self._shown(SIMILAR, viewer, item_id, result,
                                             SIMILAR_STRATEGY, "", "", filters, [])
        return resp

    def IngestEvents(self, request: pb.IngestEventsRequest,  # noqa: N802
                     context: grpc.ServicerContext) -> pb.IngestEventsResponse:
        # the cheap refusals first: no event is looked at before the size and rate checks
        self.v.batch("events", len(request.events))
        if self.limits is not None:
            self.limits.events(len(request.events))
        if len(request.events) < self.gate_min_events:
            return self._ingest(request, context)
        with self.gate.turn(context.time_remaining()):
            return self._ingest(request, context)

    def _ingest(self, request: pb.IngestEventsRequest,
                context: grpc.ServicerContext) -> pb.IngestEventsResponse:
        events = [event_to_dict(e) for e in request.events]
        if request.atomic:  # all or nothing: check every event before any is stored
            now = datetime.now(UTC)
            for i, e in enumerate(events):
                validate_event(i, e, now=now, limits=self.v.event_limits)  # raises -> 400
        deadline_check(context)("ingest")
        # event ids are unique per tenant (the caller's key name): see online.ingest
        result = self.ingest.ingest(events, tenant=caller_tenant())
        if request.atomic and result.rejected:  # the pipeline disagrees with our check
            i, reason = result.rejected[0]
            raise InvalidArgument(f"events[{i}]", reason)
        changed = self.engine.apply_events(result.accepted)
        events_total = self.metrics.events
        self.metrics.child(events_total, "accepted").inc(len(result.accepted))
        self.metrics.child(events_total, "duplicate").inc(result.duplicates)
        self.metrics.child(events_total, "rejected").inc(len(result.rejected))
        for lag in changed["lags"]:
            self.metrics.ingest_lag.observe(lag)
        if changed["new_items"]:
            log.info("items folded in online", extra={"items": changed["new_items"]})
            model = self.engine.manager.current
            self.metrics.online_items.set(model.online_items if model else 0)
        self.metrics.online_users.set(len(self.engine.state))
        return pb.IngestEventsResponse(
            accepted=len(result.accepted), duplicates=result.duplicates,
            rejected=[pb.RejectedEvent(index=i, reason=r) for i, r in result.rejected],
        )

    def UpsertItems(self, request: pb.UpsertItemsRequest,  # noqa: N802
                    context: grpc.ServicerContext) -> pb.UpsertItemsResponse:
        self.v.batch("items", len(request.items))
        rows, seen = [], set()
        for i, it in enumerate(request.items):
            item_id = self.v.id(f"items[{i}].item_id", it.item_id)
            if item_id in seen:
                raise InvalidArgument(f"items[{i}].item_id", f"duplicate item_id {item_id!r}")
            seen.add(item_id)
            price = it.price if it.HasField("price") else None
            if price is not None and (price != price or price < 0 or price == float("inf")):
                raise InvalidArgument(f"items[{i}].price", f"must be finite and >= 0, got {price}")
            category = it.category if it.HasField("category") else None
            if category is not None:
                category = self.v.id(f"items[{i}].category", category)
            row: dict[str, Any] = {"item_id": item_id}  # absent fields keep their values
            if it.HasField("category"):
                row["category"] = category
            if it.HasField("price"):
                row["price"] = price
            if it.HasField("available"):
                row["available"] = it.available
            if it.HasField("title"):
                if len(it.title) > self.v.max_title:
                    raise InvalidArgument(f"items[{i}].title", f"longer than "
                                          f"server.max_title_length {self.v.max_title}")
                problem = text_problem(it.title)
                if problem:
                    raise InvalidArgument(f"items[{i}].title", problem)
                row["title"] = it.title
            rows.append(row)
        deadline_check(context)("upsert")
        n = self.engine.catalog.upsert(rows)
        return pb.UpsertItemsResponse(upserted=n)


def _ts(iso: str | None) -> Timestamp | None:
    if not iso:
        return None
    t = Timestamp()
    t.FromDatetime(datetime.fromisoformat(iso))
    return t


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, engine: Recommender, state: OnlineState, ingest: Any,
                 metrics: Metrics, validator: Validator,
                 reload: Callable[[str | None], dict[str, Any]], *,
                 experiments: ExperimentArms | None = None) -> None:
        self.engine = engine
        self.state = state
        self.ingest = ingest
        self.metrics = metrics
        self.v = validator
        self._reload = reload
        self.experiments = experiments

    def ReloadModel(self, request: admin_pb2.ReloadModelRequest,  # noqa: N802
                    context: grpc.ServicerContext) -> admin_pb2.ReloadModelResponse:
        version = None
        if request.HasField("version"):
            try:
                version = check_version_name(request.version)
            except BundleError as e:
                raise InvalidArgument("version", str(e)) from None
        out = self._reload(version)
        return admin_pb2.ReloadModelResponse(
            model_version=out["version"], previous_version=out["previous"] or "",
            changed=out["changed"], refolded_users=out["refolded_users"],
            load_seconds=out["load_seconds"],
        )

    def ModelInfo(self, request: admin_pb2.ModelInfoRequest,  # noqa: N802
                  context: grpc.ServicerContext) -> admin_pb2.ModelInfoResponse:
        model = self.engine.manager.current
        if model is None:
            return admin_pb2.ModelInfoResponse(online_users=len(self.state))
        info = model.info()
        return admin_pb2.ModelInfoResponse(
            model_version=info["version"], backend=info["backend"], dim=info["dim"],
            n_users=info["n_users"], n_items=info["n_items"],
            online_items=info["online_items"], online_users=len(self.state),
            index_type=info["index_type"], created_at=_ts(info["created_at"]),
            loaded_at=_ts(info["loaded_at"]),
            metrics_json=json.dumps(info["metrics"], sort_keys=True, default=str),
            params_json=json.dumps(info["params"], sort_keys=True, default=str),
            **evaluation_fields(info["metrics"]),
        )

    def ForgetUser(self, request: admin_pb2.ForgetUserRequest,  # noqa: N802
                   context: grpc.ServicerContext) -> admin_pb2.ForgetUserResponse:
        user_id = self.v.id("user_id", request.user_id)
        removed = self.engine.forget_user(user_id)
        lake = self.ingest.forget_user(user_id)
        log.info("user forgotten", extra={"user_id": user_id, "lake": lake})
        return admin_pb2.ForgetUserResponse(user_id=user_id, online_state_removed=removed,
                                            lake_json=json.dumps(lake, sort_keys=True,
                                                                 default=str))


    # -- experiments (`online.experiment_arms`, `lake.experiments`) -----------------------
    def _arms(self) -> ExperimentArms:
        if self.experiments is None:
            raise FailedPrecondition("experiments are not enabled on this server")
        return self.experiments

    def CreateExperiment(self, request: admin_pb2.CreateExperimentRequest,  # noqa: N802
                         context: grpc.ServicerContext) -> admin_pb2.Experiment:
        arms = [{"name": a.name, "share": a.share, "model_version": a.model_version,
                 "popularity": a.popularity, "settings": dict(a.settings)}
                for a in request.arms]
        traffic = request.traffic if request.HasField("traffic") else 1.0
        exp = self._arms().create(request.name, arms, traffic=traffic, salt=request.salt,
                                  description=request.description)
        return experiment_message(exp)

    def ListExperiments(self, request: admin_pb2.ListExperimentsRequest,  # noqa: N802
                        context: grpc.ServicerContext) -> admin_pb2.ListExperimentsResponse:
        return admin_pb2.ListExperimentsResponse(
            experiments=[experiment_message(e) for e in self._arms().list()])

    def GetExperiment(self, request: admin_pb2.GetExperimentRequest,  # noqa: N802
                      context: grpc.ServicerContext) -> admin_pb2.Experiment:
        return experiment_message(self._arms().get(self._experiment_id(request)))

    def StopExperiment(self, request: admin_pb2.StopExperimentRequest,  # noqa: N802
                       context: grpc.ServicerContext) -> admin_pb2.Experiment:
        return experiment_message(self._arms().stop(self._experiment_id(request)))

    def _experiment_id(self, request: Any) -> str:
        return self.v.id("experiment_id", request.experiment_id)


def experiment_message(e: Experiment) -> admin_pb2.Experiment:
    """`lake.experiments.Experiment` as the Admin API's message."""
    msg = admin_pb2.Experiment(
        experiment_id=e.experiment_id, name=e.name, salt=e.salt, traffic=e.traffic,
        state=e.state, description=e.description,
        arms=[admin_pb2.ExperimentArm(name=a.name, share=a.share,
                                      model_version=a.model_version,
                                      popularity=a.popularity, settings=dict(a.settings))
              for a in e.arms])
    msg.started_at.FromDatetime(e.started_at)
    if e.stopped_at is not None:
        msg.stopped_at.FromDatetime(e.stopped_at)
    return msg


def service_names() -> Sequence[str]:
    return (pb.DESCRIPTOR.services_by_name["Recommender"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name)
