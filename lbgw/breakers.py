"""Circuit breakers per cluster: Envoy's, with Envoy's defaults. A decider: sync, no I/O.

Envoy's circuit breakers are thresholds, not a state machine: each limit is
a count of things in flight, and a call that would pass one fails at once
(``envoy.config.cluster.v3.CircuitBreakers.Thresholds``; "Circuit breaking"
in Envoy's architecture overview). lbgw keeps three:

* ``max_requests`` (1024): calls in flight to the cluster;
* ``max_pending_requests`` (1024): calls waiting for a connection: lbgw
  counts a call from its attempt's start on an endpoint whose channel was
  not ready until that attempt ends;
* ``max_retries`` (3): retries in flight to the cluster, beside the retry
  budget (``cluster.RetryBudget``), which bounds retries as a share of the
  calls in flight; a retry needs room in both.

A call the breaker refuses gets ``UNAVAILABLE`` with "lbgw: cluster 'users'
circuit breaker open: max_requests 1024" (``CircuitBreakerOpenError``) and
is not retried; a refused retry ends the call with the attempt's own status.
Every refusal is counted in ``overflows``, by limit, as Envoy's
``upstream_rq_pending_overflow`` and ``upstream_rq_retry_overflow``
counters do; the metrics module reads them.
"""

from __future__ import annotations

from lbgw.config import CircuitBreakerConfig
from lbgw.exceptions import CircuitBreakerOpenError

__all__ = ["CircuitBreaker"]

MAX_REQUESTS = "max_requests"
MAX_PENDING_REQUESTS = "max_pending_requests"
MAX_RETRIES = "max_retries"


class CircuitBreaker:
    """One cluster's thresholds and what is in flight against them."""

    __slots__ = ("_errors", "cluster", "config", "overflows", "pending", "requests", "retries")

    def __init__(self, cluster: str, config: CircuitBreakerConfig) -> None:
        self.cluster = cluster
        self.config = config
        self.requests = 0
        self.pending = 0
        self.retries = 0
        #: Refusals since start, by limit name.
        self.overflows: dict[str, int] = {MAX_REQUESTS: 0, MAX_PENDING_REQUESTS: 0, MAX_RETRIES: 0}
        self._errors = {
            MAX_REQUESTS: CircuitBreakerOpenError(cluster, MAX_REQUESTS, config.max_requests),
            MAX_PENDING_REQUESTS: CircuitBreakerOpenError(
                cluster, MAX_PENDING_REQUESTS, config.max_pending_requests
            ),
        }

    def __repr__(self) -> str:
        c = self.config
        return (
            f"<CircuitBreaker {self.cluster} requests {self.requests}/{c.max_requests} "
            f"pending {self.pending}/{c.max_pending_requests} "
            f"retries {self.retries}/{c.max_retries} overflows={self.overflows}>"
        )

    def open(self, limit: str) -> CircuitBreakerOpenError:
        """Count a refusal by ``limit``; the error that tells the client."""
        self.overflows[limit] += 1
        return self._errors[limit]

    def start_request(self) -> CircuitBreakerOpenError | None:
        """Count a call in flight to the cluster, or refuse it (counted)."""
        if self.requests >= self.config.max_requests:
            return self.open(MAX_REQUESTS)
        self.requests += 1
        return None

    def end_request(self) -> None:
        self.requests -= 1

    def start_pending(self) -> CircuitBreakerOpenError | None:
        """Count a call waiting for a connection, or refuse it (counted)."""
        if self.pending >= self.config.max_pending_requests:
            return self.open(MAX_PENDING_REQUESTS)
        self.pending += 1
        return None

    def end_pending(self) -> None:
        self.pending -= 1

    def start_retry(self) -> bool:
        """Whether one more retry may be in flight (a refusal is counted); counts it if so."""
        if self.retries >= self.config.max_retries:
            self.overflows[MAX_RETRIES] += 1
            return False
        self.retries += 1
        return True

    def end_retry(self) -> None:
        self.retries -= 1
