"""The dashboard in a real browser (Playwright + Debian's chromium) against a live server.

Skipped when chromium is missing (path: env AUTOCOMPRESS_CHROMIUM, default /usr/bin/chromium)
unless AUTOCOMPRESS_REQUIRE_SERVICES=1, where a missing browser is a failure.
Every expectation is read from the storage, so any study source in STUDY_SOURCES works.
Set AUTOCOMPRESS_SCREENSHOTS=1 (or to a folder) to save the three pages as PNGs.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from dashboard_fixtures import (
    DashboardStudy,
    add_trial_in_subprocess,
    artifact_bytes,
    expected_from_storage,
    weight_layers,
)

from autocompress.dashboard import make_server

CHROMIUM = os.environ.get("AUTOCOMPRESS_CHROMIUM", "/usr/bin/chromium")
REQUIRED = os.environ.get("AUTOCOMPRESS_REQUIRE_SERVICES") == "1"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "dashboard"

# JavaScript run in the page: trial markers drawn in a chart (every marker trace carries the
# trial numbers as customdata; the front line carries none).
_MARKERS_JS = """(id) => {
  const gd = document.getElementById(id);
  if (!gd || !gd.data) return -1;
  return gd.data.filter((t) => t.customdata && String(t.mode).includes("markers"))
    .reduce((n, t) => n + t.customdata.length, 0);
}"""
_POINT_XY_JS = """([id, number]) => {
  const gd = document.getElementById(id);
  const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
  const box = gd.getBoundingClientRect();
  for (const t of gd.data) {
    if (!t.customdata) continue;
    const i = t.customdata.indexOf(number);
    if (i < 0) continue;
    return { x: box.left + xa._offset + xa.l2p(xa.d2l(t.x[i])),
             y: box.top + ya._offset + ya.l2p(ya.d2l(t.y[i])) };
  }
  return null;
}"""


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


@pytest.fixture(scope="module")
def source(short_study: Any, tmp_path_factory: pytest.TempPathFactory) -> DashboardStudy:
    """A copy of the session's short real search, so the trial another process adds here
    does not change the study other tests read."""
    _require_browser()  # skip before spending time building a study
    folder = tmp_path_factory.mktemp("browser-real")
    db = folder / short_study.db_path.name
    shutil.copy(short_study.db_path, db)
    artifacts = folder / short_study.artifacts_dir.name
    shutil.copytree(short_study.artifacts_dir, artifacts)
    return DashboardStudy(f"sqlite:///{db}", short_study.study, artifacts)


@pytest.fixture(scope="module")
def base_url(source: DashboardStudy) -> Iterator[str]:
    server = make_server(source.storage_url, port=0, artifacts_dir=source.artifacts_dir)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def context(browser: Any) -> Iterator[Any]:
    # One context for the module: plotly.min.js (4.8 MB) is fetched once and then cached.
    ctx = browser.new_context(accept_downloads=True, viewport={"width": 1440, "height": 1000})
    yield ctx
    ctx.close()


@pytest.fixture()
def page(context: Any) -> Iterator[Any]:
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    pg.js_errors = errors
    yield pg
    pg.close()


def _wait_markers(page: Any, count: int | None = None, timeout: float = 20_000) -> None:
    """Wait until the Pareto chart is drawn (with ``count`` markers when given).

    A function expression, not a bare expression: the page's CSP forbids eval."""
    page.wait_for_function(
        f"(n) => {{ const c = ({_MARKERS_JS})('pareto'); return n === null ? c >= 0 : c === n; }}",
        arg=count,
        timeout=timeout,
    )


def _open_study(page: Any, base_url: str, source: DashboardStudy) -> None:
    page.goto(f"{base_url}/study/{source.study_name}")
    _wait_markers(page)


def test_study_page_draws_one_marker_per_completed_trial(
    page: Any, base_url: str, source: DashboardStudy
) -> None:
    expected = expected_from_storage(source)
    _open_study(page, base_url, source)
    assert page.evaluate(_MARKERS_JS, "pareto") == expected["n_complete"]
    assert page.locator("#trials-body tr").count() == expected["n_trials"]
    # The short search left its learning rate to the probe: the chip says what was chosen.
    chosen = optuna.load_study(study_name=source.study_name, storage=source.storage_url
                               ).user_attrs["learning_rate_probe"]["chosen"]
    chips = " ".join(page.locator("#study-chips").inner_text().split())
    assert f"learning rate {chosen:g} (probed)" in chips
    assert page.js_errors == []


def test_table_header_click_sorts(page: Any, base_url: str, source: DashboardStudy) -> None:
    _open_study(page, base_url, source)
    numbers = [
        int(n)
        for n in page.locator("#trials-body tr").evaluate_all(
            "rows => rows.map(r => r.dataset.number)"
        )
    ]
    assert numbers == sorted(numbers)
    page.click("#trials-head th[data-key=number]")  # same key again: descending
    desc = [
        int(n)
        for n in page.locator("#trials-body tr").evaluate_all(
            "rows => rows.map(r => r.dataset.number)"
        )
    ]
    assert desc == sorted(numbers, reverse=True)
    page.click("#trials-head th[data-key=size_bytes]")
    sizes = page.evaluate("""() => {
      const d = JSON.parse(document.getElementById('initial-data').textContent);
      const by = Object.fromEntries(d.trials.map(t => [t.number, t.size_bytes]));
      return [...document.querySelectorAll('#trials-body tr')].map(r => by[r.dataset.number]);
    }""")
    known = [s for s in sizes if s is not None]
    assert known == sorted(known) and sizes[: len(known)] == known  # missing sizes last


