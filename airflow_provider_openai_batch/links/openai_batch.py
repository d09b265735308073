"""OpenAIBatchLink: the batch's page on platform.openai.com, from the ``batch_id`` XCom the task pushed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import TaskInstanceKey

BATCH_URL = "https://platform.openai.com/batches/{batch_id}"
#: Operators push the batch id under this key before they defer, so the link works while the task waits.
BATCH_ID_XCOM_KEY = "batch_id"


class OpenAIBatchLink(BaseOperatorLink):
    """
    Airflow 3 builds extra links on the worker after every run, deferrals included, from XComs the task
    pushed; pushing ``batch_id`` first thing is what makes the link usable during a 24-hour wait.
    """

    name = "OpenAI Batch"

    def get_link(self, operator: Any, *, ti_key: TaskInstanceKey) -> str:
        from airflow.providers.common.compat.sdk import XCom

        batch_id = XCom.get_value(ti_key=ti_key, key=BATCH_ID_XCOM_KEY)
        return BATCH_URL.format(batch_id=batch_id) if batch_id else ""
