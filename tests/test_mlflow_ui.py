"""The MLflow UI, in a real headless Chromium: lowlabel's experiment on its training runs, the
pipeline run listed with its stage run nested under it, the stage run's page naming its parent.

MLflow 3.17's UI picks GenAI or training pages by its sidebar switch (remembered in the
browser's localStorage ``mlflow.workflowType``, GenAI until switched) or the URL's
``?workflowType=machine_learning``, which wins; in that UI the experiment tag
``mlflow.experimentKind`` does not change the landing page (measured here: a fresh browser on
``/#/experiments/<id>`` lands on the GenAI overview, tag or not).

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package; skipped,
saying which is missing, without them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

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


@pytest.fixture()
def mlflow_server(ui_store, tmp_path):
    uri = ui_store[0]
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--default-artifact-root",
                                 str(tmp_path / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
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
                    raise RuntimeError(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}") from None
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

