"""Where the data files in ``configs/`` live, for editable and regular installs alike.

``configs/`` holds data only (model variants as JSON, vocabularies as text). It is installed as the
data package ``odise_configs``; in a source checkout it is the ``configs/`` folder next to this package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["configs_dir", "config_file"]


def configs_dir() -> Path:
    """The directory holding ``models/`` and ``vocabularies/``."""
    spec = importlib.util.find_spec("odise_configs")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = Path(location)
            if (path / "models").is_dir():
                return path
    fallback = Path(__file__).resolve().parent.parent / "configs"
    if (fallback / "models").is_dir():
        return fallback
    raise FileNotFoundError(
        "cannot find the odise_configs data folder (configs/models); reinstall the package with "
        "`pip install -e .` from the repository root"
    )


def config_file(*parts: str) -> Path:
    """Path of a shipped data file, e.g. ``config_file("models", "tiny.json")``."""
    return configs_dir().joinpath(*parts)
