"""Knobs the example DAGs share; the demo and the tests turn polling down to seconds."""

from __future__ import annotations

import os

#: Seconds between status polls. One minute suits real batches; the offline demo uses less.
POLL_SECONDS = float(os.environ.get("OPENAI_BATCH_EXAMPLE_POLL_SECONDS", "60"))
MODEL = os.environ.get("OPENAI_BATCH_EXAMPLE_MODEL", "gpt-4o-mini")
EMBEDDING_MODEL = os.environ.get("OPENAI_BATCH_EXAMPLE_EMBEDDING_MODEL", "text-embedding-3-small")
