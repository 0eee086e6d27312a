"""pyproject.toml builds without setuptools' warnings (`make install` printed the
`project.license` deprecation twice) and names the setuptools that reads it."""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_string_and_setuptools_is_new_enough() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    # A string license (PEP 639) needs setuptools >= 77 in the build environment.
    assert "setuptools>=77" in meta["build-system"]["requires"]


def test_setuptools_applies_the_configuration_without_warnings() -> None:
    setuptools = pytest.importorskip("setuptools", reason="setuptools comes with the venv")
    from setuptools.config.pyprojecttoml import apply_configuration  # noqa: PLC0415
    from setuptools.dist import Distribution  # noqa: PLC0415

    major = int(setuptools.__version__.split(".")[0])
    assert major >= 77, f"the venv's setuptools {setuptools.__version__} is older than the build's"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert [str(w.message) for w in caught] == []
    assert dist.metadata.license_expression == "Apache-2.0"
