"""DVC-tracked data feeds Dagster: `dvc pull` of a new data version makes the tokenized dataset
(and the tiny base model, whose tokenizer learns from the data) stale, by Dagster's own staleness
rules, on a real git + DVC repository with a local remote."""

from pathlib import Path

from dagster import (
    AssetKey,
    AssetSelection,
    DagsterInstance,
    Definitions,
    define_asset_job,
    materialize,
)
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver
from dvc_support import dvc, dvc_file_md5, git, init_repo

from tunegraph.assets import base_model_key
from tunegraph.assets.raw_data import raw_data_key, report_raw_data
from tunegraph.config import load_recipe
from tunegraph.pipelines import assets_for, resources


def _status(instance: DagsterInstance, assets: list, key: AssetKey) -> tuple[StaleStatus, list]:
    """What the UI shows for `key`: Dagster's stale status and its causes."""
    resolver = get_stale_status_resolver(instance, assets)
    return resolver.get_status(key), [c.reason for c in resolver.get_stale_causes(key)]


def test_dvc_pull_of_new_data_makes_the_tokenized_dataset_stale(quickstart_copy: Path,
                                                                tmp_path_factory):
    # A teammate's repository: the quickstart with its data tracked by DVC, pushed to a remote.
    team = quickstart_copy.parent
    init_repo(team)
    dvc(team, "add", "-q", "data/quickstart.jsonl")
    dvc(team, "remote", "add", "-d", "local", str(tmp_path_factory.mktemp("remote")))
    git(team, "add", "-A")
    git(team, "commit", "-qm", "data v1")
    dvc(team, "push", "-q")
    v1 = dvc_file_md5(team / "data" / "quickstart.jsonl.dvc")
    # Our clone of it, with the data pulled from the remote.
    repo = tmp_path_factory.mktemp("ours") / "repo"
    git(team, "clone", "-q", str(team), str(repo))
    dvc(repo, "pull", "-q")
    data = repo / "data" / "quickstart.jsonl"
    assert data.read_bytes() == (team / "data" / "quickstart.jsonl").read_bytes()

    recipe = load_recipe(repo / "quickstart.yaml", {"output_dir": str(repo / "out")})
    assets = assets_for([recipe])
    tokenized = AssetKey(["quickstart", "tokenized_dataset"])
    defs = Definitions(assets=assets, resources=resources(str(repo / "artifacts")),
                       jobs=[define_asset_job("observe_raw_data",
                                              AssetSelection.assets(raw_data_key(recipe)))])

    def observe() -> str:
        """As the UI's "Observe sources" does: a run of the observation."""
        result = defs.resolve_job_def("observe_raw_data").execute_in_process(instance=instance)
        assert result.success
        record = instance.fetch_observations(raw_data_key(recipe), limit=1).records[0]
        return record.asset_observation.tags["dagster/data_version"]

    with DagsterInstance.ephemeral() as instance:
        report_raw_data(instance, [recipe])  # what `tunegraph materialize` does first
        result = materialize(assets, instance=instance, resources=resources(str(repo / "artifacts")),
                             selection=AssetSelection.assets(tokenized).upstream())
        assert result.success
        assert _status(instance, assets, tokenized) == (StaleStatus.FRESH, [])
        assert observe() == v1  # the DVC hash, unchanged: still fresh
        assert _status(instance, assets, tokenized) == (StaleStatus.FRESH, [])

        # The teammate commits and pushes new data; we pull it.
        team_data = team / "data" / "quickstart.jsonl"
        team_data.write_bytes(team_data.read_bytes().replace(b'"milk"', b'"silk"', 1))
        dvc(team, "add", "-q", "data/quickstart.jsonl")
        git(team, "commit", "-qam", "data v2")
        dvc(team, "push", "-q")
        v2 = dvc_file_md5(team / "data" / "quickstart.jsonl.dvc")
        assert v2 != v1
        git(repo, "pull", "-q")
        dvc(repo, "pull", "-q")
        assert b'"silk"' in data.read_bytes()
        assert observe() == v2
        status, causes = _status(instance, assets, tokenized)
        assert status == StaleStatus.STALE and "has a new dependency data version" in causes
        assert _status(instance, assets, base_model_key(recipe))[0] == StaleStatus.STALE

        # Materializing the stale assets makes them fresh again, with a new tokenized dataset.
        again = materialize(assets, instance=instance, resources=resources(str(repo / "artifacts")),
                            selection=AssetSelection.assets(tokenized).upstream())
        assert again.success
        assert _status(instance, assets, tokenized) == (StaleStatus.FRESH, [])
        keys = [{e.asset_key: e.step_materialization_data.materialization.metadata["artifact_key"]
                 .value for e in r.get_asset_materialization_events()} for r in (result, again)]
        assert keys[0][tokenized] != keys[1][tokenized]
