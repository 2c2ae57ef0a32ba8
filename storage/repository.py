"""Repository: every read and write of run state, one object over three concerns that each live in a module of
their own: the delivery protocol (storage/protocol.py), runs and their image rows (storage/runs.py), and
aggregation state with metric rows (storage/aggregation_state.py)."""

from __future__ import annotations

from storage.aggregation_state import AggregationRecords
from storage.database import Database
from storage.models import utcnow
from storage.protocol import Claim, Completion, DeliveryProtocol
from storage.runs import PlannedImage, RunConflictError, RunNotFoundError, RunRecords

__all__ = ["Claim", "Completion", "PlannedImage", "Repository", "RunConflictError", "RunNotFoundError", "utcnow"]


class Repository(RunRecords, DeliveryProtocol, AggregationRecords):
    """Run state on one database."""

    def __init__(self, database: Database) -> None:
        self.db = database
