"""Endpoint health: the state machine, and the decider that keeps the picker in step.

Sync and free of I/O: ``health.py`` (active checks) and ``proxy.py`` (call
outcomes) report what they saw, and ``ClusterHealth`` decides. Every change
of an endpoint's rotation reaches the kernel through ``Balancer.set_eligible``
(and, for slow start, ``Balancer.set_share``), so the hot path never checks
health. Timers (ejection ends, slow-start steps) go through an injected
``call_later``, so unit tests drive them with ``lbgw.testing.ManualClock``.

States and what moves them (``TRANSITIONS`` is the whole table; a pair
that is not in it raises ``IllegalTransitionError``)::

    UNKNOWN      start-up, before the first check result      in rotation
    SERVING      the active check passes (or checks are off)  in rotation
    NOT_SERVING  the active check fails, or says NOT_SERVING  out
    EJECTED      N consecutive failed calls (outlier ejection) out, until a
                 passed check or the ejection time ends
    DRAINING     the gateway is shutting down: no new calls   out, final

Thresholds: ``unhealthy_threshold`` failed checks take a SERVING endpoint
out, ``healthy_threshold`` passed checks bring a NOT_SERVING one back; an
explicit ``NOT_SERVING`` answer takes it out at once, a ``Watch`` stream's
``SERVING`` (sent once, on the change) brings it back at once, and the first
result after start-up decides at once (Envoy does the same for new hosts).

Passive ejection follows Envoy's outlier detection: ``consecutive_failures``
calls in a row ending with one of ``failure_codes`` eject the endpoint for
``base_ejection_time`` x its ejection count, at most ``max_ejection_time``.
An endpoint that stayed in for ``max_ejection_time`` since its last ejection
starts counting again from one. At most ``max_ejection_percent`` of the
cluster is ejected at once, but always at least one endpoint may be (as in
Envoy, where 0% also ejects one); never the last endpoint in rotation,
which would leave the cluster serving nobody (Envoy's default 50% panic
threshold covers that case there; lbgw's panic threshold is off by default).

Slow start is Envoy's: an endpoint that comes back into rotation (from
NOT_SERVING or EJECTED) gets ``weight x max(min_weight_percent/100,
(t / window) ** (1 / aggression))``, stepped 10 times per window.

The panic threshold is Envoy's too, and off by default: while fewer than
``panic_threshold`` percent of the endpoints are healthy, the cluster routes
to all endpoints but the draining ones.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

import grpc

from lbgw.config import ClusterConfig
from lbgw.decision import Decision
from lbgw.exceptions import IllegalTransitionError
from lbgw.logs import fields

if TYPE_CHECKING:
    from lbgw.backends import Backend
    from lbgw.balancer import Balancer

__all__ = [
    "ELIGIBLE",
    "TRANSITIONS",
    "ClusterHealth",
    "Endpoint",
    "Event",
    "Leaving",
    "State",
    "transition",
]

log = logging.getLogger("lbgw.endpoints")

_DEADLINE_EXCEEDED: Final = grpc.StatusCode.DEADLINE_EXCEEDED


class State(enum.Enum):
    UNKNOWN = "unknown"
    SERVING = "serving"
    NOT_SERVING = "not_serving"
    EJECTED = "ejected"
    DRAINING = "draining"


class Event(enum.Enum):
    HEALTHY = "healthy"  # the active check passed its threshold (or checking is off)
    UNHEALTHY = "unhealthy"  # the active check failed its threshold, or said NOT_SERVING
    EJECT = "eject"  # consecutive failed calls reached the outlier threshold
    EJECTION_ENDED = "ejection_ended"  # the ejection time is over
    DRAIN = "drain"  # the gateway is shutting down


S, E = State, Event
#: Every legal (state, event) pair and the state it leads to.
TRANSITIONS: Final[dict[tuple[State, Event], State]] = {
    (S.UNKNOWN, E.HEALTHY): S.SERVING,
    (S.UNKNOWN, E.UNHEALTHY): S.NOT_SERVING,
    (S.UNKNOWN, E.EJECT): S.EJECTED,
    (S.UNKNOWN, E.DRAIN): S.DRAINING,
    (S.SERVING, E.HEALTHY): S.SERVING,
    (S.SERVING, E.UNHEALTHY): S.NOT_SERVING,
    (S.SERVING, E.EJECT): S.EJECTED,
    (S.SERVING, E.DRAIN): S.DRAINING,
    (S.NOT_SERVING, E.HEALTHY): S.SERVING,
    (S.NOT_SERVING, E.UNHEALTHY): S.NOT_SERVING,
    (S.NOT_SERVING, E.DRAIN): S.DRAINING,
    (S.EJECTED, E.HEALTHY): S.SERVING,  # a passed check ends an ejection early
    (S.EJECTED, E.UNHEALTHY): S.NOT_SERVING,
    (S.EJECTED, E.EJECTION_ENDED): S.SERVING,
    (S.EJECTED, E.DRAIN): S.DRAINING,
    (S.DRAINING, E.DRAIN): S.DRAINING,
}
del S, E

#: The states whose endpoints take new calls.
ELIGIBLE: Final = frozenset({State.UNKNOWN, State.SERVING})


def transition(state: State, event: Event) -> State:
    """The state that ``event`` leads to from ``state``; raises if there is none."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise IllegalTransitionError(state, event) from None


