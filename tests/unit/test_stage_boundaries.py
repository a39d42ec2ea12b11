"""The stages meet only through tables and explicit arguments (issue 25): the submitter and the collector
do not import the reconciler (nor the dead-owner rules that call it); etl.pipeline runs it first."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ETL = Path(__file__).resolve().parents[2] / "etl"


def _imported(module: str) -> set[str]:
    tree = ast.parse((ETL / f"{module}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("stage", ["submitter", "collector"])
def test_a_stage_does_not_import_the_reconciler(stage: str) -> None:
    imported = _imported(stage)
    for other in ("etl.reconciler", "etl.recovery", "etl.life"):
        assert other not in imported, f"etl/{stage}.py imports {other}"
