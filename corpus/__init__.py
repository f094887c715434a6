"""Fixed regression models, replayed by every property family before random generation.

Each entry takes the CPUs a backend can run on and returns a model."""

from __future__ import annotations

from collections.abc import Callable

from corpus.edges import (
    at_percpu_limit,
    one_byte_variables,
    over_percpu_limit,
    plain_data,
    static_only_sections,
    tail_call_shared_variable,
)
from corpus.selftest import selftest_model
from generators.model import ProgramModel

CORPUS: dict[str, Callable[[tuple[int, ...]], ProgramModel]] = {
    "selftest": selftest_model,
    "at_percpu_limit": at_percpu_limit,
    "over_percpu_limit": over_percpu_limit,
    "one_byte_variables": one_byte_variables,
    "static_only_sections": static_only_sections,
    "plain_data": plain_data,
    "tail_call_shared_variable": tail_call_shared_variable,
}
