"""Dagster resources: the artifact store, the IO manager that hands artifacts downstream, and the
launcher that runs training in-process or on several processes (torchrun/accelerate via pipes)."""

from tunegraph.resources.artifacts import ArtifactIOManager, ArtifactStoreResource, default_home
from tunegraph.resources.launcher import LauncherResource

__all__ = ["ArtifactIOManager", "ArtifactStoreResource", "LauncherResource", "default_home"]
