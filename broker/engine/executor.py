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

import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from broker.api.errors_map import request_id
from broker.api.oauth import bearer_token
from broker.engine.batcher import Batch, BatchPlace, Lookup
from broker.engine.keys import OUTAGE_CODE, OUTAGE_RETRY_S, CredentialsVerdict
from broker.engine.transport import OUT_OF_FILES
from broker.errors import (
    ApiError,
    AuthError,
    BrokerError,
    ConfigError,
    EndpointUnreachable,
    NetworkRefused,
    NoUsableKeyError,
    ResponseError,
    Scope,
    ServerError,
    ThrottledError,
    TransportError,
    describe,
)
from broker.logs import get_logger, scrub
from broker.models import ErrorDetail, ItemResult, Status

if TYPE_CHECKING:
    from broker.api.base import Dialect, HttpRequest, ItemOutcome, RawResponse
    from broker.clock import Clock
    from broker.engine.attempt import Attempts
    from broker.engine.keys import KeyState
    from broker.engine.metrics import EngineMetrics
    from broker.engine.retry import RetryPolicy
    from broker.engine.scheduler import KeyPool
    from broker.engine.transport import Transport

__all__ = ["CRASH_REMEDY", "Executor"]

logger = get_logger("broker")
#: The stdlib logger behind ``logger``: per-request events are built only when it shows them.
_LOG = logging.getLogger("broker")

#: Token refreshes / re-signings one batch may trigger before the key is judged broken.
_MAX_AUTH_RETRIES = 2
#: What a row failed by a fault inside the broker (an exception no layer expected) says.
CRASH_REMEDY = (
    "A fault in the broker, not an answer of Amazon's: its traceback is logged as "
    "broker.attempt_crashed; report it with the broker version."
)
#: Times a response may leave out a requested ASIN before it is reported not found.
_MAX_MISSING = 3


