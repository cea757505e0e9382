"""Fixtures of the system tests: the K3s manifests rendered once per module with kustomize."""

from __future__ import annotations

import pytest

from tests.system.test_k3s import TARGETS, Obj, render


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    """Every kustomize target (base and the GPU overlays) rendered to objects."""
    return {name: render(path) for name, path in TARGETS.items()}


@pytest.fixture(scope="module")
def base(rendered: dict[str, list[Obj]]) -> list[Obj]:
    """The base target's objects."""
    return rendered["base"]
