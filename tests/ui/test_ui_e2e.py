"""The Dagster UI as a user sees it: `tunegraph dev` (webserver + daemon), a materialization of the
quickstart launched through GraphQL, then headless Chromium (Debian's `chromium`, driven by
Playwright) on the asset graph and the eval scores, asserting the pages show the recipe's assets.

    TUNEGRAPH_UPDATE_SCREENSHOTS=1 bash scripts/test.sh tests/ui   # refresh docs/img/*.png
"""

import os
import shutil
from pathlib import Path

import pytest
import yaml
from dagster_server import dev_server, graphql, launch_assets, wait_for_run

from tests_support import EXAMPLES, REPO

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags from this workplace's notes: no sandbox as root, and no background networking, which
# the closed network here refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOCATION = "tunegraph.pipelines.definitions"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium (apt-get install chromium)")


def _tiny_quickstart(folder: Path) -> None:
    """The quickstart recipe and data in `folder`, at a size that trains in seconds."""
    (folder / "data").mkdir(parents=True)
    shutil.copy(EXAMPLES / "data" / "quickstart.jsonl", folder / "data")
    recipe = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    recipe.update(max_steps=20, save_steps=10, eval_generation_rows=8,
                  output_dir=str(folder / "outputs"))
    (folder / "quickstart.yaml").write_text(yaml.safe_dump(recipe))


def _shoot(page, url: str, wait_text: str, path: Path) -> str:
    page.goto(url)
    page.wait_for_selector(f"text={wait_text}", timeout=90_000)
    page.wait_for_timeout(2_000)  # let the graph layout settle before the picture
    page.screenshot(path=str(path))
    return page.inner_text("body")


def test_ui_shows_the_quickstart_graph_and_scores(tmp_path: Path):
    from playwright.sync_api import sync_playwright

    recipes = tmp_path / "recipes"
    _tiny_quickstart(recipes)
    shots = tmp_path / "shots"
    shots.mkdir()
    with dev_server(tmp_path, recipes) as port:
        nodes = graphql(port, "{ assetNodes { assetKey { path } isExecutable isPartitioned } }")
        # Unpartitioned stages in one run; then eval_scores for the final model's partition.
        keys = [n["assetKey"]["path"] for n in nodes["assetNodes"]
                if n["isExecutable"] and not n["isPartitioned"]
                and n["assetKey"]["path"][-1] != "eval_report"]
        for asset_paths, partition in ((keys, None),
                                       ([["quickstart", "eval_scores"]], "quickstart__final")):
            run_id = launch_assets(port, asset_paths, partition)
            assert wait_for_run(port, run_id) == "SUCCESS", \
                (tmp_path / "dev.log").read_text()[-3000:]

        base = f"http://127.0.0.1:{port}"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(base)
            skip = page.get_by_role("button", name="Skip")  # Dagster's first-visit newsletter box
            if skip.count():
                skip.click()
            graph = _shoot(page, f"{base}/locations/{LOCATION}/asset-groups/quickstart",
                           "merged_model", shots / "asset-graph.png")
            for name in ("tokenized_dataset", "adapter", "merged_model", "eval_scores"):
                assert name in graph
            scores = _shoot(page, f"{base}/assets/quickstart/eval_scores?partition=quickstart__final",
                            "heldout_loss", shots / "eval-scores.png")
            assert "trained/heldout_loss" in scores and "base/heldout_loss" in scores
            browser.close()

    for shot in shots.iterdir():
        assert shot.stat().st_size > 20_000, f"{shot.name} looks blank"
    if os.environ.get("TUNEGRAPH_UPDATE_SCREENSHOTS"):
        for shot in shots.iterdir():
            shutil.copy(shot, REPO / "docs" / "img" / shot.name)
