"""Apache Airflow provider for the OpenAI Batch API."""

from __future__ import annotations

__version__ = "0.1.0"

try:  # Fail at import with a sentence, not deep inside a Task SDK import later on.
    from airflow import __version__ as _airflow_version
except ImportError:  # pragma: no cover - airflow is a hard dependency
    _airflow_version = "0"

if int(_airflow_version.split(".", 1)[0]) < 3:  # pragma: no cover - exercised only on Airflow 2
    raise RuntimeError(
        f"airflow-provider-openai-batch {__version__} needs Apache Airflow 3.0 or newer "
        f"(this is {_airflow_version}); it is built on the Airflow 3 Task SDK."
    )

__all__ = ["__version__"]
