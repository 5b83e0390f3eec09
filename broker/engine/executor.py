"""The executor: one attempt of one batch on one key, and what its outcome means.

For every batch a key dispatches it builds the request, authorizes it (token or SigV4,
now, after the pacer), sends it, parses the answer, and then routes the outcome:
results to their callers; a 429 back to the head of the queue (the key's lowered pacer
is the backoff); an expired token or signature to a refresh and an immediate retry;
a transient failure to a jittered delay; an endpoint that cannot be reached to a paused
key and a re-queued batch that spends no attempt (until the outage budget is spent); a
key-level error to taking the key out of rotation while other keys go on. Retries loop
here and never go back upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from broker.engine.batcher import Batch, Lookup, WorkQueue
from broker.engine.keys import OUTAGE_CODE
from broker.errors import (
    ApiError,
    AuthError,
    BrokerError,
    EndpointUnreachable,
    KeyUnusableError,
    NoUsableKeyError,
    ResponseError,
    Scope,
    ServerError,
    ThrottledError,
    TransportError,
    describe,
)
from broker.models import ErrorDetail, ItemResult, Status

if TYPE_CHECKING:
    from broker.api.base import Dialect, HttpRequest, ItemOutcome, RawResponse
    from broker.clock import Clock
    from broker.engine.keys import KeyState
    from broker.engine.metrics import EngineMetrics
    from broker.engine.retry import RetryPolicy
    from broker.engine.transport import Transport

__all__ = ["Executor"]

logger = structlog.get_logger("broker")

#: Token refreshes / re-signings one batch may trigger before the key is judged broken.
_MAX_AUTH_RETRIES = 2
#: Times a response may leave out a requested ASIN before it is reported not found.
_MAX_MISSING = 3


@dataclass(frozen=True, slots=True)
class _Retry:
    """Put the batch back after ``delay_s`` (0: at once, at the head of the queue)."""

    delay_s: float


class Executor:
    """Runs attempts and routes their outcomes; shared by every key of one broker."""

    def __init__(
        self,
        *,
        dialect: Dialect,
        transport: Transport,
        work: WorkQueue,
        keys: Sequence[KeyState],
        policy: RetryPolicy,
        clock: Clock,
        metrics: EngineMetrics,
        spawn: Callable[[object], None],
    ) -> None:
        self._dialect = dialect
        self._transport = transport
        self._work = work
        self._keys = keys
        self._policy = policy
        self._clock = clock
        self._metrics = metrics
        self._spawn = spawn
        #: marketplaces no key can serve any more, with the failures that caused it
        self._dead: dict[str, NoUsableKeyError] = {}

    # -- coverage -------------------------------------------------------------------------

    def check_servable(self, marketplace: str) -> None:
        """Raise :class:`NoUsableKeyError` when no key can serve ``marketplace``."""
        dead = self._dead.get(marketplace)
        if dead is not None:
            # A fresh instance per raise: re-raising one stored exception grows its traceback.
            raise NoUsableKeyError(dead.marketplace, dead.failures)
        if not any(key.serves(marketplace) for key in self._keys):
            raise self._no_key_error(marketplace)

    def _no_key_error(self, marketplace: str) -> NoUsableKeyError:
        failures = [
            failure for key in self._keys if (failure := key.failure_for(marketplace)) is not None
        ]
        if not failures and not any(key.has_tag(marketplace) for key in self._keys):
            failures = [
                KeyUnusableError(
                    key.name,
                    "InvalidPartnerTag",
                    f"key has no partner tag for {marketplace}",
                    f"add {marketplace} to keys.partner_tags in config.toml",
                )
                for key in self._keys
            ]
        return NoUsableKeyError(marketplace, failures)

    # -- the attempt ----------------------------------------------------------------------

    async def run(self, key: KeyState, batch: Batch, sent_at: float, demand_limited: bool) -> None:
        """Carry out one attempt of ``batch`` on ``key`` and route its outcome.

        An unexpected exception (a bug) fails the batch instead of leaving its callers
        waiting forever; cancellation passes through.
        """
        try:
            await self._attempt(key, batch, sent_at, demand_limited)
        except Exception as exc:
            logger.exception(
                "broker.attempt_crashed",
                key=key.name,
                batch_id=batch.batch_id,
                error=type(exc).__name__,
            )
            key.on_failed_attempt(transient=True)
            self._fail(batch, exc, key=key.name)

    async def _attempt(
        self, key: KeyState, batch: Batch, sent_at: float, demand_limited: bool
    ) -> None:
        if batch.operation is None:
            # Lookups every caller gave up on while the batch queued are not asked for.
            batch.lookups = [lookup for lookup in batch.lookups if not lookup.future.done()]
            if not batch.lookups:
                return
        self._count_attempt(batch, sent_at)
        region = key.region(batch.marketplace)
        request: HttpRequest | None = None
        try:
            request = self._build(key, batch)
            request = await key.authorizer.authorize(request, region=region)
        except (TransportError, ResponseError, ServerError, ThrottledError) as exc:
            # The token endpoint is down, slow or throttling: not this batch's fault, and
            # no reason to take the key out of rotation (B13), unless it lasts (B15).
            self._uncount_attempt(batch)
            if isinstance(exc, EndpointUnreachable):
                spent = key.on_unreachable(exc, sent_at)
            else:
                spent = key.pause_after_error(exc)
            key.on_failed_attempt(transient=True)
            if spent:
                self._end_outage(key, batch.marketplace, exc)
            self.requeue(batch)
            return
        except ApiError as exc:
            self._uncount_attempt(batch)
            self._take_out(key, batch.marketplace, exc)
            self.requeue(batch)
            return
        self._metrics.requests += 1
        key.sent += 1
        # Every send counts toward the retry budget, failed ones included: the budget is a
        # share of sends, and a storm of failures must not shrink it to its floor.
        key.retry_budget.record_send()
        response: RawResponse | None = None
        try:
            response = await self._transport.send(request)
            key.on_reachable()
            self._metrics.record_response(response.status, response.elapsed_s)
            if batch.operation is None:
                parsed = self._dialect.parse_get_items(response, batch.asins)
            else:
                data = self._dialect.parse_operation(response)
        except ThrottledError as exc:
            self._metrics.throttled += 1
            key.on_throttled(exc, sent_at)
            self._count_throttle(batch)
            self.requeue(batch)
            return
        except ApiError as exc:
            key.on_failed_attempt(transient=isinstance(exc, ServerError))
            self._on_api_error(key, batch, request, exc)
            return
        except (TransportError, ResponseError) as exc:
            if isinstance(exc, TransportError):
                self._metrics.transport_errors += 1
            key.errors += 1
            key.on_failed_attempt(transient=True)
            if isinstance(exc, EndpointUnreachable):
                # Nothing reached Amazon: the batch waits out the outage with its attempts
                # intact instead of failing for a network it cannot fix (B15).
                self._uncount_attempt(batch)
                if key.on_unreachable(exc, sent_at):
                    self._end_outage(key, batch.marketplace, exc)
                self.requeue(batch)
                return
            if isinstance(exc, ResponseError):
                # The request id lets Amazon find the answer; the body stays out of the log
                # (a token endpoint's body is a credential) (B7).
                logger.warning(
                    "broker.bad_response",
                    key=key.name,
                    batch_id=batch.batch_id,
                    status=exc.status,
                    request_id=_request_id(response),
                    error=str(exc),
                )
            self._transient(key, batch, exc)
            return
        key.on_success(sent_at, demand_limited=demand_limited)
        if batch.operation is None:
            if parsed.unexpected or parsed.duplicated:
                logger.warning(
                    "broker.unexpected_items",
                    key=key.name,
                    batch_id=batch.batch_id,
                    request_id=_request_id(response),
                    unrequested=list(parsed.unexpected[:10]),
                    duplicated=list(parsed.duplicated[:10]),
                )
            self._deliver(key, batch, parsed.outcomes, parsed.missing)
        else:
            if batch.op_future is not None and not batch.op_future.done():
                batch.op_future.set_result(data)

    def _build(self, key: KeyState, batch: Batch) -> HttpRequest:
        tag = key.partner_tag(batch.marketplace)
        if batch.operation is None:
            return self._dialect.get_items_request(
                batch.asins,
                marketplace=batch.marketplace,
                partner_tag=tag,
                resources=batch.resources,
            )
        return self._dialect.operation_request(
            batch.operation,
            batch.params or {},
            marketplace=batch.marketplace,
            partner_tag=tag,
        )

    # -- attempt bookkeeping ----------------------------------------------------------------

    @staticmethod
    def _count_attempt(batch: Batch, sent_at: float) -> None:
        if batch.operation is not None:
            batch.op_attempts += 1
            if batch.op_first_sent_at is None:
                batch.op_first_sent_at = sent_at
            return
        for lookup in batch.lookups:
            lookup.attempts += 1
            if lookup.first_sent_at is None:
                lookup.first_sent_at = sent_at

    @staticmethod
    def _uncount_attempt(batch: Batch) -> None:
        # An attempt that never reached Amazon does not start the max_age clock either:
        # otherwise the first 5xx after a long outage would fail the batch as too old.
        if batch.operation is not None:
            batch.op_attempts -= 1
            if batch.op_attempts == 0:
                batch.op_first_sent_at = None
            return
        for lookup in batch.lookups:
            lookup.attempts -= 1
            if lookup.attempts == 0:
                lookup.first_sent_at = None

    @staticmethod
    def _count_throttle(batch: Batch) -> None:
        if batch.operation is not None:
            batch.op_throttles += 1
            return
        for lookup in batch.lookups:
            lookup.throttles += 1

    # -- outcomes ---------------------------------------------------------------------------

    def _deliver(
        self,
        key: KeyState,
        batch: Batch,
        outcomes: Mapping[str, ItemOutcome],
        missing: Sequence[str],
    ) -> None:
        fetched_at = self._clock.utcnow()
        missing_set = set(missing)
        for lookup in batch.lookups:
            outcome = outcomes.get(lookup.asin)
            if outcome is not None:
                status = outcome.status
                if status is Status.INVALID:
                    # Every id sent was validated first, so an item-level "invalid" in a 200
                    # (InvalidParameterValue) means no such item here (protocol.md 4).
                    status = Status.NOT_FOUND
                self._resolve(
                    lookup,
                    ItemResult(
                        lookup.asin,
                        lookup.marketplace,
                        status,
                        outcome.item,
                        outcome.summary,
                        outcome.error,
                        lookup.attempts,
                        key.name,
                        fetched_at,
                    ),
                )
            elif lookup.asin in missing_set or not lookup.future.done():
                lookup.missing += 1
                if lookup.missing >= _MAX_MISSING:
                    info = describe("MissingFromResponse")
                    self._resolve(
                        lookup,
                        ItemResult(
                            lookup.asin,
                            lookup.marketplace,
                            Status.NOT_FOUND,
                            None,
                            None,
                            ErrorDetail(
                                info.code,
                                "Amazon's responses did not mention this ASIN "
                                f"{lookup.missing} times",
                                info.remedy,
                            ),
                            lookup.attempts,
                            key.name,
                            fetched_at,
                        ),
                    )
                else:
                    # Re-ask singly: a one-ASIN request isolates whatever made it drop out.
                    self.requeue(Batch(lookup.marketplace, [lookup]))

    def _resolve(self, lookup: Lookup, result: ItemResult) -> None:
        if not lookup.future.done():
            lookup.future.set_result(result)
            self._metrics.record_item(result.status.value)

    def _fail(
        self,
        batch: Batch,
        error: BaseException | ErrorDetail,
        *,
        key: str | None = None,
        status: Status = Status.FAILED,
    ) -> None:
        """End every open lookup of ``batch`` with ``error`` (a NoUsableKeyError is raised)."""
        if isinstance(error, NoUsableKeyError):
            for future in self._futures(batch):
                if not future.done():
                    future.set_exception(error)
            return
        detail = error if isinstance(error, ErrorDetail) else _detail(error)
        if batch.operation is not None:
            if batch.op_future is not None and not batch.op_future.done():
                batch.op_future.set_exception(
                    error if isinstance(error, BaseException) else BrokerError(detail.message)
                )
            return
        fetched_at = self._clock.utcnow()
        for lookup in batch.lookups:
            self._resolve(
                lookup,
                ItemResult(
                    lookup.asin,
                    lookup.marketplace,
                    status,
                    None,
                    None,
                    detail,
                    lookup.attempts,
                    key,
                    fetched_at,
                ),
            )

    @staticmethod
    def _futures(batch: Batch) -> list[asyncio.Future[object]]:
        if batch.operation is not None:
            return [batch.op_future] if batch.op_future is not None else []  # type: ignore[list-item]
        return [lookup.future for lookup in batch.lookups]  # type: ignore[misc]

    def requeue(self, batch: Batch, *, front: bool = True) -> None:
        """Put a batch back for any key, or fail it if no key can serve its marketplace."""
        if not batch.live():
            return
        if batch.operation is None:
            batch.lookups = [lookup for lookup in batch.lookups if not lookup.future.done()]
        try:
            self.check_servable(batch.marketplace)
        except NoUsableKeyError as exc:
            self._fail(batch, exc)
            return
        if front:
            self._work.put_front(batch)
        else:
            self._work.put(batch)

    def _on_api_error(
        self, key: KeyState, batch: Batch, request: HttpRequest, exc: ApiError
    ) -> None:
        info = exc.info
        if isinstance(exc, ServerError) or (
            info.retryable and info.scope is Scope.REQUEST and not isinstance(exc, AuthError)
        ):
            key.errors += 1
            self._transient(key, batch, exc)
            return
        if isinstance(exc, AuthError) and info.retryable:
            # TokenExpired / InvalidToken / RequestExpired: new credentials, try again now.
            if batch.auth_retries < _MAX_AUTH_RETRIES and key.authorizer.recover(exc, request):
                batch.auth_retries += 1
                self._uncount_attempt(batch)
                logger.info("broker.credentials_refreshed", key=key.name, code=exc.code)
                self.requeue(batch)
                return
            # Fresh credentials were refused too: the catalogue's remedy ("the broker
            # fetches a new token") no longer applies, so say what does (B11).
            self._disable(
                key,
                batch.marketplace,
                exc.code,
                f"credentials rejected: {exc.code} again after {batch.auth_retries} fresh "
                f"token(s) or signature(s): {exc.message}",
                "credentials rejected: check the key's credential id, secret and version "
                "(and, for PA-API, this machine's clock) in config.toml and Associates Central",
                scope=Scope.KEY,
            )
            self._uncount_attempt(batch)
            self.requeue(batch)
            return
        offending = _offending_ids(exc)
        if offending and batch.operation is None:
            self._split_invalid(key, batch, exc, offending)
            return
        if info.scope in (Scope.KEY, Scope.KEY_MARKETPLACE, Scope.GLOBAL):
            self._take_out(key, batch.marketplace, exc)
            self._uncount_attempt(batch)
            self.requeue(batch)
            return
        if info.scope is Scope.ASIN and batch.operation is None and len(batch.lookups) > 1:
            # An id-level error for the whole request that names no id: ask each alone.
            for lookup in batch.lookups:
                self.requeue(Batch(batch.marketplace, [lookup]))
            return
        status = Status.INVALID if info.scope is Scope.ASIN else Status.FAILED
        # The exception itself, so an operation's caller gets the ApiError (code, status).
        self._fail(batch, exc, key=key.name, status=status)

    def _split_invalid(
        self, key: KeyState, batch: Batch, exc: ApiError, offending: Sequence[str]
    ) -> None:
        """PA-API failed the whole request for malformed ids: mark them, re-send the rest."""
        bad = set(offending)
        fetched_at = self._clock.utcnow()
        rest: list[Lookup] = []
        for lookup in batch.lookups:
            if lookup.asin in bad:
                self._resolve(
                    lookup,
                    ItemResult(
                        lookup.asin,
                        lookup.marketplace,
                        Status.INVALID,
                        None,
                        None,
                        _detail(exc),
                        lookup.attempts,
                        key.name,
                        fetched_at,
                    ),
                )
            else:
                rest.append(lookup)
        if rest:
            if len(rest) == len(batch.lookups):
                # Nothing matched what Amazon named: isolate each id instead of looping.
                for lookup in rest:
                    self.requeue(Batch(batch.marketplace, [lookup]))
                return
            batch.lookups = rest
            self.requeue(batch)

    def _transient(self, key: KeyState, batch: Batch, exc: BaseException) -> None:
        now = self._clock.monotonic()
        if batch.operation is None:
            for lookup in batch.lookups:
                lookup.last_error = exc
            attempt = max((lk.attempts - lk.throttles for lk in batch.lookups), default=1)
            first = min((lk.first_sent_at or now for lk in batch.lookups), default=now)
        else:
            attempt = batch.op_attempts - batch.op_throttles
            first = batch.op_first_sent_at or now
        delay = self._policy.next_delay(attempt, exc)
        if delay is None or now - first + delay > self._policy.max_age_s:
            self._fail(batch, exc, key=key.name)
            return
        if not key.retry_budget.try_retry():
            # Retries are over 10 % of sends: slow down rather than storm (see retry.py on
            # why this waits instead of failing, and not a flat max_delay).
            delay = max(delay, self._policy.budget_delay(attempt))
        self._metrics.retries += 1
        logger.debug(
            "broker.retry_scheduled",
            key=key.name,
            batch_id=batch.batch_id,
            attempt=attempt,
            delay_s=round(delay, 3),
            error=type(exc).__name__,
        )
        if delay <= 0:
            self.requeue(batch)
        else:
            self._spawn(self._requeue_later(batch, delay))

    async def _requeue_later(self, batch: Batch, delay_s: float) -> None:
        await self._clock.sleep(delay_s)
        self.requeue(batch)

    def _take_out(self, key: KeyState, marketplace: str, exc: ApiError) -> None:
        """Take the key (or key+marketplace) out of rotation; fail work no key can serve."""
        info = exc.info
        self._disable(key, marketplace, exc.code, exc.message, info.remedy, scope=info.scope)

    def _end_outage(self, key: KeyState, marketplace: str, exc: BaseException) -> None:
        """The key found no endpoint for its whole outage budget: take it out (B15)."""
        self._disable(
            key,
            marketplace,
            OUTAGE_CODE,
            f"no answer from the API or its token endpoint for {key.outage_s:.0f} s "
            f"(last error: {exc})",
            "check the network, DNS, proxy or firewall and api.endpoint, then run again: "
            "unfinished lookups were not failed; retry.outage_budget_s sets how long a run "
            "waits",
            scope=Scope.KEY,
        )

    def _disable(
        self,
        key: KeyState,
        marketplace: str,
        code: str,
        message: str,
        remedy: str,
        *,
        scope: Scope,
    ) -> None:
        """Take the key (or key+marketplace) out of rotation; fail work no key can serve."""
        scope_marketplace = marketplace if scope is Scope.KEY_MARKETPLACE else None
        if key.disable(code, message, remedy, marketplace=scope_marketplace):
            logger.error(
                "broker.key_disabled",
                key=key.name,
                code=code,
                message=message,
                remedy=remedy,
                marketplace=scope_marketplace,
            )
        affected_marketplaces = (
            {marketplace} if scope_marketplace else set(key.tagged_marketplaces) | {marketplace}
        )
        for affected in affected_marketplaces:
            if affected in self._dead or any(k.serves(affected) for k in self._keys):
                continue
            self._dead[affected] = self._no_key_error(affected)
            for batch in self._work.drain(affected):
                self._fail(batch, self._dead[affected])
        self._work.wake()


def _detail(error: BaseException) -> ErrorDetail:
    """An output-row error for an exception, with the catalogue's remedy."""
    if isinstance(error, ApiError):
        return ErrorDetail(error.code, error.message, error.info.remedy)
    if isinstance(error, TransportError):
        code = "TransportError"
    elif isinstance(error, ResponseError):
        code = "BadResponse"
    else:
        code = type(error).__name__
    info = describe(code)
    return ErrorDetail(code, str(error), info.remedy)


def _request_id(response: RawResponse | None) -> str | None:
    """Amazon's id of one answer (``x-amzn-RequestId``), to quote in logs instead of its body."""
    if response is None:
        return None
    return response.headers.get("x-amzn-requestid")


def _offending_ids(exc: ApiError) -> tuple[str, ...]:
    ids = getattr(exc, "invalid_ids", ())
    return tuple(ids) if isinstance(ids, tuple | list) else ()
