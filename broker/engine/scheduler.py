"""The key pool: which key sends next, which keys can serve a marketplace, taking keys out.

Each key has one dispatch loop. It holds an in-flight slot, waits until there is work the
key can serve, *then* waits for the key to be ready (its pacer slot, a Retry-After or
outage pause, its circuit, its daily budget) and takes the oldest batch at that moment.
Waiting for work before readiness means a pause that began while the key was idle is
honoured by its next send (N7), and whichever key is ready first takes the batch.

When the last key for a marketplace leaves rotation, every batch of that marketplace still
lingering in the batcher or waiting in the queue fails with :class:`NoUsableKeyError`, and
so does every later lookup for it (N5): nothing waits for a key that will never come. A key
an outage took out is the exception: a lookup made ``OUTAGE_RETRY_S`` later brings it back
for one attempt (the network or the API may be back by then; a rejected key stays out),
whether or not other keys served its marketplaces meanwhile.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine, Sequence, Set
from typing import TYPE_CHECKING, Any

import structlog

from broker.clock import Clock, LoopClock
from broker.engine.keys import OUTAGE_RETRY_S, STATE_OUTAGE_CODE
from broker.errors import KeyUnusableError, NoUsableKeyError, Scope, StateUnavailableError
from broker.logs import get_logger

if TYPE_CHECKING:
    from broker.engine.batcher import Batch, Batcher, WorkQueue
    from broker.engine.keys import KeyState

__all__ = ["KeyPool", "SendFn"]

logger = get_logger("broker")

#: One attempt of a batch on a key: (key, batch, sent_at, demand_limited).
SendFn = Callable[["KeyState", "Batch", float, bool], Coroutine[Any, Any, None]]


class KeyPool:
    """Every key of one broker, the marketplaces they serve, and their dispatch loops."""

    def __init__(
        self,
        keys: Sequence[KeyState],
        work: WorkQueue,
        batcher: Batcher,
        *,
        config_source: str,
        default_marketplace: str = "",
        marketplace_hint: str = "",
        clock: Clock | None = None,
    ) -> None:
        self._keys = tuple(keys)
        self._config_source = config_source
        self._default_marketplace = default_marketplace
        self._marketplace_hint = marketplace_hint
        self._work = work
        self._batcher = batcher
        #: marketplaces no key can serve any more, with the failures that caused it
        self._dead: dict[str, NoUsableKeyError] = {}
        #: marketplaces some key has a partner tag for (the config: it never changes)
        self._configured = frozenset(m for key in self._keys for m in key.tagged_marketplaces)
        #: marketplaces some key served at the last check; cleared when a key leaves
        self._serving: set[str] = set()
        #: keys an outage took out, to bring back a while later whether or not another key
        #: serves their marketplaces meanwhile (empty almost always), and when the first of
        #: them is due (the pool's clock)
        self._outage_out: list[KeyState] = []
        self._revive_due = math.inf
        #: marketplaces some key served at the last check while ``_outage_out`` holds keys
        #: (``_serving``, the intake's fast path, stays empty then: each lookup comes here
        #: to look whether a revival is due, and finds its marketplace here)
        self._servable: set[str] = set()
        self._monotonic = (clock or LoopClock()).monotonic

    @property
    def keys(self) -> tuple[KeyState, ...]:
        """The keys, in config order."""
        return self._keys

    # -- coverage -------------------------------------------------------------------------

    @property
    def configured_marketplaces(self) -> frozenset[str]:
        """The marketplaces some key has a partner tag for (fixed by the config)."""
        return self._configured

    @property
    def serving_marketplaces(self) -> Set[str]:
        """The marketplaces some key served at the last :meth:`check_servable`: the set
        itself, emptied in place (never replaced) when a key leaves rotation, so a holder
        may test it before calling :meth:`check_servable` for the full check."""
        return self._serving

    def configured(self, marketplace: str) -> bool:
        """True if some key is configured for ``marketplace`` (has a partner tag there)."""
        return marketplace in self._configured

    def check_servable(self, marketplace: str, *, revive: bool = True) -> None:
        """Raise :class:`NoUsableKeyError` when no key can serve ``marketplace`` now.

        ``revive``: bring back keys an outage took out long enough ago. A batch sent back
        to the queue of a marketplace no key serves any more brings none back: keys taken
        out 30 s apart revived each other at each take-out, every revived key spent its
        probe on the hang that took it out, and a call went on for hours. While another key
        serves, it does (a long call gets the key back once its endpoint answers again).
        """
        if self._outage_out:
            if revive and self._monotonic() >= self._revive_due:
                self._revive_outage_out()
            elif marketplace in self._servable:
                return
        if marketplace in self._serving:
            return
        dead = self._dead.get(marketplace)
        if dead is not None:
            # (A key of it an outage took out, and now due, came back above, and took the
            # marketplace out of _dead.) A fresh instance per raise: re-raising one stored
            # exception grows its traceback.
            raise NoUsableKeyError(dead.marketplace, dead.failures)
        if not any(key.serves(marketplace) for key in self._keys):
            raise self._no_key_error(marketplace)
        if self._outage_out:
            # Not the intake's fast path, which skips this check: while a key out for an
            # outage waits to be brought back, each lookup looks whether its time has come.
            self._servable.add(marketplace)
        else:
            self._serving.add(marketplace)

    def _revive_outage_out(self) -> None:
        """Bring back the keys an outage took out a while ago (see :meth:`KeyState.revive`),
        whatever serves their marketplaces now: one taken out while another key served on
        (its own token endpoint down, or the endpoint back before the other's budget ran
        out) stayed out for the broker's life. Every key an outage takes out is in
        ``_outage_out`` (:meth:`take_out` puts it there), so this is the one way back."""
        revived = [key for key in self._outage_out if key.revive()]
        self._outage_out = [key for key in self._outage_out if key.out_by_outage]
        self._revive_due = min((key.revive_due for key in self._outage_out), default=math.inf)
        self._servable.clear()
        if revived:
            for market in list(self._dead):
                if any(key.serves(market) for key in revived):
                    del self._dead[market]
            self._work.wake()

    def _no_key_error(self, marketplace: str) -> NoUsableKeyError:
        # The keys tagged for it only: a key with no tag there could never have served it,
        # and its failure (a wrong secret) would send the user to mend what does not help.
        failures = [
            failure
            for key in self._keys
            if key.has_tag(marketplace) and (failure := key.failure_for(marketplace)) is not None
        ]
        if not failures and not self.configured(marketplace):
            failures = [
                KeyUnusableError(
                    key.name,
                    "NoKeyForMarketplace",
                    f"key has no partner tag for {marketplace}",
                    self.no_tag_remedy(marketplace),
                )
                for key in self._keys
            ]
        return NoUsableKeyError(marketplace, failures)

    def no_tag_remedy(self, marketplace: str) -> str:
        """What to do when no key has a partner tag for ``marketplace``, said where the
        config came from: its file, or code (``config_from_dict``: ``source`` ``<dict>``);
        for the default marketplace, making a tagged store the default is named too."""
        hint = self._marketplace_hint if marketplace == self._default_marketplace else ""
        if self._config_source.startswith("<"):
            return (
                "add the tracking id to a key of the config given in code: "
                f'"partner_tags": {{"{marketplace}": "your-tracking-id"}} beside the existing tags'
                + hint
            )
        return (
            f"add the tracking id to a key in {self._config_source}: under [[keys]], "
            f'partner_tags = {{ "{marketplace}" = "your-tracking-id" }} (beside the existing tags)'
            + hint
        )

    # -- work -----------------------------------------------------------------------------

    def submit(self, batch: Batch, *, front: bool = False, ahead: bool = False) -> None:
        """Queue a batch for any key, or fail it if no key can serve its marketplace.

        ``front``: a retry, ahead of everything; ``ahead``: a caller's new operation (a
        search), ahead of the GetItems batches (:meth:`WorkQueue.put_ahead`); else behind all.
        """
        if not batch.live():
            return
        try:
            self.check_servable(batch.marketplace, revive=batch.marketplace not in self._dead)
        except NoUsableKeyError as exc:
            batch.fail(exc)
            return
        if front:
            self._work.put_front(batch)
        elif ahead:
            self._work.put_ahead(batch)
        else:
            self._work.put(batch)

    def has_work_for(self, marketplace: str) -> bool:
        """True if a batch for ``marketplace`` waits for a key."""
        return self._work.has_work_for((marketplace,))

    def take_out(
        self,
        key: KeyState,
        marketplace: str | None,
        code: str,
        message: str,
        remedy: str,
        *,
        scope: Scope,
    ) -> None:
        """Take ``key`` (or the key in ``marketplace``) out of rotation; with a global
        ``scope`` (the client or the endpoint is wrong, not the key), every key at once:
        each other key would only spend a request to be refused the same way. With a
        token-URL scope (no token endpoint answers at ``key``'s), every key that asks that
        URL: a key of another credential family asks another (2.x Cognito, 3.x Login with
        Amazon) and goes on. ``marketplace`` is the one whose request failed; None when no
        request was made.

        Work for a marketplace no key can serve any more fails at once, whether it waits
        in the queue or still lingers in the batcher.
        """
        scope_marketplace = marketplace if scope is Scope.KEY_MARKETPLACE else None
        self._serving.clear()
        self._servable.clear()
        condemned = self._condemned(key, scope)
        affected = set() if marketplace is None else {marketplace}
        for each in condemned:
            if each.disable(code, message, remedy, marketplace=scope_marketplace):
                if each.out_by_outage and each not in self._outage_out:
                    self._outage_out.append(each)
                    self._revive_due = min(self._revive_due, each.revive_due)
                logger.error(
                    "broker.key_disabled",
                    key=each.name,
                    code=code,
                    message=message,
                    remedy=remedy,
                    marketplace=scope_marketplace,
                )
            if scope_marketplace is None:
                affected.update(each.tagged_marketplaces)
        for market in affected:
            if market in self._dead or any(k.serves(market) for k in self._keys):
                continue
            self._dead[market] = self._no_key_error(market)
            for batch in self._work.drain(market) + self._batcher.drain(market):
                batch.fail(NoUsableKeyError(market, self._dead[market].failures))
        self._work.wake()

    def _condemned(self, key: KeyState, scope: Scope) -> list[KeyState]:
        """The keys an error of ``scope`` that ``key`` met takes out of rotation."""
        if scope is Scope.GLOBAL:
            return list(self._keys)
        url = key.authorizer.token_url
        if scope is Scope.TOKEN_URL and url is not None:
            return [each for each in self._keys if each.authorizer.token_url == url]
        return [key]

    # -- dispatch -------------------------------------------------------------------------

    async def dispatch(
        self, key: KeyState, send: SendFn, spawn: Callable[[Coroutine[Any, Any, None]], object]
    ) -> None:
        """One key's loop: a slot, work it can serve, readiness, then the oldest such batch."""
        work = self._work
        while True:
            await key.acquire_slot()
            try:
                batch, sent_at = await self._next(key)
                demand_limited = work.has_work_for(key.active_marketplaces())
            except BaseException:
                key.release_slot()
                raise
            spawn(self._send(key, batch, sent_at, demand_limited, send))

    async def _next(self, key: KeyState) -> tuple[Batch, float]:
        """Wait until ``key`` may send and has work; book the send and return the batch."""
        work = self._work
        while True:
            await work.wait_for(key.active_marketplaces)
            try:
                await key.wait_ready()
            except StateUnavailableError as exc:
                key.abandon_probe()
                self._lose_state(key, exc)
                continue
            if key.authorizer.due():
                # The token is fetched before the slot is booked: fetched after, it would
                # delay this send and bring it closer to the next than the key's interval
                # (a strict server's 429, at the start and after every refresh). Time
                # passed, so work and readiness are looked at again. A failed fetch is not
                # due again for a few seconds: the send raises it and is backed off there,
                # and nothing loops here. A probe slot wait_ready claimed goes back first.
                key.abandon_probe()
                await key.authorizer.prepare()
                continue
            # Nothing awaited since wait_ready returned: the key is ready at this instant.
            batch = work.take(key.active_marketplaces())
            if batch is None:
                # Another key took the work first; a probe slot claimed for it is handed back.
                key.abandon_probe()
                continue
            try:
                sent_at = await key.try_send(batch.booked)
            except StateUnavailableError as exc:
                # Never sent: back to the queue, where it fails if no key is left for it.
                key.abandon_probe()
                self._lose_state(key, exc)
                self.submit(batch, front=True)
                continue
            if sent_at is None:
                # The daily budget is spent: the key waits for its window to reset.
                key.abandon_probe()
                self.submit(batch, front=True)
                continue
            return batch, sent_at

    def _lose_state(self, key: KeyState, exc: StateUnavailableError) -> None:
        """The key's shared state stayed out of reach for its outage budget: take the key
        out, as an endpoint's outage does, rather than end the engine (a library broker
        stayed dead after Redis came back, every later call raising the old error). Its
        callers get ``NoUsableKeyError`` naming the store; a call 30 s or more later asks
        the store again (:meth:`KeyState.revive`)."""
        self.take_out(
            key,
            None,
            STATE_OUTAGE_CODE,
            str(exc),
            f"check the key-state store [state] names (Redis up and reachable, the SQLite "
            f"file's disk), then try again (a library broker kept open asks it again for a "
            f"call made {OUTAGE_RETRY_S:g} s or more later); retry.outage_budget_s sets how "
            "long a call waits for it",
            scope=Scope.KEY,
        )

    @staticmethod
    async def _send(
        key: KeyState, batch: Batch, sent_at: float, demand_limited: bool, send: SendFn
    ) -> None:
        try:
            # Each send is a task of its own, with its own copy of the context: the
            # binding ends with the task, so nothing needs resetting.
            structlog.contextvars.bind_contextvars(key=key.name, batch_id=batch.batch_id)
            await send(key, batch, sent_at, demand_limited)
        finally:
            key.release_slot(sent=True)
