"""The service's pages in a real browser (Playwright + Debian's chromium) against a live
server: the submit page submits a job through the API and the job's page shows it; a refused
submission shows the server's one-line error on the field; another project's job page is a
404. Skipped without chromium unless AUTOCOMPRESS_REQUIRE_SERVICES=1 (then it fails)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from service_http import LiveService, live_service

CHROMIUM = os.environ.get("AUTOCOMPRESS_CHROMIUM", "/usr/bin/chromium")
REQUIRED = os.environ.get("AUTOCOMPRESS_REQUIRE_SERVICES") == "1"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]


def _require_browser() -> Any:
    if not Path(CHROMIUM).exists():
        message = f"chromium not found at {CHROMIUM} (apt-get install chromium)"
        if REQUIRED:
            pytest.fail(message + "; required because AUTOCOMPRESS_REQUIRE_SERVICES=1")
        pytest.skip(message)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if REQUIRED:
            pytest.fail("playwright is not installed (pip install playwright)")
        pytest.skip("playwright is not installed")
    return sync_playwright


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_playwright = _require_browser()
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def svc(tmp_path: Path) -> Iterator[LiveService]:
    with live_service(f"sqlite:///{tmp_path / 'service.db'}", tmp_path) as service:
        yield service


@pytest.fixture()
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    pg.js_errors = errors
    yield pg
    context.close()


def test_submit_page_submits_a_job_and_its_page_shows_it(svc: LiveService, page: Any) -> None:
    page.goto(f"{svc.url}/jobs/new?token={svc.tokens['alpha']}")
    assert page.url == f"{svc.url}/jobs/new"  # the token left the address bar for a cookie
    assert page.locator("#project").inner_text() == "alpha"
    page.fill("#trials", "2")
    page.fill("#finetune_steps", "10")
    page.fill("#budgets", "200kB")
    page.click("#submit-button")
    page.wait_for_url(re.compile(r".*/jobs/[0-9a-f]{12}$"))
    job_id = page.url.rsplit("/", 1)[1]
    assert page.locator("#job-id").inner_text() == job_id
    assert page.locator("#job-state").inner_text() == "queued"
    job = svc.store.job("alpha", job_id)
    assert job is not None and job.spec["trials"] == 2 and job.spec["budgets"] == ["200kB"]
    # the page cancels through the API (a cookie-authenticated POST from its own origin)
    page.click("#cancel-button")
    page.wait_for_function("() => document.getElementById('job-state').textContent "
                           "=== 'cancelled'")
    assert svc.store.job("alpha", job_id).state == "cancelled"
    page.goto(f"{svc.url}/jobs")
    assert page.locator(f"tr[data-job='{job_id}']").count() == 1
    assert page.js_errors == []


def test_refused_submission_shows_the_error_on_its_field(svc: LiveService, page: Any) -> None:
    page.goto(f"{svc.url}/jobs/new?token={svc.tokens['alpha']}")
    page.fill("#budgets", "fast")
    page.click("#submit-button")
    error = page.locator("#submit-error")
    error.wait_for(state="visible")
    assert "budget 'fast'" in error.inner_text() and "budgets" in error.inner_text()
    assert "invalid" in (page.get_attribute("#budgets", "class") or "")
    assert svc.store.jobs("alpha") == []
    # JS errors: only the refused request's 400, which the browser logs itself
    assert all("400" in e for e in page.js_errors), page.js_errors


def test_another_projects_job_page_is_not_found(svc: LiveService, page: Any) -> None:
    job = svc.submit("alpha")
    page.goto(f"{svc.url}/jobs?token={svc.tokens['beta']}")
    assert page.locator("#no-jobs").count() == 1
    response = page.goto(f"{svc.url}/jobs/{job['id']}")
    assert response.status == 404
    assert f"no job {job['id']}" in page.locator("#error-message").inner_text()