def test_clicking_a_front_point_opens_its_trial(
    page: Any, base_url: str, source: DashboardStudy
) -> None:
    _open_study(page, base_url, source)
    data = page.evaluate("() => JSON.parse(document.getElementById('initial-data').textContent)")
    front = data["front_2d"]
    assert front, "the study has no feasible front to click"
    plain = [
        n for n in front if not next(t for t in data["trials"] if t["number"] == n)["baseline"]
    ]
    number = (plain or front)[0]
    xy = page.evaluate(_POINT_XY_JS, ["pareto", number])
    assert xy is not None
    page.mouse.move(xy["x"], xy["y"])
    page.mouse.click(xy["x"], xy["y"])
    page.wait_for_url(f"**/study/{source.study_name}/trial/{number}")
    assert page.locator("h1").inner_text() == f"Trial {number}"


def test_plan_chart_has_one_bar_per_layer(page: Any, base_url: str, source: DashboardStudy) -> None:
    expected = expected_from_storage(source)
    number = expected["artifact_trial"]
    inventory = expected["inventory"]
    layers = weight_layers(inventory)
    page.goto(f"{base_url}/study/{source.study_name}/trial/{number}")
    page.wait_for_function("() => document.getElementById('plan').data !== undefined")
    bars = page.evaluate("""() => document.getElementById('plan').data
        .filter(t => t.type === 'bar').map(t => ({name: t.name, x: t.x, y: t.y}))""")
    assert {b["name"] for b in bars} >= {"weight bits", "structured prune ratio"}
    for trace in bars:
        assert trace["x"] == layers, trace["name"]  # one bar per layer, in model order
        assert len(trace["y"]) == len(layers)
    assert page.js_errors == []


def test_artifact_download_through_the_page_is_byte_identical(
    page: Any, base_url: str, source: DashboardStudy, tmp_path: Path
) -> None:
    expected = expected_from_storage(source)
    page.goto(f"{base_url}/study/{source.study_name}/trial/{expected['artifact_trial']}")
    with page.expect_download() as info:
        page.click("#download-artifact")
    saved = tmp_path / "downloaded.onnx"
    info.value.save_as(saved)
    assert saved.read_bytes() == artifact_bytes(source, expected["artifact_id"])


def test_token_link_sets_a_cookie_that_pages_and_polls_use(
    context: Any, source: DashboardStudy
) -> None:
    server = make_server(
        source.storage_url, port=0, artifacts_dir=source.artifacts_dir, token="tok-123"
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    page = context.new_page()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert page.goto(f"{base}/").status == 401
        page.goto(f"{base}/?token=tok-123")
        assert page.url == f"{base}/"  # the token left the address bar
        page.wait_for_selector("#studies-body tr")
        # A poll succeeded with the cookie alone: the live indicator shows a time.
        page.wait_for_function(
            "() => document.getElementById('live-text').textContent.startsWith('live ·')"
        )
    finally:
        page.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_screenshots(page: Any, base_url: str, source: DashboardStudy) -> None:
    target = os.environ.get("AUTOCOMPRESS_SCREENSHOTS")
    if not target:
        pytest.skip("set AUTOCOMPRESS_SCREENSHOTS=1 (or a folder) to save page screenshots")
    folder = SCREENSHOT_DIR if target == "1" else Path(target)
    folder.mkdir(parents=True, exist_ok=True)
    expected = expected_from_storage(source)
    page.goto(f"{base_url}/")
    page.wait_for_selector("#studies-body tr")
    page.screenshot(path=str(folder / "studies.png"), full_page=True)
    _open_study(page, base_url, source)
    page.wait_for_timeout(500)
    page.screenshot(path=str(folder / "study.png"), full_page=True)
    page.goto(f"{base_url}/study/{source.study_name}/trial/{expected['artifact_trial']}")
    page.wait_for_function("() => document.getElementById('plan').data !== undefined")
    page.wait_for_timeout(500)
    page.screenshot(path=str(folder / "trial.png"), full_page=True)
    assert all((folder / f"{n}.png").stat().st_size > 10_000 for n in ("studies", "study", "trial"))


def test_trial_added_by_another_process_appears_without_reload(
    page: Any, base_url: str, source: DashboardStudy
) -> None:
    """Runs last: it adds a trial to the module's study."""
    expected = expected_from_storage(source)
    _open_study(page, base_url, source)
    page.evaluate("() => { window.__sameDocument = true; }")
    assert page.evaluate(_MARKERS_JS, "pareto") == expected["n_complete"]
    number = add_trial_in_subprocess(source)
    _wait_markers(page, expected["n_complete"] + 1, timeout=15_000)
    page.wait_for_selector(f"#trials-body tr[data-number='{number}']")
    assert page.evaluate("() => window.__sameDocument === true")  # no reload happened
    assert page.js_errors == []
