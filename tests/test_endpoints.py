"""
What the Batch API accepts (``endpoints.py``), read from the installed SDK: the endpoint list, each endpoint's
required body fields, the embedding-input count and the expiry bounds. Checked against CONTRACT.md's rows, against
the fake server's own reading of the same SDK types (``testing/input_rules.py``), and against an SDK that changed.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from typing import Literal

import pytest
import typing_extensions
from typing_extensions import NotRequired, Required, TypedDict

from airflow_provider_openai_batch import endpoints
from airflow_provider_openai_batch.endpoints import (
    MAX_EXPIRES_AFTER_SECONDS,
    MIN_EXPIRES_AFTER_SECONDS,
    batch_endpoints,
    count_embedding_inputs,
    expiry_problem,
    required_body_fields,
)
from airflow_provider_openai_batch.testing import input_rules

#: CONTRACT.md B1 (openai 3.57): the endpoints ``BatchCreateParams.endpoint`` lists, in the SDK's order.
CONTRACT_ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)

#: CONTRACT.md V2: what each endpoint's SDK request type marks ``Required``.
CONTRACT_REQUIRED = {
    "/v1/responses": set(),  # a stored prompt can supply model and input
    "/v1/chat/completions": {"model", "messages"},
    "/v1/embeddings": {"model", "input"},
    "/v1/completions": {"model", "prompt"},
    "/v1/moderations": {"input"},
    "/v1/images/generations": {"prompt"},
    "/v1/images/edits": {"image", "prompt"},
    "/v1/videos": {"prompt"},
}


@pytest.fixture
def fresh() -> Iterator[None]:
    """The SDK is read once per process; a test that swaps an SDK type reads it again, before and after."""
    endpoints.batch_endpoints.cache_clear()
    endpoints.required_body_fields.cache_clear()
    yield
    endpoints.batch_endpoints.cache_clear()
    endpoints.required_body_fields.cache_clear()


# --- the endpoint list ------------------------------------------------------------------------------------------


def test_the_endpoints_are_the_installed_sdks_in_its_order():
    from openai.types.batch_create_params import BatchCreateParams

    literal = typing_extensions.get_type_hints(BatchCreateParams, include_extras=True)["endpoint"]
    assert batch_endpoints() == typing_extensions.get_args(typing_extensions.get_args(literal)[0])
    assert batch_endpoints()[: len(CONTRACT_ENDPOINTS)] == CONTRACT_ENDPOINTS


def test_an_endpoint_a_newer_sdk_adds_is_accepted_without_a_release(fresh, monkeypatch):
    class BatchCreateParams(TypedDict, total=False):
        endpoint: Required[Literal["/v1/responses", "/v1/chat/completions", "/v1/audio/speech"]]

    monkeypatch.setattr(
        importlib.import_module("openai.types.batch_create_params"), "BatchCreateParams", BatchCreateParams
    )
    assert batch_endpoints() == ("/v1/responses", "/v1/chat/completions", "/v1/audio/speech")


def test_an_sdk_whose_type_moved_falls_back_to_the_known_list(fresh, monkeypatch):
    monkeypatch.delattr(importlib.import_module("openai.types.batch_create_params"), "BatchCreateParams")
    assert batch_endpoints() == CONTRACT_ENDPOINTS


# --- required body fields ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", sorted(CONTRACT_REQUIRED))
def test_each_endpoint_requires_what_its_request_type_requires(endpoint):
    assert required_body_fields(endpoint) == CONTRACT_REQUIRED[endpoint]


@pytest.mark.parametrize("endpoint", CONTRACT_ENDPOINTS)
def test_the_provider_and_the_fake_read_the_sdk_alike(endpoint):
    assert required_body_fields(endpoint) == input_rules.required_fields(endpoint)


@pytest.mark.parametrize("endpoint", [None, "", "/v1/audio/speech", "/v2/chat/completions"])
def test_an_endpoint_the_sdk_does_not_describe_requires_nothing(endpoint):
    assert required_body_fields(endpoint) == frozenset()  # a compatible server's own endpoint


def test_a_field_that_becomes_optional_upstream_stops_being_required(fresh, monkeypatch):
    class EmbeddingCreateParams(TypedDict, total=False):
        input: Required[str]
        model: str  # a later SDK gives the endpoint a default model
        dimensions: NotRequired[int]

    module = importlib.import_module("openai.types.embedding_create_params")
    monkeypatch.setattr(module, "EmbeddingCreateParams", EmbeddingCreateParams)
    assert required_body_fields("/v1/embeddings") == {"input"}


def test_an_sdk_without_the_request_type_requires_nothing_rather_than_rejecting_good_input(fresh, monkeypatch):
    monkeypatch.delattr(importlib.import_module("openai.types.moderation_create_params"), "ModerationCreateParams")
    assert required_body_fields("/v1/moderations") == frozenset()


# --- embedding inputs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "inputs"),
    [
        ("one text", 1),
        (["a", "b", "c"], 3),
        ([1, 2, 3, 4], 1),  # one token array is one input
        ([[1, 2], [3], [4, 5, 6]], 3),  # an array of token arrays: one each
        ([True, False], 2),  # booleans are not tokens
        ([], 0),
        (None, 0),
    ],
)
def test_embedding_inputs_are_counted_as_openai_counts_them(value, inputs):
    assert count_embedding_inputs(value) == inputs


# --- expiry bounds ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [None, 3_600, 86_400, 2_592_000])
def test_expiry_within_openais_bounds_is_fine(seconds):
    assert expiry_problem(seconds) is None


@pytest.mark.parametrize("seconds", [0, 3_599, 2_592_001, -1])
def test_expiry_outside_openais_bounds_says_what_openai_accepts(seconds):
    problem = expiry_problem(seconds)
    assert problem is not None and f"{seconds:,} seconds" in problem
    assert "3,600 (1 hour)" in problem and "2,592,000 (30 days)" in problem


@pytest.mark.parametrize("module", ["openai.types.batch_create_params", "openai.types.file_create_params"])
def test_the_expiry_bounds_are_what_the_sdk_documents(module):
    # BatchCreateParams.output_expires_after.seconds and FileCreateParams.expires_after.seconds
    assert "Must be between 3600 (1 hour) and 2592000 (30 days)" in inspect.getsource(importlib.import_module(module))
    assert (MIN_EXPIRES_AFTER_SECONDS, MAX_EXPIRES_AFTER_SECONDS) == (3_600, 2_592_000)
