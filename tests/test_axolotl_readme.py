"""axolotl_configs/README.md stays true to the code: every shipped method and its keys, only files that exist.

It once named a module and classes that had been removed and never mentioned `adapter: neat`; these
checks read the registry and the checkout, so a new method or a moved file shows up here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from neuroada_plugin.registry import MethodSpec, methods

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "axolotl_configs" / "README.md").read_text(encoding="utf-8")
# Methods this package ships (tests may register a toy method of their own in this process).
SHIPPED = [spec for spec in methods().values() if spec.config.startswith("neuroada_plugin.")]


@pytest.mark.parametrize("spec", SHIPPED, ids=[spec.name for spec in SHIPPED])
def test_readme_lists_every_method_and_its_keys(spec: MethodSpec):
    assert f"adapter: {spec.name}" in README
    missing = [
        f"{spec.yaml_prefix}{field.name}"
        for field in spec.config_fields()
        if f"`{spec.yaml_prefix}{field.name}`" not in README
    ]
    assert not missing, f"axolotl_configs/README.md does not list {missing}"


def test_readme_names_only_files_that_exist():
    paths = set(re.findall(r"`((?:neuroada_plugin|tests|scripts|examples|axolotl_configs)/[\w./-]+)`", README))
    missing = sorted(path for path in paths if not (REPO / path).exists())
    assert paths and not missing, f"axolotl_configs/README.md names files that do not exist: {missing}"
