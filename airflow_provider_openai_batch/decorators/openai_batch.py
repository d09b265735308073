"""
``@task.openai_batch``: a TaskFlow function that returns the requests, and a task that runs the whole batch job.

The function returns request dicts, prompts (with ``model=``: strings, message lists, ``(key, prompt)`` pairs or
``{"key", "prompt"}`` rows, as ``outputs.prompt_item`` reads them), or a path / URI / ``ObjectStoragePath`` of a
JSONL file; the task is an ``OpenAIBatchJobOperator`` around it (registered through the provider's
``task-decorators``, like ``@task.docker``).
The function runs once per run of tries: after a deferral or a retry the job continues from its work folder; a
clear runs the function again.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, ClassVar

from airflow.providers.common.compat.sdk import (
    DecoratedOperator,
    TaskDecorator,
    context_merge,
    determine_kwargs,
    task_decorator_factory,
)

from airflow_provider_openai_batch.operators.job import OpenAIBatchJobOperator


class _OpenAIBatchDecoratedOperator(DecoratedOperator, OpenAIBatchJobOperator):
    """The job operator whose ``source`` is what the decorated function returns."""

    template_fields: Sequence[str] = (*DecoratedOperator.template_fields, *OpenAIBatchJobOperator.template_fields)
    template_fields_renderers: ClassVar[dict[str, str]] = {
        **DecoratedOperator.template_fields_renderers,
        **OpenAIBatchJobOperator.template_fields_renderers,
    }
    custom_operator_name: str = "@task.openai_batch"

    def __init__(
        self,
        *,
        python_callable: Callable[..., Any],
        op_args: Collection[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(python_callable=python_callable, op_args=op_args, op_kwargs=op_kwargs, **kwargs)

    def execute(self, context: Any) -> Any:
        return OpenAIBatchJobOperator.execute(self, context)

    def source_label(self) -> str:
        return f"@task.openai_batch function {self.python_callable.__name__!r} (task {self.task_id})"

    def resolve_source(self, context: Mapping[str, Any]) -> Any:
        context_merge(context, self.op_kwargs)  # type: ignore[arg-type]
        kwargs = determine_kwargs(self.python_callable, self.op_args, context)
        source = self.python_callable(*self.op_args, **kwargs)
        if source is None or (isinstance(source, str) and not source.strip()) or isinstance(source, Mapping):
            raise TypeError(
                f"{self.source_label()} returned {type(source).__name__} {str(source)[:80]!r}; it may return request "
                "dicts or prompts (a list, or a generator yielding them), or a path, URI or ObjectStoragePath of a "
                "JSONL file"
            )
        return source


def openai_batch_task(python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> TaskDecorator:
    """
    ``@task.openai_batch(endpoint=..., destination=..., ...)``: takes ``OpenAIBatchJobOperator``'s arguments
    (all but ``source``, which is what the function returns) and returns the job's result dict.
    """
    return task_decorator_factory(
        python_callable=python_callable,
        decorated_operator_class=_OpenAIBatchDecoratedOperator,
        **kwargs,
    )
