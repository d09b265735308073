"""
Every trigger survives the trip a deferred task's trigger takes: ``serialize()``, stored as a trigger row (kwargs
encrypted and serialized as Airflow does), read back in another triggerer process and re-created from classpath and
kwargs, as the amazon provider's trigger serialization tests do. A parameter that ``serialize()`` drops, renames or
fixes to a constant would make the re-created trigger wait differently from the one the task deferred on.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest
from airflow.jobs.triggerer_job_runner import TriggerRunner
from airflow.models.trigger import Trigger
from airflow.serialization.serialized_objects import BaseSerialization
from airflow.triggers.base import BaseTrigger

from airflow_provider_openai_batch.triggers.job import OpenAIBatchJobTrigger
from airflow_provider_openai_batch.triggers.openai_batch import OpenAIBatchTrigger

#: Each trigger with every constructor argument set, each to a value unlike its default (see the first test).
TRIGGERS: list[tuple[type[BaseTrigger], dict[str, Any]]] = [
    (
        OpenAIBatchTrigger,
        {
            "batch_id": "batch_abc",
            "conn_id": "openai_eu",
            "poll_interval": 12.5,
            "end_time": 1_900_000_000.25,
            "cancel_on_kill": False,
            "max_poll_failures": 3,
            "jitter_first_poll": False,
            "created_at": 1_800_000_000.5,
            "max_poll_interval": 300.0,
            "sibling_look": {"key": "k" * 32, "first": 2, "since": 1_799_999_990.0},
        },
    ),
    (
        OpenAIBatchJobTrigger,
        {
            "batch_ids": ["batch_a", "batch_b", "batch_c"],
            "conn_id": "openai_eu",
            "poll_interval": 12.5,
            "end_times": {"batch_a": 1_900_000_000.25, "batch_b": 1_900_000_100.5, "batch_c": 1_900_000_200.75},
            "created_at": 1_800_000_000.5,
            "max_poll_interval": 300.0,
            "max_poll_failures": 3,
            "cancel_on_kill": False,
            "label": "job nightly round 2",
            "jitter_first_poll": False,
            "wake_on_any_end": False,
            "wake_at": 1_850_000_000.5,
            "wake_on_unclean_end": True,
            "progress": {
                "total": 1_000_000,
                "done": 250_000,
                "pieces_done": 5,
                "running": 2,
                "waiting": 13,
                "budget": 100_000,
                "unit": "requests",
                "learned": True,
                "enqueued": 100_000,
                "started": 1_799_999_000.5,
                "spent": "1.25 USD",
            },
        },
    ),
]
IDS = [cls.__name__ for cls, _ in TRIGGERS]


def _class_at(classpath: str) -> type[BaseTrigger]:
    """What a triggerer loads for a trigger row (``TriggerRunner.get_trigger_by_classpath``)."""
    return TriggerRunner().get_trigger_by_classpath(classpath)


def _parameters(cls: type[BaseTrigger]) -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"}


@pytest.mark.parametrize(("cls", "kwargs"), TRIGGERS, ids=IDS)
def test_every_argument_is_set_unlike_its_default(cls, kwargs):
    parameters = _parameters(cls)
    assert set(kwargs) == set(parameters), "a trigger argument this table does not set would go untested"
    for name, value in kwargs.items():
        assert value != parameters[name].default, name


@pytest.mark.parametrize(("cls", "kwargs"), TRIGGERS, ids=IDS)
def test_serialize_names_the_class_and_every_argument_as_given(cls, kwargs):
    classpath, serialized = cls(**kwargs).serialize()
    assert _class_at(classpath) is cls
    assert serialized == kwargs
    json.dumps(serialized)  # plain JSON: nothing that needs Airflow's own encoders


@pytest.mark.parametrize(("cls", "kwargs"), TRIGGERS, ids=IDS)
def test_a_trigger_re_created_from_its_row_is_the_same_trigger(cls, kwargs):
    trigger = cls(**kwargs)
    row = Trigger.from_object(trigger)  # what the task's deferral writes (kwargs encrypted)

    stored = BaseSerialization.serialize(row.kwargs)
    kwargs_read_back = BaseSerialization.deserialize(json.loads(json.dumps(stored)))
    again = _class_at(row.classpath)(**kwargs_read_back)

    row_again = Trigger.from_object(again)
    assert row_again.classpath == row.classpath
    assert row_again.kwargs == row.kwargs == kwargs
    for name in kwargs:  # the re-created trigger waits exactly as the first would
        assert getattr(again, name) == getattr(trigger, name), name
