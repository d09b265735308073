"""
Faults the fake server injects on demand, scripted or by probability, so tests can prove what survives them.

Kinds: ``429`` (with Retry-After), any other HTTP status as three digits (``500``, ``503``, ``403``...),
``drop`` (headers sent, then the connection is closed before the body), ``slow`` (the answer is delayed),
``truncate`` (the body is cut off half way; for file downloads this is a stream dropped mid-file), and
``drop_after`` (the request takes effect, then the answer is lost: the case that makes naive retries create a
second paid batch).
"""

from __future__ import annotations

import random
import threading
from collections import deque
from dataclasses import dataclass

KINDS = frozenset({"drop", "slow", "truncate", "drop_after"})
#: What chaos runs draw from by default: every transient failure a real deployment sees.
TRANSIENT_KINDS: tuple[str, ...] = ("429", "500", "503", "drop")


@dataclass(frozen=True)
class Fault:
    kind: str
    retry_after: float = 0.05
    delay: float = 2.0

    def __post_init__(self) -> None:
        is_status = self.kind.isdigit() and len(self.kind) == 3 and self.kind[0] in "45"
        if self.kind not in KINDS and not is_status:
            raise ValueError(f"unknown fault kind {self.kind!r}; an HTTP status like '503' or one of {sorted(KINDS)}")


class FaultPlan:
    """
    Which requests fail, and how.

    ``script(route, "429", "drop")`` makes the next two calls of ``route`` (e.g. ``"batches.retrieve"``, or
    ``"*"`` for any) fail in that order; ``chaos(0.3)`` fails 30 % of calls with a transient fault, drawn from
    a seeded generator so a failing run can be replayed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scripted: dict[str, deque[Fault]] = {}
        self._probability = 0.0
        self._kinds: tuple[str, ...] = TRANSIENT_KINDS
        self._routes: frozenset[str] | None = None
        self._random = random.Random(0)
        self.injected: list[tuple[str, str]] = []

    def script(self, route: str, *kinds: str | Fault) -> None:
        with self._lock:
            queue = self._scripted.setdefault(route, deque())
            queue.extend(k if isinstance(k, Fault) else Fault(k) for k in kinds)

    def chaos(
        self,
        probability: float,
        *,
        kinds: tuple[str, ...] = TRANSIENT_KINDS,
        routes: frozenset[str] | set[str] | None = None,
        seed: int = 0,
    ) -> None:
        for kind in kinds:
            Fault(kind)
        with self._lock:
            self._probability = probability
            self._kinds = kinds
            self._routes = frozenset(routes) if routes is not None else None
            self._random = random.Random(seed)

    def clear(self) -> None:
        with self._lock:
            self._scripted.clear()
            self._probability = 0.0
            self.injected.clear()

    def pending(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._scripted.values())

    def next_fault(self, route: str) -> Fault | None:
        with self._lock:
            for key in (route, "*"):
                queue = self._scripted.get(key)
                if queue:
                    fault = queue.popleft()
                    self.injected.append((route, fault.kind))
                    return fault
            eligible = self._probability and (self._routes is None or route in self._routes)
            if eligible and self._random.random() < self._probability:
                fault = Fault(self._random.choice(self._kinds))
                self.injected.append((route, fault.kind))
                return fault
        return None
