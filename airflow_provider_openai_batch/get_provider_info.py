"""Provider metadata Airflow reads through the ``apache_airflow_provider`` entry point (no hook import needed)."""

from __future__ import annotations

from typing import Any

from airflow_provider_openai_batch import __version__

_INTEGRATION = "OpenAI Batch"
#: OpenAI's API; the hook's default too (kept here so reading provider info imports nothing heavy).
DEFAULT_BASE_URL = "https://api.openai.com/v1"
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
                    # A placeholder is one unwrapped line inside the input: it must fit the form's width.
                    # Longer guidance goes into the descriptions of the extra fields, which wrap.
                    "placeholders": {"host": DEFAULT_BASE_URL, "password": "sk-..."},
                },
                "conn-fields": {
                    "organization": {
                        "label": "Organization",
                        "description": "Optional org-... id, sent as the OpenAI-Organization header "
                        "(default: the key's own organization)",
                        "schema": {"type": ["string", "null"]},
                    },
                    "project": {
                        "label": "Project",
                        "description": "Optional proj_... id, sent as the OpenAI-Project header "
                        "(default: the key's own project)",
                        "schema": {"type": ["string", "null"]},
                    },
                    "api_type": {
                        "label": "API type",
                        "description": "openai: OpenAI, Azure's /openai/v1/ endpoint, compatible servers. "
                        "azure: Azure's classic API (Base URL https://RESOURCE.openai.azure.com + API version)",
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
                        "description": "Per API call (SDK default 600)",
                        "schema": {"type": ["number", "null"], "minimum": 1},
                    },
                    "max_retries": {
                        "label": "Max retries",
                        "description": "Retries of 429, 5xx and dropped connections per call (SDK default 2)",
                        "schema": {"type": ["integer", "null"], "minimum": 0},
                    },
                    "batch_link": {
                        "label": "Batch page link",
                        "description": "auto: OpenAI's batch page for api.openai.com, no link elsewhere. "
                        "openai: a gateway that forwards to OpenAI. none: no link",
                        "schema": {"type": ["string", "null"], "default": "auto", "enum": ["auto", "openai", "none"]},
                    },
                    "default_headers": {
                        "label": "Default headers (JSON)",
                        "description": 'Sent with every call, e.g. {"X-Team": "etl"}',
                        "schema": {"type": ["object", "null"]},
                    },
                },
            }
        ],
        "config": {
            "openai_batch": {
                "description": "The OpenAI Batch provider.",
                "options": {
                    "deployment_salt": {
                        "description": (
                            "Names this deployment in every batch's idempotency key, so two Airflow deployments "
                            "on one OpenAI project never reuse (or delete the input of) each other's batches. "
                            "The same on every worker of one deployment. Default: a random id made once and kept "
                            "in the Airflow Variable openai_batch_deployment_id."
                        ),
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "prod-eu-1",
                        "default": None,
                    }
                },
            }
        },
    }
