"""
Test helpers for DAGs that use this provider: an embedded OpenAI Files + Batches server.

Point a connection at it (``host=srv.base_url``, ``password=srv.api_key``) and run your DAG with
``dag.test()``: every call goes over real HTTP through the real ``openai`` SDK, and nothing is paid for.
"""

from __future__ import annotations

from airflow_provider_openai_batch.testing.faults import Fault, FaultPlan
from airflow_provider_openai_batch.testing.server import FakeOpenAIServer
from airflow_provider_openai_batch.testing.state import FakeClock, HeldClock, QueueRefusal, Timings

__all__ = ["FakeClock", "FakeOpenAIServer", "Fault", "FaultPlan", "HeldClock", "QueueRefusal", "Timings"]
