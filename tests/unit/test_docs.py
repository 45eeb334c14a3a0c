"""The configuration reference documents every setting the code has."""

from __future__ import annotations

from pathlib import Path

from perago_worker.settings import ConductorSettings, LakeFSSettings, Settings

DOC = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()


def test_every_setting_has_a_row_in_the_configuration_reference() -> None:
    names = [
        f"PERAGO_{n.upper()}" for n in Settings.model_fields if n not in ("lakefs", "conductor")
    ]
    names += [f"PERAGO_LAKEFS__{n.upper()}" for n in LakeFSSettings.model_fields]
    names += [f"PERAGO_CONDUCTOR__{n.upper()}" for n in ConductorSettings.model_fields]
    missing = [n for n in names if f"`{n}`" not in DOC]
    assert missing == []
