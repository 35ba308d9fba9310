"""Dagster resources: the artifact store and the IO manager that hands artifacts downstream."""

from tunegraph.resources.artifacts import ArtifactIOManager, ArtifactStoreResource, default_home

__all__ = ["ArtifactIOManager", "ArtifactStoreResource", "default_home"]
