"""Every result and object-set document made during a test is checked against the result schema once the test
is done (documents are filled after `new_result` makes them), so no producer can drift from the contract."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from schema import result


@pytest.fixture(autouse=True)
def _documents_keep_the_schema(request: pytest.FixtureRequest) -> Iterator[None]:
    made: list[dict[str, Any]] = []
    result.DOCUMENT_WATCHERS.append(made.append)
    try:
        yield
    finally:
        result.DOCUMENT_WATCHERS.remove(made.append)
    if request.node.get_closest_marker("invalid_documents"):
        return
    bad = [(doc.get("source"), problems) for doc in made if (problems := result.validate(doc))]
    if bad:
        source, problems = bad[0]
        pytest.fail(f"{len(bad)} of {len(made)} documents break result.schema.json; the first ({source}): "
                    + "; ".join(problems[:5]), pytrace=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "invalid_documents: the test makes result documents that break the "
                                       "schema on purpose")
