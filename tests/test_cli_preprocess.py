"""`tunegraph preprocess --debug / --stats-json`, through Dagster on a temporary instance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tunegraph.cli import main

RECIPE = """base_model: tunegraph:tiny-llama
tiny_model: {hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2,
             intermediate_size: 64, vocab_size: 400}
learning_rate: 0.001
sequence_len: 256
sample_packing: true
skip_invalid_rows: true
datasets:
  - path: data.jsonl
    type: alpaca
"""


@pytest.fixture
def recipe(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("TUNEGRAPH_HOME", str(tmp_path / ".tunegraph"))
    monkeypatch.chdir(tmp_path)
    rows = [{"instruction": f"say {i}", "input": "", "output": f"number {i}"} for i in range(30)]
    rows.insert(7, {"instruction": "no answer"})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.yaml").write_text(RECIPE)
    return tmp_path / "r.yaml"


def test_debug_and_stats_json(recipe: Path, tmp_path: Path):
    result = CliRunner().invoke(main, ["preprocess", str(recipe), "--debug",
                                       "--debug-num-examples", "2",
                                       "--stats-json", str(tmp_path / "s" / "stats.json")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "s" / "stats.json").read_text())
    assert sorted(stats) == sorted(["num_rows", "num_tokens", "num_trainable_tokens",
                                    "num_truncated", "packing_efficiency", "num_packed_rows"])
    assert stats["num_rows"] == 30 and stats["num_packed_rows"] < 30
    assert 0.5 < stats["packing_efficiency"] <= 1
    # Not a terminal: plain text, trained tokens in «».
    assert result.output.count("--- row") == 2 and "«number" in result.output
    assert "\033[" not in result.output
    # The same stats, rendered examples and the packing distribution are asset metadata.
    from dagster import AssetKey

    from tunegraph.pipelines import embedded_instance

    with embedded_instance(tmp_path / ".tunegraph") as instance:
        event = instance.get_latest_materialization_event(AssetKey(["r", "tokenized_dataset"]))
    metadata = event.asset_materialization.metadata
    assert metadata["num_packed_rows"].value == stats["num_packed_rows"]
    assert metadata["packing_efficiency"].value == stats["packing_efficiency"]
    assert metadata["num_invalid_skipped"].value == 1
    assert "row 7 (counting from 0): field 'output' is missing" in (
        metadata["invalid_row_examples"].value)
    assert "| documents in a row | rows |" in metadata["documents_per_row"].value
    assert "**dataset 0, row 0**" in metadata["samples"].value and "«number 0" in (
        metadata["samples"].value)


def test_a_bad_row_fails_naming_file_row_and_field(recipe: Path):
    recipe.write_text(recipe.read_text().replace("skip_invalid_rows: true\n", ""))
    result = CliRunner().invoke(main, ["preprocess", str(recipe), "--stats-json", "x.json"])
    assert result.exit_code == 1
    assert "data.jsonl, row 7 (counting from 0): field 'output' is missing" in result.output
    assert not Path("x.json").exists()