class Executor:
    """Runs attempts and routes their outcomes; shared by every key of one broker."""

    def __init__(
        self,
        *,
        dialect: Dialect,
        transport: Transport,
        pool: KeyPool,
        policy: RetryPolicy,
        clock: Clock,
        metrics: EngineMetrics,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        self._dialect = dialect
        self._transport = transport
        self._pool = pool
        self._policy = policy
        self._clock = clock
        self._metrics = metrics
        self._spawn = spawn
        # When each (event, key, code) was last logged at warning level (see _say).
        self._told_at: dict[tuple[str, str, str], float] = {}

    # -- the attempt ----------------------------------------------------------------------

    async def run(self, key: KeyState, batch: Batch, sent_at: float, demand_limited: bool) -> None:
        """Carry out one attempt of ``batch`` on ``key`` and route its outcome.

        An unexpected exception (a bug) fails the batch instead of leaving its callers
        waiting forever; cancellation passes through. So do a process out of open files
        and a proxy variable no proxy URL (a ConfigError at the first send through it): they
        stop the engine (every caller gets the error; a job's rows stay pending), as no
        retry mends them and failing batch after batch would fail every row.
        """
        try:
            await self._attempt(key, batch, sent_at, demand_limited)
        except Exception as exc:
            if isinstance(exc, ConfigError) or (
                isinstance(exc, OSError) and exc.errno in OUT_OF_FILES
            ):
                raise
            logger.exception(
                "broker.attempt_crashed",
                key=key.name,
                batch_id=batch.batch_id,
                error=type(exc).__name__,
            )
            key.on_failed_attempt(transient=True, reached=False)
            # A row's code names the exception, as for any error; its remedy is not the
            # catalogue's "read Amazon's message": the fault is the broker's own. An
            # operation's caller gets the exception itself.
            crash: BaseException | ErrorDetail = exc
            if batch.operation is None:
                crash = ErrorDetail(type(exc).__name__, str(exc), CRASH_REMEDY)
            self._fail(batch, crash, key=key.name)

    async def _attempt(
        self, key: KeyState, batch: Batch, sent_at: float, demand_limited: bool
    ) -> None:
        if not batch.live():
            # Every caller gave up while the batch queued: nothing is asked, and a probe
            # slot the key claimed for it goes to the next send (N9).
            key.abandon_probe()
            return
        attempts = batch.attempts
        drop = key.authorizer.dropped()
        if drop is not None and attempts.bounced_at_drop != drop:
            # The token went stale after this send was booked (a TokenExpired answered while
            # it waited for its slot). Fetched now, it would send late, closer to the key's
            # next send than its interval (a strict server's 429): the batch goes back, once
            # per drop, and the key fetches the token before it books again. The slot goes
            # unused. Only a drop: a token endpoint failing is met by the send, which backs
            # off and counts toward the outage budget.
            attempts.bounced_at_drop = drop
            key.abandon_probe()
            self._pool.submit(batch, front=True)
            return
        attempts.begin(sent_at)
        region = key.region(batch.marketplace)
        # Read once, for the request and for its parse (a list built from the lookups).
        asins = batch.asins if batch.operation is None else []
        request: HttpRequest | None = None
        try:
            request = self._build(key, batch, asins)
            request = await key.authorizer.authorize(request, region=region)
        except NetworkRefused as exc:
            attempts.not_sent(self._clock.monotonic())
            self._refused_by_network(key, batch, exc)
            return
        except (TransportError, ResponseError, ServerError, ThrottledError) as exc:
            # The token endpoint is down, slow or throttling: not this batch's fault, and
            # no reason to take the key out of rotation (B13), unless it lasts (B15).
            attempts.not_sent(self._clock.monotonic(), outage=True)
            # The failure is the last fetch's, made ahead of the booking (prepare) or by
            # this attempt: the time without a token counts from the fetch's start.
            began = min(sent_at, key.authorizer.fetch_began())
            if isinstance(exc, EndpointUnreachable):
                spent = key.on_unreachable(exc, began)
            else:
                spent = key.pause_after_error(exc, began)
            key.on_failed_attempt(transient=True, reached=False)
            if spent:
                self._end_outage(key, batch.marketplace, exc, token_endpoint=True)
            self._pool.submit(batch, front=True)
            return
        except ApiError as exc:
            attempts.not_sent(self._clock.monotonic())
            self._take_out(key, batch.marketplace, exc)
            self._pool.submit(batch, front=True)
            return
        self._metrics.requests += 1
        if attempts.retry_due:
            attempts.retry_due = False
            self._metrics.retries += 1
        key.sent += 1
        # Every send counts toward the retry budget, failed ones included: the budget is a
        # share of sends, and a storm of failures must not shrink it to its floor.
        key.retry_budget.record_send()
        if len(asins) != len(batch.lookups):
            # A caller gave up while the request was authorized (a lookup leaves its batch,
            # none joins an active one): the answer is read for the lookups left.
            asins = batch.asins
        response: RawResponse | None = None
        try:
            response = await self._transport.send(request)
            if _LOG.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "broker.request",
                    key=key.name,
                    batch_id=batch.batch_id,
                    marketplace=batch.marketplace,
                    # Where it went (a PA-API store's host), without its query.
                    url=request.url.split("?", 1)[0],
                    status=response.status,
                    asins=len(asins),
                    elapsed_ms=round(response.elapsed_s * 1000, 1),
                    request_id=_request_id(response, request),
                )
            self._metrics.record_response(response.status, response.elapsed_s)
            if batch.operation is None:
                parsed = self._dialect.parse_get_items(response, asins)
            else:
                data = self._dialect.parse_operation(response, batch.operation)
        except ThrottledError as exc:
            key.on_reachable()
            self._metrics.throttled += 1
            verdict = key.on_throttled(exc, sent_at)
            attempts.throttled += 1
            attempts.requeued(self._clock.monotonic())
            if _LOG.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "broker.throttled",
                    key=key.name,
                    batch_id=batch.batch_id,
                    retry_after_s=exc.retry_after,
                    rate=round(key.limiter.rate, 3),
                    wait_s=round(max(0.0, key.next_ready() - self._clock.monotonic()), 3),
                    verdict=verdict.value,
                )
            self._pool.submit(batch, front=True)
            return
        except ApiError as exc:
            transient = _transient_api_error(exc)
            if transient:
                key.on_failed_answer()
            else:
                key.on_reachable()
            key.on_failed_attempt(transient=transient)
            shown = _without_credentials(exc, request)
            self._on_api_error(key, batch, request, shown, sent_at, transient=transient)
            return
        except NetworkRefused as exc:
            self._metrics.transport_errors += 1
            key.errors += 1
            attempts.not_sent(self._clock.monotonic())
            self._refused_by_network(key, batch, exc)
            return
        except (TransportError, ResponseError) as exc:
            if isinstance(exc, TransportError):
                self._metrics.transport_errors += 1
            key.errors += 1
            key.on_failed_attempt(transient=True, reached=not isinstance(exc, EndpointUnreachable))
            if isinstance(exc, EndpointUnreachable):
                # Nothing reached Amazon: the batch waits out the outage with its attempts
                # intact and its age stopped, instead of failing for a network it cannot
                # fix (B15, K6).
                attempts.not_sent(self._clock.monotonic(), outage=True)
                if key.on_unreachable(exc, sent_at):
                    self._end_outage(key, batch.marketplace, exc)
                self._pool.submit(batch, front=True)
                return
            key.on_failed_answer()
            if isinstance(exc, ResponseError):
                # The request id lets Amazon find the answer; the body stays out of the log
                # (a token endpoint's body is a credential) (B7).
                say = self._say("broker.bad_response", key.name, str(exc.status))
                if say is not None:
                    say(
                        "broker.bad_response",
                        key=key.name,
                        batch_id=batch.batch_id,
                        status=exc.status,
                        request_id=_request_id(response, request),
                        error=str(exc),
                        note=_SAID_ONCE,
                    )
            self._transient(key, batch, exc, sent_at)
            return
        key.on_reachable()
        key.on_success(sent_at, batch.marketplace, demand_limited=demand_limited)
        if batch.operation is None:
            say = (
                self._say("broker.unexpected_items", key.name, "")
                if parsed.unexpected or parsed.duplicated
                else None
            )
            if say is not None:
                say(
                    "broker.unexpected_items",
                    key=key.name,
                    batch_id=batch.batch_id,
                    request_id=_request_id(response, request),
                    unrequested=list(parsed.unexpected[:10]),
                    duplicated=list(parsed.duplicated[:10]),
                    note=_SAID_ONCE,
                )
            self._deliver(key, batch, parsed.outcomes, parsed.missing)
        elif batch.op_future is not None and not batch.op_future.done():
            batch.op_future.set_result(data)

    def _build(self, key: KeyState, batch: Batch, asins: Sequence[str]) -> HttpRequest:
        """The request of ``batch``; ``asins`` are its ASINs (a GetItems batch's)."""
        tag = key.partner_tag(batch.marketplace)
        if batch.operation is None:
            return self._dialect.get_items_request(
                asins,
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

    # -- outcomes ---------------------------------------------------------------------------

    def _deliver(
        self,
        key: KeyState,
        batch: Batch,
        outcomes: Mapping[str, ItemOutcome],
        missing: Sequence[str],
    ) -> None:
        fetched_at = self._clock.utcnow()
        attempts = batch.attempts
        sent = attempts.sent
        name = key.name
        metrics = self._metrics
        # The answered lookups leave the batch all at once (not one list removal each);
        # the missed ones stay in it for what follows.
        missed: list[Lookup] = []
        lookups, batch.lookups = batch.lookups, missed
        # Ok answers are counted once for the batch, not with a call each.
        ok = 0
        try:
            for lookup in lookups:
                query = lookup.query
                outcome = outcomes.get(query.asin)
                if outcome is None:
                    missed.append(lookup)
                    continue
                status = outcome.status
                if status is Status.INVALID:
                    # Every id sent was validated first, so an item-level "invalid" in a 200
                    # (InvalidParameterValue) means no such item here (protocol.md 4).
                    status = Status.NOT_FOUND
                lookup.batch = None
                if lookup.finish(
                    ItemResult(
                        query.asin,
                        batch.marketplace,
                        status,
                        outcome.item,
                        outcome.summary,
                        outcome.error,
                        sent,
                        name,
                        fetched_at,
                        query,
                    )
                ):
                    if status is Status.OK:
                        ok += 1
                    else:
                        metrics.record_item(status)
        finally:
            metrics.record_ok(ok)
        if not missed:
            return
        if attempts.missing + 1 >= _MAX_MISSING:
            info = describe("MissingFromResponse")
            detail = ErrorDetail(
                info.code,
                f"Amazon's responses did not mention this ASIN {attempts.missing + 1} times",
                info.remedy,
            )
            for lookup in missed:
                self._resolve(
                    lookup, self._result(lookup, Status.NOT_FOUND, detail, attempts, key.name)
                )
            return
        # Re-ask each alone: a one-ASIN request isolates whatever made it drop out.
        self._split(batch, missed, missed_once=True)

    def _split(self, batch: Batch, lookups: Sequence[Lookup], *, missed_once: bool) -> None:
        """Re-queue each of ``lookups`` as a batch of its own, carrying the batch's history."""
        # A copy: ``lookups`` may be ``batch.lookups`` itself, which the loop shrinks (every
        # second lookup was skipped, left in a batch nothing held, its caller waiting forever).
        for lookup in list(lookups):
            if lookup in batch.lookups:
                batch.lookups.remove(lookup)
            attempts = batch.attempts.child(missed=missed_once)
            # Asked again after an answer that left it out: a retry, counted when it goes.
            attempts.retry_due = missed_once
            self._pool.submit(Batch.of([lookup], attempts=attempts), front=True)

    def _result(
        self,
        lookup: Lookup,
        status: Status,
        detail: ErrorDetail | None,
        attempts: Attempts,
        key: str | None,
    ) -> ItemResult:
        return ItemResult(
            lookup.asin,
            lookup.marketplace,
            status,
            None,
            None,
            detail,
            attempts.sent,
            key,
            self._clock.utcnow(),
            lookup.query,
        )

    def _resolve(self, lookup: Lookup, result: ItemResult) -> None:
        if lookup.finish(result):
            self._metrics.record_item(result.status)

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
            batch.fail(error)
            return
        detail = error if isinstance(error, ErrorDetail) else _detail(error)
        if batch.operation is not None:
            batch.fail(error if isinstance(error, BaseException) else BrokerError(detail.message))
            return
        for lookup in list(batch.lookups):
            self._resolve(lookup, self._result(lookup, status, detail, batch.attempts, key))

    def _on_api_error(
        self,
        key: KeyState,
        batch: Batch,
        request: HttpRequest,
        exc: ApiError,
        sent_at: float,
        *,
        transient: bool,
    ) -> None:
        """Route an API error: ``transient`` (:func:`_transient_api_error`, judged once by
        the caller) is retried, a credentials error judged, anything else taken out."""
        info = exc.info
        attempts = batch.attempts
        if transient:
            key.errors += 1
            self._transient(key, batch, exc, sent_at)
            return
        if isinstance(exc, AuthError) and info.retryable:
            key.on_credentials_refused(batch.marketplace)
            if attempts.auth_refused_at is None:
                attempts.auth_refused_at = sent_at
            # TokenExpired / InvalidToken / RequestExpired: new credentials, try again now.
            if attempts.auth_retries < _MAX_AUTH_RETRIES and key.authorizer.recover(exc, request):
                attempts.auth_retries += 1
                attempts.not_sent(self._clock.monotonic())
                attempts.retry_due = True  # sent again after a failure: a retry, counted
                logger.info("broker.credentials_refreshed", key=key.name, code=exc.code)
                self._pool.submit(batch, front=True)
                return
            verdict = key.judge_credentials(
                attempts.auth_refused_at,
                batch.marketplace,
                others_waiting=self._pool.has_work_for(batch.marketplace),
            )
            if verdict is CredentialsVerdict.ACCEPTED:
                # Other requests were accepted with credentials as fresh as the ones refused
                # here: the server's noise. Retried at once as a counted attempt (bounded by
                # max_attempts and max_age_s), and the key stays in rotation.
                logger.info("broker.auth_error_retried", key=key.name, code=exc.code)
                self._transient(key, batch, exc, sent_at)
                return
            if verdict is CredentialsVerdict.UNDECIDED:
                # Behind the work waiting, whose answers settle it: an acceptance, or enough
                # refusals in a row to take the key out.
                attempts.not_sent(self._clock.monotonic())
                logger.info("broker.auth_error_deferred", key=key.name, code=exc.code)
                self._pool.submit(batch)
                return
            # Fresh credentials were refused too: the catalogue's remedy ("the broker
            # fetches a new token") no longer applies, so say what does (B11). Accepted in
            # another marketplace, they are out of this one only.
            market = batch.marketplace
            if key.accepted_elsewhere(market):
                where, scope = (
                    f" for {market} (accepted in other marketplaces)",
                    Scope.KEY_MARKETPLACE,
                )
                remedy = (
                    f"credentials rejected for {market}: check that the key's credentials "
                    f"(a Creators credential's version names its region) and its partner tag "
                    f"cover {market}, in the config and Associates Central"
                )
            else:
                where, scope = "", Scope.KEY
                remedy = (
                    "credentials rejected: check the key's credential id and secret (and a "
                    "Creators credential's version; for a PA-API key, this machine's clock) "
                    "in the config and Associates Central"
                )
            self._pool.take_out(
                key,
                market,
                exc.code,
                f"credentials rejected{where}: {exc.code} again after {attempts.auth_retries} "
                f"fresh token(s) or signature(s): {exc.message}",
                remedy,
                scope=scope,
            )
            attempts.not_sent(self._clock.monotonic())
            self._pool.submit(batch, front=True)
            return
        offending = _offending_ids(exc)
        if offending and batch.operation is None:
            self._split_invalid(key, batch, exc, offending)
            return
        if info.scope is Scope.GLOBAL and batch.operation is not None:
            # protocol.md 4: a per-request bug (CannotParse, UnknownOperation, an incomplete
            # signature). A search's caller gets the error itself and the keys stay: one odd
            # answer to one call must not stop every later lookup. A GetItems batch still
            # stops the run (77, rows pending) rather than fail every row a request each.
            self._fail(batch, exc, key=key.name, status=Status.FAILED)
            return
        if info.scope in (Scope.KEY, Scope.KEY_MARKETPLACE, Scope.TOKEN_URL, Scope.GLOBAL):
            self._take_out(key, batch.marketplace, exc)
            attempts.not_sent(self._clock.monotonic())
            self._pool.submit(batch, front=True)
            return
        if info.scope is Scope.ASIN and batch.operation is None and len(batch.lookups) > 1:
            # An id-level error for the whole request that names no id: ask each alone.
            self._split(batch, list(batch.lookups), missed_once=False)
            return
        status = Status.INVALID if info.scope is Scope.ASIN else Status.FAILED
        # The exception itself, so an operation's caller gets the ApiError (code, status).
        self._fail(batch, exc, key=key.name, status=status)

    def _split_invalid(
        self, key: KeyState, batch: Batch, exc: ApiError, offending: Sequence[str]
    ) -> None:
        """PA-API failed the whole request for malformed ids: mark them, re-send the rest."""
        bad = set(offending)
        detail = _detail(exc)
        before = len(batch.lookups)
        for lookup in [lk for lk in batch.lookups if lk.asin in bad]:
            self._resolve(
                lookup, self._result(lookup, Status.INVALID, detail, batch.attempts, key.name)
            )
        if not batch.lookups:
            return
        if len(batch.lookups) == before:
            # Nothing matched what Amazon named: isolate each id instead of looping.
            self._split(batch, list(batch.lookups), missed_once=False)
            return
        self._pool.submit(batch, front=True)

    def _transient(self, key: KeyState, batch: Batch, exc: BaseException, sent_at: float) -> None:
        now = self._clock.monotonic()
        attempts = batch.attempts
        if key.failing_systemically and key.on_unreachable(exc, sent_at, failing=True):
            # The key's requests, across its batches, have failed so for the whole outage
            # budget: the API is down. The key goes out (exit 69) and this batch with the
            # rest stays unanswered. Until then the key only waits between attempts, which
            # still count: a request that fails whatever the API's state (a poison batch)
            # must fail in the end, not hold the key.
            self._end_outage(key, batch.marketplace, exc)
            self._pool.submit(batch, front=True)
            return
        # Kept without its traceback: its frames' locals (a response body, a request) would
        # stay alive for as long as the batch waits to be retried.
        attempts.last_error = exc.with_traceback(None)
        attempt = attempts.failures
        delay = self._policy.next_delay(attempt, exc)
        if delay is None or attempts.age(now) + delay > self._policy.max_age_s:
            # An operation's caller gets the exception itself; a lookup's row the last error
            # told as final (its catalogue remedy says the broker retries it by itself).
            final = exc if batch.operation is not None else _gave_up(exc, attempt)
            self._say_gave_up(key, batch, exc, attempt, now)
            self._fail(batch, final, key=key.name)
            return
        if not key.retry_budget.try_retry():
            # Retries are over 10 % of sends: slow down rather than storm (see retry.py on
            # why this waits instead of failing, and not a flat max_delay).
            delay = max(delay, self._policy.budget_delay(attempt))
        attempts.retry_due = True
        attempts.requeued(now + max(0.0, delay))
        logger.debug(
            "broker.retry_scheduled",
            key=key.name,
            batch_id=batch.batch_id,
            attempt=attempt,
            delay_s=round(delay, 3),
            error=type(exc).__name__,
        )
        if delay <= 0:
            self._pool.submit(batch, front=True)
        else:
            self._spawn(self._submit_later(batch, delay))

    def _say_gave_up(
        self, key: KeyState, batch: Batch, exc: BaseException, attempts: int, now: float
    ) -> None:
        """Warn that a batch failed for good after its retries: at most once a minute per key
        and error code (the rest at debug), so a run whose every request fails (a 500 each
        time, a broken proxy) says why while it runs, not only in its rows at the end."""
        code = _detail(exc).code
        say = self._say("broker.batch_failed", key.name, code, now)
        if say is None:
            return
        say(
            "broker.batch_failed",
            key=key.name,
            batch_id=batch.batch_id,
            lookups=len(batch.lookups),
            code=code,
            error=scrub(str(exc)),
            attempts=attempts,
            note=_SAID_ONCE,
        )

    def _say(
        self, event: str, key: str, code: str, now: float | None = None
    ) -> Callable[..., Any] | None:
        """How to log ``event`` of ``key`` with ``code`` now: at warning level at most once
        a minute per event, key and code, at debug in between (None while debug is off), so
        a fault on a share of the answers (an HTML 503, a bad shape) tells while it lasts
        without a line per answer (thousands a day)."""
        if now is None:
            now = self._clock.monotonic()
        told = self._told_at.get((event, key, code))
        say: Callable[..., Any]
        if told is None or now - told >= _SAY_EVERY_S:
            self._told_at[(event, key, code)] = now
            say = logger.warning
        elif _LOG.isEnabledFor(logging.DEBUG):
            say = logger.debug
        else:
            return None
        return say

    async def _submit_later(self, batch: Batch, delay_s: float) -> None:
        # Nothing is on the wire while the batch waits: callers winding down let go of it
        # now (their streams end), not when the delay is over; one that all of them left
        # is not sent again.
        batch.place = BatchPlace.WAITING
        batch.on_empty = None
        batch.release_leaving()
        await self._clock.sleep(delay_s)
        if batch.live():
            self._pool.submit(batch, front=True)

    def _take_out(self, key: KeyState, marketplace: str, exc: ApiError) -> None:
        """Take the key (or key+marketplace) out of rotation; fail work no key can serve.

        A key's credentials refused in a marketplace outside its Creators credential
        version's region, or refused here and accepted in another marketplace (a PA-API
        signature of a region Amazon scopes otherwise, a store the account does not cover),
        leave this marketplace only: the secret is right, and one store's rows must not
        stop the others'.
        """
        info = exc.info
        scope, message, remedy = info.scope, exc.message, info.remedy
        if scope is Scope.KEY and isinstance(exc, AuthError):
            region = key.region_left_out(marketplace)
            if region is not None:
                # Known without waiting for another marketplace's answer: whichever came
                # first decided whether the key left every marketplace or this one.
                scope = Scope.KEY_MARKETPLACE
                message = (
                    f"refused for {marketplace}, outside the {region} region of credential "
                    f"version {key.config.version}: {exc.message}"
                )
                remedy = (
                    f"Give {marketplace} a key of a credential version of its own region "
                    "(Associates Central of that region); this key stays in its region's "
                    "marketplaces."
                )
            elif key.accepted_elsewhere(marketplace):
                scope = Scope.KEY_MARKETPLACE
                message = (
                    f"refused for {marketplace} (accepted in other marketplaces): {exc.message}"
                )
                remedy = (
                    f"The key works in other marketplaces, so this may be {marketplace}'s "
                    f"alone: check that it covers {marketplace} (for a PA-API key, that "
                    "store's host and SigV4 region; for a Creators credential, its version's "
                    f"region) and its partner tag there. Otherwise: {info.remedy}"
                )
        self._pool.take_out(key, marketplace, exc.code, message, remedy, scope=scope)

    def _refused_by_network(self, key: KeyState, batch: Batch, exc: NetworkRefused) -> None:
        """The way to the endpoint refused the request (an untrusted certificate, a proxy
        saying no): every key is out at once, as no wait mends it; the batch goes back, so
        its rows stay pending (a run's end) or its callers hear NoUsableKeyError."""
        info = describe(exc.code)
        self._pool.take_out(
            key, batch.marketplace, exc.code, str(exc), info.remedy, scope=info.scope
        )
        self._pool.submit(batch, front=True)

    def _end_outage(
        self, key: KeyState, marketplace: str, exc: BaseException, *, token_endpoint: bool = False
    ) -> None:
        """The key found no endpoint for its whole outage budget: take it out (B15).

        ``token_endpoint``: the last error was the token endpoint's (said in the message,
        as the API endpoint may never have been asked).
        """
        last = "the token endpoint's last error" if token_endpoint else "last error"
        self._pool.take_out(
            key,
            marketplace,
            OUTAGE_CODE,
            f"no usable answer from the API or its token endpoint for {_seconds(key.outage_s)} s "
            f"({last}: {exc})",
            "check the network, DNS, proxy or firewall, and api.endpoint (api.token_endpoint "
            "when the last error is the token endpoint's; a 5xx or a reset each time: the "
            "API itself is down, wait for it; a 429 each time: it throttles the key, wait for "
            "it), then run again (a library "
            f"broker kept open tries again for a call made {OUTAGE_RETRY_S:g} s or more "
            "later); unfinished rows stay pending; retry.outage_budget_s sets how long a "
            "run waits",
            scope=Scope.KEY,
        )


def _seconds(seconds: float) -> str:
    """A wait as told in a message: tenths under ten seconds (a budget of 0.4 s read "0 s")."""
    return f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"


def _without_credentials(error: ApiError, request: HttpRequest) -> ApiError:
    """``error`` with the credentials ``request`` carried masked in its message, its code
    and its request id.

    Amazon's answers hold none, but a gateway in between may echo the bearer token or the
    SigV4 signature it refused, bare, in any of them; they go into output rows, the ledger
    and the log.
    """
    message = _masked(error.message, request)
    code = _masked(error.code, request)
    rid = None if error.request_id is None else _masked(error.request_id, request)
    if (message, code, rid) == (error.message, error.code, error.request_id):
        return error
    # A copy with every attribute its class keeps (a PA-API InvalidItemIdsError's ids too),
    # made without calling __init__, whose signature differs from class to class.
    shown = type(error).__new__(type(error))
    shown.__dict__.update(error.__dict__)
    shown.message, shown.code, shown.request_id = message, code, rid
    shown.args = (shown.described(),)
    return shown


def _masked(text: str, request: HttpRequest) -> str:
    """``text`` from an answer, with any credential (a proxy's URL password) and what
    ``request`` carried (its bearer token or SigV4 signature) masked."""
    text = scrub(text)
    for secret in _credentials_of(request.headers.get("Authorization", "")):
        if len(secret) >= 8 and secret in text:
            text = text.replace(secret, "***")
    return text


def _credentials_of(header: str) -> list[str]:
    """The secret parts of an Authorization header: a bearer token (Creators), the
    signature of a SigV4 one (PA-API: its credential id names the key and is no secret)."""
    token = bearer_token(header)
    if token is not None:
        # A 2.x key's header goes on: "Bearer <t>, Version 2.1"; the token is <t> alone.
        return [token]
    _, found, signature = header.rpartition("Signature=")
    return [signature.split(",", 1)[0].strip()] if found else []


#: How often a warning that repeats per request (a batch that failed after its retries, a
#: bad or odd answer) is logged at warning level, per key and error code (seconds).
_SAY_EVERY_S: Final = 60.0
_SAID_ONCE: Final = f"more like it are logged at debug level for {_SAY_EVERY_S:g} s"


def _transient_api_error(error: ApiError) -> bool:
    """True for an API error worth retrying as is: a 5xx, or a request-level error the
    catalogue calls retryable (credentials aside, which have their own path)."""
    info = error.info
    return isinstance(error, ServerError) or (
        info.retryable and info.scope is Scope.REQUEST and not isinstance(error, AuthError)
    )


def _gave_up(error: BaseException, failures: int) -> ErrorDetail:
    """The final error of a lookup whose retries ran out: the last error's code and message,
    with the remedy of ``AttemptsExhausted`` (what to do now, not "retried by itself")."""
    last = _detail(error)
    return ErrorDetail(
        last.code,
        # Failed attempts: the row's ``attempts`` also counts the 429s, which never fail it.
        f"{last.message} (gave up after {failures} failed attempts)",
        describe("AttemptsExhausted").remedy,
    )


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


def _request_id(response: RawResponse | None, request: HttpRequest) -> str | None:
    """Amazon's id of one answer (``x-amzn-RequestId``), to quote in logs instead of its
    body; masked, as a gateway may echo the request's credentials in it."""
    rid = None if response is None else request_id(response.headers)
    return None if rid is None else _masked(rid, request)


def _offending_ids(exc: ApiError) -> tuple[str, ...]:
    ids = getattr(exc, "invalid_ids", ())
    return tuple(ids) if isinstance(ids, tuple | list) else ()
