"""testing/CONTRACT.md stays true: every test a row names exists, so no behaviour of the fake is left unheld."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import airflow_provider_openai_batch.testing as testing

TESTS = Path(__file__).parent
ALIASES = {"fs": "test_fake_server.py", "oc": "test_openai_contract.py"}
REFERENCE = re.compile(r"`(fs|oc|test_[a-z0-9_]+\.py)::([A-Za-z0-9_]+)(?:::([A-Za-z0-9_]+))?")


def _names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names | {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}


def test_every_test_the_contract_names_exists():
    contract = (Path(testing.__file__).parent / "CONTRACT.md").read_text()
    rows = [line for line in contract.splitlines() if re.match(r"\| [A-Z]\d+ \|", line)]
    assert len(rows) >= 35, "the contract lost rows"
    missing = []
    for row in rows:
        found = REFERENCE.findall(row)
        assert found, f"a row names no test: {row[:80]}"
        for module, first, second in found:
            names = _names(TESTS / ALIASES.get(module, module))
            missing += [f"{module}::{name}" for name in (first, second) if name and name not in names]
    assert not missing, f"CONTRACT.md names tests that do not exist: {missing}"
