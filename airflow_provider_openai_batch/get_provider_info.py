"""Provider metadata Airflow reads through the ``apache_airflow_provider`` entry point (no hook import needed)."""

from __future__ import annotations

from typing import Any

from airflow_provider_openai_batch import __version__

_INTEGRATION = "OpenAI Batch"
_PKG = "airflow_provider_openai_batch"


def get_provider_info() -> dict[str, Any]:
    """
    What the UI needs to draw the connection form (``conn-fields``, ``ui-field-behaviour``, Airflow 3.2+),
    and where the hook, operators, sensor, trigger and extra link live.
    """
    return {
        "package-name": "airflow-provider-openai-batch",
        "name": "OpenAI Batch",
        "description": "Run OpenAI Batch API jobs from Airflow: upload, create, deferrable wait, download, cancel.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": _INTEGRATION,
                "external-doc-url": "https://platform.openai.com/docs/guides/batch",
                "tags": ["software"],
            }
        ],
        "hooks": [{"integration-name": _INTEGRATION, "python-modules": [f"{_PKG}.hooks.openai_batch"]}],
        "operators": [
            {
                "integration-name": _INTEGRATION,
                "python-modules": [f"{_PKG}.operators.openai_batch", f"{_PKG}.operators.job"],
            }
        ],
        "sensors": [{"integration-name": _INTEGRATION, "python-modules": [f"{_PKG}.sensors.openai_batch"]}],
        "triggers": [
            {
                "integration-name": _INTEGRATION,
                "python-modules": [f"{_PKG}.triggers.openai_batch", f"{_PKG}.triggers.job"],
            }
        ],
        "task-decorators": [
            {"name": "openai_batch", "class-name": f"{_PKG}.decorators.openai_batch.openai_batch_task"},
        ],
        "extra-links": [f"{_PKG}.links.openai_batch.OpenAIBatchLink"],
        "connection-types": [
            {
                "connection-type": "openai_batch",
                "hook-class-name": f"{_PKG}.hooks.openai_batch.OpenAIBatchHook",
                "hook-name": "OpenAI Batch",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login"],
                    "relabeling": {"password": "API key", "host": "Base URL"},
                    "placeholders": {
                        "host": "https://api.openai.com/v1 (or https://RESOURCE.openai.azure.com for api_type=azure)",
                        "password": "sk-...",
                    },
                },
                "conn-fields": {
                    "organization": {"label": "Organization", "schema": {"type": ["string", "null"]}},
                    "project": {"label": "Project", "schema": {"type": ["string", "null"]}},
                    "api_type": {
                        "label": "API type",
                        "description": "openai (also Azure's /openai/v1/ endpoint and compatible servers) or azure",
                        "schema": {
                            "type": ["string", "null"],
                            "default": "openai",
                            "enum": ["openai", "azure"],
                        },
                    },
                    "api_version": {
                        "label": "API version",
                        "description": "Azure classic endpoint only, e.g. 2024-10-21",
                        "schema": {"type": ["string", "null"]},
                    },
                    "timeout": {
                        "label": "Timeout (seconds)",
                        "schema": {"type": ["number", "null"], "minimum": 1},
                    },
                    "max_retries": {
                        "label": "Max retries",
                        "description": "Retries of 429, 5xx and dropped connections per call (SDK default 2)",
                        "schema": {"type": ["integer", "null"], "minimum": 0},
                    },
                    "default_headers": {
                        "label": "Default headers (JSON)",
                        "schema": {"type": ["object", "null"]},
                    },
                },
            }
        ],
    }