class Timer(Protocol):
    def cancel(self) -> Any: ...


#: ``call_later(delay_s, callback)``, as ``asyncio.AbstractEventLoop.call_later``.
CallLater = Callable[[float, Callable[[], None]], Timer]


class Endpoint:
    """One endpoint of a cluster: the one object that every part of lbgw keeps for it.

    It holds what the endpoint is (``address``, ``weight``), what lbgw has for
    it (``backend``, its channel; ``calls``, the raw-bytes multicallables per
    method; ``token``, its sticky-session metadata entry), its health (the
    state and the counters ``ClusterHealth`` keeps) and where the kernels have
    it: ``index``, set by ``Balancer.rebuild``, or -1 once it has left the
    cluster (``Cluster.update``) while its last calls end. Nothing outside
    the kernels lines endpoints up by index: a call keeps the object.
    """

    __slots__ = (
        "address",
        "backend",
        "busy_ns",
        "calls",
        "codes",
        "decision",
        "drained",
        "ejected_at",
        "ejections",
        "ejections_total",
        "failed_checks",
        "failures",
        "index",
        "last_check",
        "leaving",
        "passed_checks",
        "ramp_from",
        "reason",
        "refusal_logged",
        "reinstated_at",
        "share",
        "state",
        "timer",
        "token",
        "weight",
    )

    def __init__(self, address: str, weight: int = 1, backend: Backend | None = None) -> None:
        self.address = address
        self.weight = weight
        self.backend = backend
        self.index = -1
        #: The multicallables that forward a method on ``backend``, by kind and method
        #: (``proxy._call_key``), made on first use.
        self.calls: dict[str, Any] = {}
        #: The ``Decision`` of an unexplained pick of this endpoint, made once per
        #: layout (``Balancer.rebuild`` gives it the strategy).
        self.decision = Decision(self, "")
        self.token: tuple[str, str] | None = None  # the sticky token's metadata entry
        self.share = 1.0  # slow start: the share of ``weight`` in force
        self.state = State.UNKNOWN
        self.passed_checks = 0
        self.failed_checks = 0
        self.failures = 0  # consecutive failed calls (passive ejection), touched per call
        self.ejections = 0  # the multiplier of the ejection time
        self.ejected_at = -math.inf
        self.reinstated_at = -math.inf
        self.ramp_from: float | None = None  # slow start: when it came back
        self.refusal_logged = False  # "ejection refused" said since it last succeeded
        self.timer: Timer | None = None  # the end of its ejection
        #: Once removed from its cluster: its calls still in flight, and the
        #: callback that runs when the last one ends (``Cluster.update``).
        self.leaving: Leaving | None = None
        #: Out of rotation by hand (the admin port's drain), whatever its health says.
        self.drained = False
        #: Attempts on this endpoint by status code, counted by the proxy when metrics are on.
        self.codes: dict[grpc.StatusCode, int] = {}
        self.busy_ns = 0  # the time its attempts took, added up (with metrics on)
        self.reason = "starting"  # why it is in its state: the last transition's reason
        self.ejections_total = 0  # passive ejections since it joined
        #: The last active check: (loop time, "passed" or "failed", reason); None before one.
        self.last_check: tuple[float, str, str] | None = None

    def __repr__(self) -> str:
        where = f"#{self.index}" if self.index >= 0 else "removed"
        return f"<Endpoint {self.address} w={self.weight} {self.state.value} {where}>"


