"""The base of every recipe concern model (tunegraph.config.schema and its sibling modules)."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys are rejected by `tunegraph.config.loader` before pydantic sees them, with a
    "did you mean"; `extra='forbid'` is the backstop for code that builds recipes directly."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
