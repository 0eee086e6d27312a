"""The recent audit records, for the console's audit panel.

Audit events are written once, by ``server.api.auth.audit`` on the
``agentmesh.audit`` logger, whether the action came through gRPC or the
console; :class:`AuditTrail` is a logging handler that keeps the last
``size`` of them in memory (this replica's, since it started). The log
stays the durable record; this is the view of it an operator needs at hand.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

AUDIT_FIELDS = ("principal", "role", "action", "resource", "namespace", "outcome")


class AuditTrail(logging.Handler):
    """A bounded, newest-last buffer of audit records."""

    def __init__(self, size: int = 500) -> None:
        super().__init__(logging.INFO)
        self._records: deque[dict[str, Any]] = deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the audit fields of one record."""
        if not getattr(record, "audit", False):
            return
        self._records.append({"time": record.created,
                              **{f: str(getattr(record, f, "")) for f in AUDIT_FIELDS}})

    def recent(self, namespace: str, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` records of a namespace (and those of no namespace), newest first."""
        out: list[dict[str, Any]] = []
        for rec in reversed(self._records):
            if rec["namespace"] in (namespace, ""):
                out.append(rec)
                if len(out) >= limit:
                    break
        return out

    def attach(self) -> None:
        """Start collecting from the ``agentmesh.audit`` logger."""
        logger = logging.getLogger("agentmesh.audit")
        logger.addHandler(self)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)

    def detach(self) -> None:
        """Stop collecting."""
        logging.getLogger("agentmesh.audit").removeHandler(self)
