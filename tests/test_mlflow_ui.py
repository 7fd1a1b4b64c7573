"""The MLflow UI, in a real headless Chromium: lowlabel's experiment on its training runs, the
pipeline run listed with its stage run nested under it, the stage run's page naming its parent;
then the whole scenario on a real (tiny) pipeline: two ``dvc exp run``s, their parent runs with
the stage runs nested under each, the compare view of the two showing the report's margins, and
the registered model page showing the ``best-fewshot`` alias.

MLflow 3.17's UI picks GenAI or training pages by its sidebar switch (remembered in the
browser's localStorage ``mlflow.workflowType``, GenAI until switched) or the URL's
``?workflowType=machine_learning``, which wins; in that UI the experiment tag
``mlflow.experimentKind`` does not change the landing page (measured here: a fresh browser on
``/#/experiments/<id>`` lands on the GenAI overview, tag or not).

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package; skipped,
saying which is missing, without them. Screenshots go to each test's tmp dir; the pipeline test
also keeps them in ``$LOWLABEL_TEST_ARTIFACTS/mlflow-ui-pipeline/`` (default: the git-ignored
``.lowlabel/test-artifacts/`` of this checkout).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import FASHION_DIR, REPO
from dvc_project import dvc_project, ran_stages
from test_dvc_pipeline import TINY, merge

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if not CHROMIUM:
        return "chromium is not installed (apt-get install chromium)"
    if not CHROMEDRIVER:
        return "chromedriver is not installed (apt-get install chromium-driver)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ui_store(tmp_path, monkeypatch):
    """A sqlite store with a pipeline run and one nested stage run, as a `dvc repro` leaves them."""
    from lowlabel.config import flatten, parse_params
    from lowlabel.tracking import TAG_STAGE, stage_run, start_pipeline_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    parent = start_pipeline_run(tracking_uri=uri, artifact_root=str(tmp_path / "mlartifacts"), experiment="lowlabel",
                                params=flatten(parse_params({})), root=tmp_path, invocation="1@1.0")
    with stage_run(tracking_uri=uri, artifact_root=str(tmp_path / "mlartifacts"), experiment="lowlabel", run_name="pretrain@simclr",
                   tags={TAG_STAGE: "pretrain"}, params={"pretrain.epochs": 2}, root=tmp_path, parent_run_id=parent) as child:
        import mlflow

        mlflow.log_metric("knn_acc", 0.8)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return uri, client.get_experiment_by_name("lowlabel").experiment_id, client.get_run(parent).info.run_name, child.info.run_id


@contextlib.contextmanager
def served(uri: str, artifact_root: Path, log_path: Path) -> Iterator[str]:
    """``mlflow server`` on ``uri`` at a free 127.0.0.1 port, in its own process group (stopped
    by it, children included); yields its base URL once /health answers."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--default-artifact-root",
                                 str(artifact_root), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {log_path.read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


@pytest.fixture()
def mlflow_server(ui_store, tmp_path):
    with served(ui_store[0], tmp_path / "mlartifacts", tmp_path / "server.log") as url:
        yield url


@pytest.fixture()
def browser():
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_text(driver, texts: list[str], timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    body = ""
    while time.monotonic() < deadline:
        body = driver.find_element("tag name", "body").text
        if all(text in body for text in texts):
            return body
        time.sleep(0.5)
    raise AssertionError(f"{texts} not all shown within {timeout_s} s; the page shows:\n{body[:3000]}")


def test_experiment_opens_on_the_pipeline_run_with_its_stage_nested(browser, mlflow_server, ui_store, tmp_path):
    _, experiment_id, parent_name, child_id = ui_store
    try:
        browser.get(f"{mlflow_server}/#/experiments/{experiment_id}?workflowType=machine_learning")
        body = wait_for_text(browser, [parent_name])
        # The GenAI overview lists no runs: the run name on the landing page is the training view.
        assert "pretrain@simclr" not in body  # nested: collapsed under its parent until expanded
        browser.get(f"{mlflow_server}/#/experiments/{experiment_id}/runs/{child_id}")
        wait_for_text(browser, ["pretrain@simclr", parent_name])  # the child's page names its parent
    finally:
        browser.save_screenshot(str(tmp_path / "mlflow-ui.png"))


# test_dvc_pipeline's tiny config (kept current for every stage), smaller still: one pretrain
# and one semisup method (the params' defaults start from them), one Ray worker, fewer images.
# The first exp run runs every stage (~2.5 min on 2 cores, 3 Ray jobs); the second changes only
# fewshot.episodes, so it re-runs source, fewshot and report (~25 s), and its margins differ.
SMALLER = {
    "data": {"max_train_per_class": 30, "max_test_per_class": 20},
    "encoder": {"width": 8},
    "runtime": {"workers": 1},
    "pretrain": {"methods": ["simclr"]},
    "semisup": {"methods": ["fixmatch"]},
}
EXPS = {"ui-episodes-20": 20, "ui-episodes-30": 30}  # DVC experiment name -> fewshot.episodes, in run order


def artifacts_dir(name: str) -> Path:
    """Where a test keeps files past pytest's tmp dirs: ``$LOWLABEL_TEST_ARTIFACTS/<name>``, else
    ``.lowlabel/test-artifacts/<name>`` in this checkout (git-ignored)."""
    out = Path(os.environ.get("LOWLABEL_TEST_ARTIFACTS") or REPO / ".lowlabel" / "test-artifacts") / name
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture()
def pipeline_project(tmp_path, tmp_path_factory) -> Path:
    """A temp git + DVC project after two ``dvc exp run -S fewshot.episodes=...`` (EXPS)."""
    reason = _missing() or (None if FASHION_DIR.is_dir() else "needs Debian's dataset-fashion-mnist (./pipeline setup installs it)")
    if reason:
        pytest.skip(reason)  # before two minutes of pipeline
    params = merge(merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY), SMALLER)
    root = tmp_path / "project"
    sh = dvc_project(root, params, extra_env={"LOWLABEL_RAY_TMP": str(tmp_path_factory.mktemp("ray"))})  # short: Ray's socket paths
    ran = [ran_stages(sh("dvc", "exp", "run", "-n", name, "-S", f"fewshot.episodes={episodes}")) for name, episodes in EXPS.items()]
    assert ran[0][0] == "source" and {"prepare", "pretrain@simclr", "semisup@fixmatch", "fewshot"} < set(ran[0]) and ran[0][-1] == "report"
    assert ran[1] == ["source", "fewshot", "report"]
    return root


def until(driver, condition, what: str, timeout_s: float = 60.0):
    """``condition(driver)``'s first truthy value, polled; an AssertionError naming ``what`` and
    showing the page's text if none comes within ``timeout_s``."""
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        TimeoutException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.3,
                             ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(condition)
    except TimeoutException:
        body = driver.find_element("tag name", "body").text
        raise AssertionError(f"{what}: not within {timeout_s} s on {driver.current_url}; the page shows:\n{body[:3000]}") from None


def table_rows(driver) -> list[str]:
    """The run ids of the experiment page's runs table, top to bottom (AG Grid rows carry the
    run id as ``row-id``; a pinned column repeats a row, hence the set)."""
    pairs = driver.execute_script(
        "return [...document.querySelectorAll('[role=row][row-id]')].map(r => [Number(r.getAttribute('row-index')), r.getAttribute('row-id')]);")
    return [run_id for _, run_id in sorted({tuple(p) for p in pairs})]


def expand(driver, run_id: str) -> bool:
    """Click the expander in a parent run's Run Name cell (the +/- box left of the name)."""
    driver.find_element("xpath", f"//a[contains(@href, '/runs/{run_id}')]/ancestor::span[contains(@class, 'ag-cell-value')]//button").click()
    return True


# The compare view's Metrics section: two virtualized grids, metric names (one per row) and
# values (one cell per run, in the URL's run order), placed by their style's top/left. They are at
# most 300 px (6 rows) tall and render 10 rows past the visible ones: up to 16 metrics are read.
COMPARE_METRICS_JS = """
const header = [...document.querySelectorAll('[role=button][aria-expanded]')].find(e => e.textContent.trim() === 'Metrics');
const grids = header ? header.parentElement.querySelectorAll('[role=grid]') : [];
if (grids.length < 2) return null;
const cells = g => [...g.querySelectorAll('[role=rowgroup] > div')].map(c => [parseFloat(c.style.top), parseFloat(c.style.left), c.innerText.trim()]);
return [cells(grids[0]), cells(grids[1])];
"""


def compare_metrics(driver) -> dict[str, list[str]] | None:
    """Metric name -> the values the compare view shows for it, one per run, as text."""
    found = driver.execute_script(COMPARE_METRICS_JS)
    if not found or not found[0]:
        return None
    names, values = found
    shown: dict[str, list[str]] = {}
    for top, _, name in sorted(names):
        shown[name] = [text for _, _, text in sorted(v for v in values if v[0] == top)]
    return shown


def shows(text: str, value: float) -> bool:
    """Whether the UI's text is ``value`` as MLflow's Utils.formatMetric rounds it: 3 decimals
    below 10, 2 below 100, else 1; 4 significant digits in exponent notation below 1e-3."""
    try:
        number = float(text)
    except ValueError:
        return False
    if abs(value) < 1e-3:
        return math.isclose(number, value, rel_tol=1e-3, abs_tol=1e-12)
    step = 1e-3 if abs(value) < 10 else 1e-2 if abs(value) < 100 else 1e-1
    return abs(number - value) <= step / 2 + 1e-9


def test_pipeline_experiment_compare_view_and_registered_model(pipeline_project, browser, tmp_path):
    """Two `dvc exp run`s of the real pipeline, served by `mlflow server`, through Chromium: the
    README's experiment link lands on the training runs, the two parent runs named after their
    DVC experiments, each with its stage runs nested under it (hidden until expanded); the
    compare view of the two shows each report margin as logged; the registered model holding
    `best-fewshot` shows that alias on its version."""
    from mlflow.tracking import MlflowClient

    from lowlabel.tracking import BEST_ALIAS, TAG_PARENT, TAG_PIPELINE, TAG_STAGE

    uri = f"sqlite:///{pipeline_project / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("lowlabel").experiment_id
    runs = client.search_runs([experiment_id])
    parents = {r.info.run_name: r for r in runs if r.data.tags.get(TAG_PIPELINE) == "true"}
    assert sorted(parents) == sorted(EXPS)
    first, second = (parents[name].info.run_id for name in EXPS)
    children = {p: {r.info.run_id for r in runs if r.data.tags.get(TAG_PARENT) == p} for p in (first, second)}
    stages = {p: {r.data.tags[TAG_STAGE] for r in runs if r.info.run_id in children[p]} for p in children}
    assert {"prepare", "pretrain", "semisup", "fewshot", "report"} <= stages[first] and stages[second] == {"fewshot", "report"}
    names = {r.info.run_id: r.info.run_name for r in runs}
    (best,) = [m for m in client.search_registered_models() if BEST_ALIAS in m.aliases]

    keep = [tmp_path, artifacts_dir("mlflow-ui-pipeline")]

    def snap(name: str) -> None:
        for folder in keep:
            browser.save_screenshot(str(folder / f"{name}.png"))

    with served(uri, pipeline_project / "mlartifacts", tmp_path / "server.log") as url:
        # 1. The link the README gives: the training runs, newest first, stage runs collapsed.
        browser.get(f"{url}/#/experiments/{experiment_id}?workflowType=machine_learning")
        try:
            until(browser, lambda d: {first, second} <= set(table_rows(d)), "the two pipeline runs in the runs table")
            assert f"/experiments/{experiment_id}/runs" in browser.current_url  # not the GenAI overview
            assert table_rows(browser) == [second, first]
            body = browser.find_element("tag name", "body").text
            assert all(name in body for name in EXPS) and "pretrain@simclr" not in body
        finally:
            snap("1-experiment-runs")
        try:
            for parent in (first, second):  # the lower one first: expanding it moves nothing above
                until(browser, lambda d, p=parent: expand(d, p), f"the expander of {names[parent]}")
                until(browser, lambda d, p=parent: children[p] <= set(table_rows(d)), f"{names[parent]}'s stage runs after expanding it")
            rows = table_rows(browser)
            n2 = len(children[second])
            assert rows[0] == second and set(rows[1:1 + n2]) == children[second]
            assert rows[1 + n2] == first and set(rows[2 + n2:]) == children[first]
            body = browser.find_element("tag name", "body").text
            assert {names[run_id] for p in children for run_id in children[p]} <= set(body.splitlines())
        finally:
            snap("2-stage-runs-nested")

        # 2. The compare view of the two pipeline runs: the report's margins, each as logged.
        browser.get(f'{url}/#/compare-runs?runs=["{first}","{second}"]&experiments=["{experiment_id}"]')
        try:
            report = {key for run_id in (first, second) for key in client.get_run(run_id).data.metrics if key.startswith("report/")}
            assert report
            shown = until(browser, lambda d: (m := compare_metrics(d)) and report <= set(m) and m, "the report metrics in the compare view")
            assert f"{first} {second}" in browser.find_element("tag name", "body").text  # "Run ID:" row: columns in URL order
            for i, run_id in enumerate((first, second)):
                logged = client.get_run(run_id).data.metrics
                for key in sorted(report):
                    assert shows(shown[key][i], logged[key]), f"{key} of {names[run_id]}: the page shows {shown[key][i]!r}, MLflow has {logged[key]}"
            assert any(shown[key][0] != shown[key][1] for key in report)  # the episodes differ: so does a margin (the check sees the column order)
            browser.execute_script("[...document.querySelectorAll('[role=button][aria-expanded]')]"
                                   ".find(e => e.textContent.trim() === 'Metrics').scrollIntoView();")  # for the screenshot
        finally:
            snap("3-compare-runs")

        # 3. The registered model holding the alias: the alias on its version's row.
        browser.get(f"{url}/#/models/{best.name}")
        try:
            row = until(browser, lambda d: d.find_element("xpath", f"//*[@role='row'][.//*[@title='{BEST_ALIAS}']]"), f"{best.name}'s {BEST_ALIAS} alias")
            until(browser, lambda d: f"Version {best.aliases[BEST_ALIAS]}" in row.text, f"the version row holding {BEST_ALIAS}")
        finally:
            snap("4-registered-model")
