"""The launcher resource: train in the asset's process, or on N processes via torchrun or
`accelerate launch`, reporting back through dagster-pipes.

    tunegraph materialize RECIPE --launcher torchrun --num-processes 2
    TUNEGRAPH_LAUNCHER=torchrun TUNEGRAPH_NUM_PROCESSES=2 tunegraph dev   # the UI's runs too

Set it per run in the launchpad too (resources: launcher: config: ...). The workers are
`tunegraph.resources.launch_worker`; rank 0 opens the pipes connection, so its log lines and final
metrics appear in the asset's run, and the asset reports the materialization as usual. A failing
rank fails the asset with that rank's error (tunegraph.ops.launch.LaunchError).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dagster import (
    AssetExecutionContext,
    ConfigurableResource,
    PipesEnvContextInjector,
    PipesTempFileMessageReader,
    open_pipes_session,
)
from pydantic import Field

from tunegraph.config import Recipe
from tunegraph.ops.launch import Launcher, LaunchSpec


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name}: expected a whole number, got '{value}'") from None


class LauncherResource(ConfigurableResource):
    """How the train asset runs training: `python` (in the asset's process, the default),
    `torchrun` or `accelerate` with `num_processes` processes on this machine."""

    launcher: str = Field(default_factory=lambda: os.environ.get("TUNEGRAPH_LAUNCHER", "python"),
                          description="python | torchrun | accelerate ($TUNEGRAPH_LAUNCHER).")
    num_processes: int = Field(default_factory=lambda: _env_int("TUNEGRAPH_NUM_PROCESSES", 1),
                               description="processes (GPUs) to train on "
                                           "($TUNEGRAPH_NUM_PROCESSES).")
    timeout_s: float | None = Field(None, description="seconds before a distributed run is "
                                                      "stopped; none: no limit.")

    def spec(self) -> LaunchSpec:
        launcher = self.launcher
        if launcher == "python" and self.num_processes > 1:
            launcher = "torchrun"  # asking for processes means asking for a launcher
        return LaunchSpec(launcher=launcher, num_processes=self.num_processes,  # type: ignore[arg-type]
                          timeout_s=self.timeout_s)

    def for_asset(self, context: AssetExecutionContext) -> Launcher:
        return PipesLauncher(self.spec(), context=context)


class PipesLauncher(Launcher):
    """A Launcher whose rank 0 reports to the asset's Dagster run through dagster-pipes."""

    def __init__(self, spec: LaunchSpec, context: AssetExecutionContext):
        super().__init__(spec, echo=print)  # torchrun's output lands in the step's stdout log
        self.context = context
        self._env: dict[str, str] = {}
        self.reported: list[Any] = []

    def train(self, recipe: Recipe, base_dir: Path, tokenized_dir: Path, out_dir: Path,
              progress=None) -> dict[str, Any]:  # noqa: ANN001 (Progress)
        if not self.spec.distributed:
            return super().train(recipe, base_dir, tokenized_dir, out_dir, progress)
        self.context.log.info(f"training on {self.spec.num_processes} processes "
                              f"({self.spec.launcher}); rank 0 reports here")
        with open_pipes_session(context=self.context,
                                context_injector=PipesEnvContextInjector(),
                                message_reader=PipesTempFileMessageReader(),
                                extras={"recipe": recipe.name}) as session:
            self._env = session.get_bootstrap_env_vars()
            try:
                return super().train(recipe, base_dir, tokenized_dir, out_dir, progress)
            finally:
                self.reported = session.get_custom_messages()

    def env(self) -> dict[str, str]:
        return dict(self._env)
