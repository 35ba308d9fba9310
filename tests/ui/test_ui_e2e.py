"""The Dagster UI as a user sees it: `tunegraph dev` (webserver + daemon), a materialization of the
quickstart launched through GraphQL, a backfill of its evals over every checkpoint that the daemon
runs, then the eval report; headless Chromium (Debian's `chromium`, driven by Playwright) on the
Automation page (the recipe's schedule and the sensors, as `tunegraph dev` starts them), the asset
graph, the backfill, the report and the training asset's checks, asserting the pages show the
schedule and sensors, the recipe's assets, the checkpoint partitions, the report's rows and the
passed check.

    TUNEGRAPH_UPDATE_SCREENSHOTS=1 bash scripts/test.sh tests/ui   # refresh docs/img/*.png
"""

import os
import shutil
from pathlib import Path

import pytest
from dagster_server import (
    IN_PROCESS,
    automations,
    dev_server,
    graphql,
    launch_assets,
    launch_backfill,
    stop_schedule,
    stop_sensor,
    wait_for_backfill,
    wait_for_run,
    write_tiny_quickstart,
)

from tests_support import REPO
from tunegraph.pipelines.checkpoint_sensor import SENSOR_NAME

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags from this workplace's notes: no sandbox as root, and no background networking, which
# the closed network here refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOCATION = "tunegraph.pipelines.definitions"
CHECKPOINTS = ["quickstart__step-000010", "quickstart__final"]  # write_tiny_quickstart's
SCHEDULE = "0 2 * * *"
# tunegraph.pipelines: the recipe's schedule and data sensor, and the checkpoint sensor.
AUTOMATIONS = {"quickstart_schedule": "RUNNING", "quickstart_data_sensor": "STOPPED",
               SENSOR_NAME: "RUNNING"}
TRAINING_CHECK = "loss_finite_and_decreasing"  # tunegraph.assets.checks, on quickstart/adapter

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason="needs Debian's chromium (apt-get install chromium)")]


def _shoot(page, url: str, wait_text: str, path: Path) -> str:
    page.goto(url)
    page.wait_for_selector(f"text={wait_text}", timeout=90_000)
    page.wait_for_timeout(2_000)  # let the graph layout settle before the picture
    page.screenshot(path=str(path))
    return page.inner_text("body")