class Leaving:
    """A removed endpoint's calls still in flight, and what to do when none is left."""

    __slots__ = ("active", "on_idle")

    def __init__(self, active: int, on_idle: Callable[[], None]) -> None:
        self.active = active
        self.on_idle = on_idle

    def done(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.on_idle()


class ClusterHealth:
    """The health of one cluster's endpoints, applied to its balancer.

    It reads the endpoints from the balancer (``balancer.endpoints``), so an
    endpoint set that changes (``Cluster.update``) needs only ``leave`` for
    the endpoints that go and ``rebuilt`` once the balancer has the new set.
    """

    def __init__(
        self,
        config: ClusterConfig,
        balancer: Balancer,
        *,
        clock: Callable[[], float],
        call_later: CallLater,
    ) -> None:
        self.name = config.name
        self.balancer = balancer
        self._check = config.health_check
        self._outlier = config.outlier_detection
        self._slow = config.slow_start
        self._panic_threshold = config.panic_threshold
        self._clock = clock
        self._call_later = call_later
        self._failure_codes = frozenset(self._outlier.failure_codes)
        self._ramp_timer: Timer | None = None
        self._listeners: list[Callable[[ClusterHealth], None]] = []
        self.panic = False
        self.serving = True  # whether any endpoint is in rotation
        self._draining = False
        #: Active check results since start, "passed" and "failed" (the admin port's metrics).
        self.checks = {"passed": 0, "failed": 0}
        self.ejections = 0  # passive ejections since start

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for e in self.endpoints:
            counts[e.state.value] = counts.get(e.state.value, 0) + 1
        states = ", ".join(f"{n} {s}" for s, n in counts.items())
        return f"<ClusterHealth {self.name} [{states}]{' PANIC' if self.panic else ''}>"

    # -- what others read --------------------------------------------------

    @property
    def endpoints(self) -> Sequence[Endpoint]:
        """The cluster's endpoints, in the balancer's order."""
        return self.balancer.endpoints

    def states(self) -> list[State]:
        return [e.state for e in self.endpoints]

    def on_change(self, listener: Callable[[ClusterHealth], None]) -> None:
        """Call ``listener(self)`` after every change of rotation."""
        self._listeners.append(listener)

    # -- active checks -----------------------------------------------------

    def check_passed(
        self, e: Endpoint, reason: str = "check passed", *, explicit: bool = False
    ) -> None:
        """A passed check; ``explicit`` when a ``Watch`` stream said SERVING.

        A ``Watch`` sends a status only when it changes, so there is no run
        of passes to count: its SERVING brings the endpoint back at once.
        """
        e.failed_checks = 0
        e.passed_checks += 1
        self.checks["passed"] += 1
        e.last_check = (self._clock(), "passed", reason)
        if e.state is State.DRAINING:
            return
        if (
            explicit
            or e.state in (State.UNKNOWN, State.EJECTED)
            or (e.state is State.NOT_SERVING and e.passed_checks >= self._check.healthy_threshold)
        ):
            self._apply(e, Event.HEALTHY, reason)

    def check_failed(self, e: Endpoint, reason: str, *, explicit: bool = False) -> None:
        """A failed check; ``explicit`` when the endpoint itself said it is not serving."""
        e.passed_checks = 0
        e.failed_checks += 1
        self.checks["failed"] += 1
        e.last_check = (self._clock(), "failed", reason)
        if e.state in (State.DRAINING, State.NOT_SERVING):
            return
        if (
            explicit
            or e.state is State.UNKNOWN
            or e.failed_checks >= self._check.unhealthy_threshold
        ):
            self._apply(e, Event.UNHEALTHY, reason)

    def healthy_without_checks(self, endpoints: Sequence[Endpoint] | None = None) -> None:
        """Health checking is off: every endpoint (or each of ``endpoints``) is SERVING."""
        for e in self.endpoints if endpoints is None else endpoints:
            if e.state is State.UNKNOWN:
                self._apply(e, Event.HEALTHY, "health checking is off")

    # -- passive ejection (on the request path: keep it cheap) --------------

    def succeeded(self, e: Endpoint) -> None:
        """A call on ``e`` ended without a failure code."""
        if e.failures:
            e.failures = 0
            e.refusal_logged = False

    def failed(self, e: Endpoint, code: grpc.StatusCode, *, answered: bool = True) -> None:
        """A call on ``e`` ended with ``code``; consecutive failures eject it.

        ``answered``: the endpoint sent response headers. ``DEADLINE_EXCEEDED``
        from one that sent none is a failure too, whatever ``failure_codes``
        says: the endpoint said nothing at all, as a frozen one does (Envoy's
        ``consecutive_gateway_failure`` counts such timeouts the same way).
        """
        if code not in self._failure_codes and (answered or code is not _DEADLINE_EXCEEDED):
            self.succeeded(e)
            return
        e.failures += 1
        limit = self._outlier.consecutive_failures
        if limit and e.failures >= limit:
            self._eject(e, f"{limit} consecutive {code.name}")
            if e.state is State.EJECTED:
                e.failures = 0  # else the streak goes on, and is said once

    def _eject(self, e: Endpoint, reason: str) -> None:
        if e.state not in ELIGIBLE:
            return  # already out (calls that started before it left are still ending)
        endpoints = self.endpoints
        ejected = sum(x.state is State.EJECTED for x in endpoints)
        cap = max(1, math.floor(len(endpoints) * self._outlier.max_ejection_percent / 100))
        others = sum(x.state in ELIGIBLE for x in endpoints if x is not e)
        if ejected >= cap or not others:
            # Refused: over the cap, or it is the last endpoint in rotation, and an
            # empty cluster serves nobody. Said once per endpoint until it recovers.
            if not e.refusal_logged:
                e.refusal_logged = True
                log.warning(
                    "ejection refused",
                    extra=fields(
                        cluster=self.name,
                        endpoint=e.address,
                        reason=reason,
                        why="the last endpoint in rotation" if not others else "the cap",
                        ejected=ejected,
                        max_ejection_percent=self._outlier.max_ejection_percent,
                    ),
                )
            return
        now = self._clock()
        if now - e.reinstated_at >= self._outlier.max_ejection_time:
            e.ejections = 0  # it stayed in long enough: start again from one
        e.ejections += 1
        e.ejections_total += 1
        self.ejections += 1
        duration = min(
            self._outlier.base_ejection_time * e.ejections, self._outlier.max_ejection_time
        )
        e.ejected_at = now
        self._apply(e, Event.EJECT, f"{reason}; ejected for {duration:g}s")
        e.timer = self._call_later(duration, lambda: self._ejection_over(e))

    def _ejection_over(self, e: Endpoint) -> None:
        e.timer = None
        if e.state is State.EJECTED:
            self._apply(e, Event.EJECTION_ENDED, "ejection time over")

    # -- drain, and a changing endpoint set -----------------------------------

    def drain(self) -> None:
        """Take every endpoint out for good: the gateway is shutting down."""
        self._draining = True  # no panic over endpoints that are merely draining
        for e in self.endpoints:
            self._apply(e, Event.DRAIN, "gateway draining")
        if self._ramp_timer is not None:
            self._ramp_timer.cancel()
            self._ramp_timer = None

    def set_drained(self, e: Endpoint, drained: bool) -> None:
        """Take ``e`` out of rotation by hand, or put it back (HAProxy's "set server
        state drain"): no new calls, the calls in flight finish. Its health state and
        checks go on; it returns to rotation on ``undrain`` if its health allows."""
        if e.drained == drained:
            return
        e.drained = drained
        log.info(
            "endpoint drained" if drained else "endpoint undrained",
            extra=fields(cluster=self.name, endpoint=e.address, state=e.state.value),
        )
        self._sync()

    def leave(self, endpoints: Sequence[Endpoint], reason: str) -> None:
        """These leave the cluster (``Cluster.update``): ``DRAINING``, for good.

        Rotation is pushed to the balancer once the new set is in
        (``rebuilt``), not per endpoint: a cluster whose every endpoint is
        replaced never looks empty in between.
        """
        for e in endpoints:
            self._apply(e, Event.DRAIN, reason, sync=False)

    def rebuilt(self) -> None:
        """The balancer has a new endpoint set: push every endpoint's rotation to it."""
        self._sync()

    # -- the transitions and what follows from them -------------------------

    def _apply(self, e: Endpoint, event: Event, reason: str, *, sync: bool = True) -> None:
        old = e.state
        new = transition(old, event)
        if new is old:
            return
        e.state = new
        e.reason = reason
        if old is State.EJECTED:
            e.reinstated_at = self._clock()
        if e.timer is not None and new is not State.EJECTED:
            e.timer.cancel()
            e.timer = None
        if new in ELIGIBLE:
            e.failures = 0
            if old in (State.NOT_SERVING, State.EJECTED) and self._slow.window > 0:
                e.ramp_from = self._clock()
        else:
            e.ramp_from = None
        log.info(
            "endpoint state",
            extra=fields(
                cluster=self.name,
                endpoint=e.address,
                previous=old.value,
                state=new.value,
                trigger=event.value,
                reason=reason,
            ),
        )
        if sync:
            self._sync()

    def _sync(self) -> None:
        """Push rotation and slow-start shares to the balancer; tell the listeners."""
        endpoints = self.endpoints
        healthy = sum(e.state in ELIGIBLE for e in endpoints)
        panic = healthy * 100 < self._panic_threshold * len(endpoints) and not self._draining
        if panic != self.panic:
            self.panic = panic
            log.warning(
                "panic" if panic else "panic over",
                extra=fields(
                    cluster=self.name,
                    healthy=healthy,
                    endpoints=len(endpoints),
                    panic_threshold=self._panic_threshold,
                ),
            )
        balancer = self.balancer
        for e in endpoints:
            eligible = e.state in ELIGIBLE or (panic and e.state is not State.DRAINING)
            eligible = eligible and not e.drained
            if balancer.is_eligible(e.index) != eligible:
                balancer.set_eligible(e.index, eligible)
        self._ramp()
        serving = any(balancer.is_eligible(e.index) for e in endpoints)
        self.serving = serving
        for listener in self._listeners:
            listener(self)

    def _ramp(self) -> None:
        """Set each ramping endpoint's share of its weight; step again while any ramps."""
        if self._slow.window <= 0:
            return
        now = self._clock()
        window = self._slow.window
        floor = self._slow.min_weight_percent / 100
        ramping = False
        for e in self.endpoints:
            share = 1.0
            if e.ramp_from is not None:
                t = now - e.ramp_from
                if t >= window:
                    e.ramp_from = None
                else:
                    share = max(floor, (t / window) ** (1 / self._slow.aggression))
                    ramping = True
            self.balancer.set_share(e, share)
        if ramping and self._ramp_timer is None:
            self._ramp_timer = self._call_later(window / 10, self._ramp_step)

    def _ramp_step(self) -> None:
        self._ramp_timer = None
        self._ramp()

    def skipped(self, exclude: Endpoint | None = None) -> list[tuple[str, str]]:
        """The endpoints a pick now leaves out, and why, for traces.

        The reason is the endpoint's state (``not_serving``, ``ejected``,
        ``draining``), or ``tried`` for ``exclude``, the endpoint a retry
        moves away from.
        """
        balancer = self.balancer
        return [
            (e.address, "tried" if e is exclude else "drained" if e.drained else e.state.value)
            for e in self.endpoints
            if e is exclude or not balancer.is_eligible(e.index)
        ]
