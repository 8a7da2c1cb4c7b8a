"""Flower as configured by flowerconfig.py, with a real worker and real jobs, seen through headless Chromium.

Screenshots go to a temporary directory; with UPDATE_DOC_SCREENSHOTS=1 they also replace
docs/images/flower-workers.png and docs/images/flower-tasks.png.
"""

import base64
import json
import os
import shutil
import time
import urllib.error
from pathlib import Path

import kronos_cases as kc
import pytest
from celery import Celery
from flower_process import Flower
from redis_server import RedisServer
from worker_process import REPO_ROOT, WorkerProcess, worker_env

from schemas import ForecastRequest
from tasks.producer import submit

USER, PASSWORD = "ops", "s3cret-pw"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
DOC_IMAGES = REPO_ROOT / "docs" / "images"
SERIES = ("BTCUSDT-5m", "ETHUSDT-5m", "SOLUSDT-5m")


@pytest.fixture(scope="module")
def server():
    with RedisServer() as redis_server:
        yield redis_server


@pytest.fixture(scope="module")
def env(server, tmp_path_factory):
    return worker_env(
        dict(os.environ),
        KRONOS_BROKER_URL=server.url(0),
        KRONOS_RESULT_BACKEND=server.url(1),
        KRONOS_METRICS_PORT="0",
        KRONOS_FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}",
        KRONOS_FLOWER_DB=str(tmp_path_factory.mktemp("flower") / "flower.db"),
        KRONOS_FLOWER_STATE_SAVE_INTERVAL="1",
        PYTHONPATH=str(REPO_ROOT),
    )


class KronosFlower(Flower):
    def tasks(self) -> dict:
        return json.loads(self.get("/api/tasks"))


@pytest.fixture(scope="module")
def flower(env):
    running = KronosFlower(env, (USER, PASSWORD)).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def jobs(env, flower):
    """Three finished jobs, run while Flower watched (it sees only the events sent while it runs)."""
    with WorkerProcess(env) as worker:
        until = time.monotonic() + 30
        # from the worker's events: Flower as the monitor (the default role) inspects nothing
        while not json.loads(flower.get("/workers?json=1"))["data"]:
            assert time.monotonic() < until, "Flower never saw the worker"
            time.sleep(0.5)
        producer = Celery("kronos-producer")
        producer.config_from_object("celeryconfig")
        producer.conf.update(broker_url=env["KRONOS_BROKER_URL"], result_backend=env["KRONOS_RESULT_BACKEND"])
        frame = kc.candles()
        handles = [
            submit(ForecastRequest.from_frame(frame.iloc[100 * i : 100 * i + 64], pred_len=12, series_id=series),
                   celery_app=producer)
            for i, series in enumerate(SERIES)
        ]  # fmt: skip
        for handle in handles:
            handle.get(timeout=60)
        producer.close()
        until = time.monotonic() + 30
        while not all(flower.tasks().get(h.id, {}).get("state") == "SUCCESS" for h in handles):
            assert time.monotonic() < until, f"Flower did not see every job succeed: {flower.tasks()}"
            time.sleep(0.5)
        yield {"worker": worker.name.replace("%h", os.uname().nodename), "ids": [h.id for h in handles]}


def test_flower_refuses_pages_without_credentials_but_serves_metrics(flower, jobs):
    for path in ("/workers", "/tasks", "/api/tasks"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            flower.get(path, auth=False)
        assert refused.value.code == 401, path
    metrics = flower.get("/metrics", auth=False).decode()  # left open for Prometheus
    assert 'flower_events_total{task="kronos.forecast",type="task-succeeded"' in metrics


def test_flower_pages_show_jobs_without_their_candles(flower, jobs):
    # the data behind the tasks page, as its script asks for it (format_task applies to pages, not /api)
    query = "draw=1&start=0&length=50&search[value]=&order[0][column]=0&order[0][dir]=desc&columns[0][data]=received"
    rows = {row["uuid"]: row for row in json.loads(flower.get(f"/tasks/datatable?{query}"))["data"]}
    for job_id, series in zip(jobs["ids"], SERIES, strict=True):
        shown = rows[job_id]
        assert shown["args"] == f"{series} · kronos-small · 12 steps"
        assert shown["state"] == "SUCCESS" and shown["worker"] == jobs["worker"]
    # the task page shows the shortened result too
    page = flower.get(f"/task/{jobs['ids'][0]}").decode()
    assert f"{SERIES[0]} · {kc.PARITY / 'predictor'}@None" in page
    assert "'forecast'" not in page and "'candles'" not in page


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_flower_pages_in_headless_chromium(flower, jobs, tmp_path):
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
        "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1920,800",
    ):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
        wait = WebDriverWait(driver, 30)

        driver.get(flower.url("/workers"))
        wait.until(lambda d: jobs["worker"] in d.find_element(By.ID, "workers-table").text)
        workers_png = screenshot(driver, tmp_path / "flower-workers.png")

        driver.get(flower.url("/tasks"))
        wait.until(lambda d: all(job_id in d.find_element(By.TAG_NAME, "body").text for job_id in jobs["ids"]))
        page = driver.find_element(By.TAG_NAME, "body").text
        assert all(f"{series} · kronos-small · 12 steps" in page for series in SERIES)
        assert page.count("SUCCESS") >= len(SERIES)
        assert "candles" not in page and "'open'" not in page
        tasks_png = screenshot(driver, tmp_path / "flower-tasks.png")
    finally:
        driver.quit()

    for png in (workers_png, tasks_png):
        with Image.open(png) as image:
            assert image.size[0] >= 1000
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is not None and len(colours) > 50, f"{png.name} looks blank"
    if os.environ.get("UPDATE_DOC_SCREENSHOTS") == "1":
        DOC_IMAGES.mkdir(parents=True, exist_ok=True)
        for png in (workers_png, tasks_png):
            shutil.copyfile(png, DOC_IMAGES / png.name)


def screenshot(driver, path: Path) -> Path:
    time.sleep(1)  # let tables finish drawing
    assert driver.save_screenshot(str(path))
    return path


def test_flower_state_survives_a_restart(env, flower, jobs):
    """Runs last: it stops the module's Flower."""
    flower.stop()  # SIGTERM: Flower saves its state on the way out
    restarted = KronosFlower(env, (USER, PASSWORD)).start()
    try:
        tasks = restarted.tasks()
        assert all(tasks[job_id]["state"] == "SUCCESS" for job_id in jobs["ids"])
    finally:
        restarted.stop()
