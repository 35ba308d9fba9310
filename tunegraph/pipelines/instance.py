"""The embedded Dagster instance: SQLite storage under `.tunegraph/dagster_home`.

`ensure_dagster_home()` writes `dagster.yaml` once (never over a user's own) and returns the folder;
`tunegraph dev`, `tunegraph materialize` and the tests all use it, so runs from the CLI show up in
the UI.
"""

from __future__ import annotations

from pathlib import Path

from dagster import DagsterInstance

from tunegraph.resources.artifacts import default_home

DAGSTER_YAML = """\
# Written by tunegraph for the embedded default instance; edit freely, tunegraph never overwrites it.
telemetry:
  enabled: false
"""


def ensure_dagster_home(home: Path | None = None) -> Path:
    dagster_home = (home or default_home()) / "dagster_home"
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    return dagster_home


def embedded_instance(home: Path | None = None) -> DagsterInstance:
    """The project's persistent instance, `<home>/dagster_home` (home: `.tunegraph`)."""
    return DagsterInstance.from_config(str(ensure_dagster_home(home)))