def _dismiss_newsletter(page, port: int) -> None:
    """Dagster's first visit opens a newsletter box over the page; its Skip button closes it.
    Skipping is kept in the instance (the UI's own query says whether the box will open), so a
    later browser needs no waiting for a box that will not come."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    if not graphql(port, "{ shouldShowNux }")["shouldShowNux"]:
        return
    skip = page.get_by_role("button", name="Skip").first
    try:
        skip.wait_for(timeout=20_000)
    except PlaywrightTimeout:
        return  # not shown (a later Dagster may drop it): nothing covers the page
    skip.click()


def _new_page(playwright, port: int):
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(f"http://127.0.0.1:{port}")
    _dismiss_newsletter(page, port)
    return browser, page


def _browse_automation(port: int, shots: Path) -> None:
    """The Automation page as `tunegraph dev` starts: the schedule and checkpoint_evals on, the
    data sensor off (nothing has ticked a run yet: no checkpoint, no data sensor cursor)."""
    from playwright.sync_api import sync_playwright

    base = f"http://127.0.0.1:{port}"
    with sync_playwright() as playwright:
        browser, page = _new_page(playwright, port)
        automation = _shoot(page, f"{base}/automation", "quickstart_schedule",
                            shots / "automation.png")
        for name in AUTOMATIONS:
            assert name in automation, automation
        browser.close()


def _browse(port: int, backfill_id: str, shots: Path) -> None:
    """The pages a user looks at after an eval backfill, each asserted and photographed."""
    from playwright.sync_api import sync_playwright

    base = f"http://127.0.0.1:{port}"
    with sync_playwright() as playwright:
        browser, page = _new_page(playwright, port)
        graph = _shoot(page, f"{base}/locations/{LOCATION}/asset-groups/quickstart",
                       "merged_model", shots / "asset-graph.png")
        for name in ("tokenized_dataset", "adapter", "merged_model", "eval_scores", "eval_report"):
            assert name in graph

        scores = _shoot(page, f"{base}/assets/quickstart/eval_scores?partition={CHECKPOINTS[-1]}",
                        "heldout_loss", shots / "eval-scores.png")
        assert "trained/heldout_loss" in scores and "base/heldout_loss" in scores

        # How a user starts the backfill: Materialize... on eval_scores, All partitions.
        page.goto(f"{base}/assets/quickstart/eval_scores")
        page.get_by_role("button", name="Materialize…").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Launch runs to materialize").wait_for(timeout=30_000)
        dialog.get_by_role("button", name="All", exact=True).click()
        dialog.get_by_text(f"{len(CHECKPOINTS)} partitions").wait_for(timeout=30_000)
        page.wait_for_timeout(1_000)
        page.screenshot(path=str(shots / "eval-backfill-launch.png"))
        assert dialog.get_by_role("button", name="Launch backfill").is_enabled()
        dialog.get_by_role("button", name="Cancel").click()

        backfill = _shoot(page, f"{base}/runs/b/{backfill_id}?tab=runs", CHECKPOINTS[0],
                          shots / "eval-backfill.png")
        assert backfill_id in backfill and "Succeeded" in backfill
        for partition in CHECKPOINTS:
            assert f"partition: {partition}" in backfill, backfill

        report = _shoot(page, f"{base}/assets/quickstart/eval_report", CHECKPOINTS[-1],
                        shots / "eval-report.png")
        # The markdown table rendered: one row per checkpoint after the base model (step 0).
        for cells in (("0", "base model"), ("10", CHECKPOINTS[0]), ("20", CHECKPOINTS[1])):
            assert "\t".join(cells) in report, report
        # The plot is markdown metadata too (a PNG data URI), behind its [Show Markdown] link.
        page.get_by_text("[Show Markdown]").first.click()
        plot = page.get_by_role("dialog").locator("img[src^='data:image/png']")
        plot.wait_for(timeout=30_000)
        page.wait_for_timeout(1_000)
        assert plot.bounding_box()["height"] > 200, plot.bounding_box()
        page.screenshot(path=str(shots / "eval-report-plot.png"))

        # The training run ran the adapter's blocking check; its Checks tab shows it passed.
        checks = _shoot(page, f"{base}/assets/quickstart/adapter?view=checks"
                              f"&checkDetail={TRAINING_CHECK}", "Passed",
                        shots / "asset-checks.png")
        assert TRAINING_CHECK in checks and "Passed" in checks, checks
        browser.close()


def _log(workdir: Path) -> str:
    return (workdir / "dev.log").read_text()[-3000:]


def test_ui_shows_the_quickstart_graph_backfill_and_report(tmp_path: Path):
    recipes = tmp_path / "recipes"
    write_tiny_quickstart(recipes, schedule=SCHEDULE)
    shots = tmp_path / "shots"
    shots.mkdir()
    with dev_server(tmp_path, recipes) as port:
        states = automations(port)
        assert {name: status for name, (_, status) in states.items()
                if name in AUTOMATIONS} == AUTOMATIONS, states
        _browse_automation(port, shots)
        # The sensor would request the same evals as the backfill: this test launches its own;
        # the schedule, ticking at 02:00 during a test, would request a retrain.
        stop_sensor(port, SENSOR_NAME)
        stop_schedule(port, "quickstart_schedule")
        nodes = graphql(port, "{ assetNodes { assetKey { path } isExecutable isPartitioned } }")
        # The unpartitioned stages in one run: training registers the checkpoint partitions.
        # Its eight steps run in the run's process (IN_PROCESS): a process per step would import
        # torch eight times. The backfill's runs below keep Dagster's default executor.
        keys = [n["assetKey"]["path"] for n in nodes["assetNodes"]
                if n["isExecutable"] and not n["isPartitioned"]
                and n["assetKey"]["path"][-1] != "eval_report"]
        run_id = launch_assets(port, keys, run_config=IN_PROCESS)
        assert wait_for_run(port, run_id) == "SUCCESS", _log(tmp_path)

        # What Materialize... on eval_scores with All partitions starts (_browse shows the
        # dialog): a backfill over every checkpoint, one run per partition, by the daemon.
        backfill_id = launch_backfill(port, [["quickstart", "eval_scores"]])
        backfill = wait_for_backfill(port, backfill_id)
        assert backfill["status"] == "COMPLETED_SUCCESS", (backfill, _log(tmp_path))
        assert sorted(backfill["partitionNames"]) == sorted(CHECKPOINTS)
        [counts] = backfill["assetBackfillData"]["assetBackfillStatuses"]
        assert counts["numPartitionsTargeted"] == counts["numPartitionsMaterialized"] == 2, counts
        assert counts["numPartitionsFailed"] == 0, counts
        partitions = sorted(next(t["value"] for t in run["tags"] if t["key"] == "dagster/partition")
                            for run in backfill["runs"])
        assert partitions == sorted(CHECKPOINTS)
        assert {run["status"] for run in backfill["runs"]} == {"SUCCESS"}

        report_run = launch_assets(port, [["quickstart", "eval_report"]], run_config=IN_PROCESS)
        assert wait_for_run(port, report_run) == "SUCCESS", _log(tmp_path)

        _browse(port, backfill_id, shots)

    for shot in shots.iterdir():
        assert shot.stat().st_size > 20_000, f"{shot.name} looks blank"
    if os.environ.get("TUNEGRAPH_UPDATE_SCREENSHOTS"):
        for shot in shots.iterdir():
            shutil.copy(shot, REPO / "docs" / "img" / shot.name)
