"""The web app in a real browser (issue 22): headless Chromium, driven by Playwright, against the
app on the bundled shapes models, served on a free loopback port. Screenshots of failures (and
the README's) go to test-artifacts/web/.

Without Chromium these tests skip, saying so; where VQCLIP_REQUIRE_BROWSER=1 (CI sets it) they
fail instead."""

import io
import json
import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import urljoin

import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the web extra is not installed")
playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")

from conftest import free_port  # noqa: E402

from vqclip.generator import Generator  # noqa: E402
from vqclip.shapes.world import Scene, ShapeObject, render  # noqa: E402
from vqclip.web import Jobs, launch  # noqa: E402

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts" / "web"
CHROMIUM = os.environ.get("VQCLIP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    if os.environ.get("VQCLIP_REQUIRE_BROWSER") == "1":
        raise RuntimeError("VQCLIP_REQUIRE_BROWSER=1 but no chromium on the PATH "
                           "(Debian: apt-get install chromium)")
    pytest.skip("no Chromium found (apt-get install chromium, or set VQCLIP_CHROMIUM)",
                allow_module_level=True)

pytestmark = pytest.mark.xdist_group("browser")  # under pytest -n: one app, one browser

SEARCHED = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle"),
            ("purple", "square"), ("orange", "triangle")]
FAST = {"steps": "30", "cutn": "8"}  # a few seconds a run at the preset's 64 x 64


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app on the shapes preset; its outputs hold one earlier run, its search folder clean
    renders of six shapes."""
    base = tmp_path_factory.mktemp("web")
    gen = Generator.load(preset="shapes")
    gen.generate("an earlier purple triangle", seed=11, steps=4, cutn=8, candidates=1,
                 output=str(base / "out" / "earlier" / "final.png"))
    shapes = base / "shapes"
    shapes.mkdir()
    for colour, shape in SEARCHED:
        render(Scene("gray", (ShapeObject(colour, shape, "large", "centre"),))).save(
            shapes / f"{colour}-{shape}.png")
    demo, url = launch(Jobs(gen, base / "out", [shapes]), port=free_port(), block=False)
    yield {"url": url, "out": base / "out", "shapes": shapes, "metrics": {}}
    demo.close()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app, request):
    """A new tab on the app; every request it makes is recorded, and a failure's screenshot kept."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.requests = []
    page.on("request", lambda r: page.requests.append(r.url))
    started = time.perf_counter()
    page.goto(app["url"])
    page.wait_for_selector("#gen-go")
    app["metrics"].setdefault("page_load_s", round(time.perf_counter() - started, 2))
    yield page
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=ARTIFACTS / f"failed-{request.node.name}.png", full_page=True)
    context.close()


def fill(page, fields: dict[str, str], prefix: str = "gen") -> None:
    for name, value in fields.items():
        name = name.replace("_", "-")
        page.fill(f"#{prefix}-{name} input, #{prefix}-{name} textarea", value)


def status(page, prefix: str = "gen") -> str:
    return page.input_value(f"#{prefix}-status textarea")


def live_sources(page, until, timeout: float = 120) -> list[str]:
    """The live image's successive sources, until ``until(status)`` holds."""
    seen, deadline = [], time.monotonic() + timeout
    while not until(status(page)):
        assert time.monotonic() < deadline, f"timed out; status: {status(page)!r}"
        img = page.query_selector("#gen-live img")
        src = img.get_attribute("src") if img else None
        if src and (not seen or seen[-1] != src):
            seen.append(src)
        time.sleep(0.05)
    return seen


DRAWN_HEIGHT = """i => {
    const box = i.getBoundingClientRect(), fit = getComputedStyle(i).objectFit;
    let k = Math.min(box.width / i.naturalWidth, box.height / i.naturalHeight);
    if (fit === "none") k = 1;
    if (fit === "scale-down") k = Math.min(k, 1);
    return [fit === "fill" ? box.height : k * i.naturalHeight, i.naturalHeight];
}"""


def table(page, elem_id: str) -> list[list[str]]:
    rows = page.locator(f"#{elem_id} [role=row].virtual-row")
    return [[c.strip() for c in rows.nth(i).locator("[role=gridcell]").all_inner_texts()]
            for i in range(rows.count())]


def test_generate_shows_the_image_live_then_four_ranked_candidates(page, app):
    prompt = "a red circle <script>window.pwned = 1</script>"
    fill(page, {"prompt": prompt, "candidates": "4", "seed": "3", **FAST})
    clicked = time.perf_counter()
    page.click("#gen-go")
    page.wait_for_selector("#gen-live img")
    app["metrics"]["first_live_image_s"] = round(time.perf_counter() - clicked, 2)
    sources = live_sources(page, lambda s: s.startswith("done"))
    assert len(sources) >= 3, sources  # the live image changed at least twice before the end
    # made at 64 px, drawn filling its frame: the height the picture is drawn at, in its box
    drawn, natural = page.locator("#gen-live img").evaluate(DRAWN_HEIGHT)
    assert drawn >= 4 * natural, (drawn, natural)
    rows = table(page, "gen-ranking")
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
    assert sorted(int(r[2]) for r in rows) == [3, 4, 5, 6]  # candidate k's seed is 3 + k
    # the prompt is shown as text, never run as HTML
    assert page.evaluate("window.pwned") is None
    assert prompt in page.locator("#gen-settings").inner_text()
    records = sorted(app["out"].glob("*-a-red-circle-script-*/final-*.yaml"))
    assert len(records) == 4
    # downloads: the PNG the page offers keeps its settings
    link = page.locator("#gen-files a[href*='final-0.png']").first.get_attribute("href")
    download = Image.open(io.BytesIO(page.request.get(urljoin(app["url"], link)).body()))
    assert download.format == "PNG" and download.text["prompt"] == prompt
    assert all(u.startswith(app["url"]) or u.startswith(("data:", "blob:")) for u in page.requests), \
        [u for u in page.requests if not u.startswith(app["url"])]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / "generate.png", full_page=True,  # the README's: docs/web-app.png
                    clip={"x": 0, "y": 0, "width": 1280, "height": 1820})
    (ARTIFACTS / "metrics.json").write_text(json.dumps(app["metrics"], indent=2))


def running_step(text: str) -> bool:
    return text.startswith("step ") and int(text.split()[1].split("/")[0]) >= 3


def test_stop_keeps_the_image_made_so_far_and_a_second_tab_waits_its_turn(page, browser, app):
    fill(page, {"prompt": "a blue square to stop", "candidates": "1", "steps": "2000", "cutn": "8"})
    page.click("#gen-go")
    sources = live_sources(page, running_step)
    other = browser.new_page()  # another user: one run at a time, the page shows the queue
    other.goto(app["url"])
    fill(other, {"prompt": "a white circle that waits", "candidates": "1", "steps": "2000",
                 "cutn": "8"})
    other.click("#gen-go")
    other.wait_for_function("document.body.innerText.includes('queue: 1/1')")
    page.click("#gen-stop")
    live_sources(page, lambda s: s.startswith("stopped"), timeout=60)
    steps = int(re.search(r"stopped after (\d+) steps", status(page))[1])
    assert 3 <= steps < 2000 and sources
    folder = next(app["out"].glob("*-a-blue-square-to-stop"))
    assert (folder / "final.png").is_file() and "interrupted: true" in (folder / "final.yaml").read_text()
    live_sources(other, running_step)  # its turn came; Stop in that tab ends that run only
    other.click("#gen-stop")
    live_sources(other, lambda s: s.startswith("stopped"), timeout=60)
    other.close()
    fill(page, {"steps": str(steps + 3)})
    page.click("#gen-more")  # Go on: the stopped run, in its folder, to the steps asked now
    live_sources(page, lambda s: s.startswith("done"), timeout=60)
    record = (folder / "final.yaml").read_text()
    assert f"steps_done: {steps + 3}" in record and "interrupted: false" in record


def test_an_earlier_run_in_the_gallery_loads_its_settings(page, app):
    page.click("button[role=tab]:has-text('Gallery')")
    page.click("#gallery-refresh")
    item = page.locator("#gallery button:has(img)").last  # the oldest: the earlier run
    item.wait_for()
    item.click()
    page.wait_for_function("document.querySelector('#gallery-settings').innerText.includes('earlier')")
    page.click("#gallery-load")
    page.wait_for_function(
        "document.querySelector('#gen-prompt textarea').value === 'an earlier purple triangle'")
    assert page.input_value("#gen-seed input") == "11"
    assert page.input_value("#gen-steps input") == "4"
    fill(page, {"steps": "6"})
    page.click("#gen-more")  # Go on: the run loaded from the gallery
    live_sources(page, lambda s: s.startswith("done"), timeout=60)
    assert "steps_done: 6" in (app["out"] / "earlier" / "final.yaml").read_text()


def test_search_puts_the_right_image_first_and_classify_reads_an_upload(page, app):
    page.click("button[role=tab]:has-text('Search')")
    fill(page, {"query": "a blue square"}, "search")
    page.click("#search-go")
    page.wait_for_selector("#search-table [role=row].virtual-row")
    rows = table(page, "search-table")
    assert rows[0][1] == "blue-square.png", rows
    page.set_input_files("#classify-image input[type=file]", app["shapes"] / "green-triangle.png")
    fill(page, {"labels": "a red circle, a green triangle, a blue square"}, "classify")
    page.click("#classify-go")
    top = page.locator("#classify-result [data-testid=label-output-value]")
    top.wait_for()
    assert top.inner_text().strip() == "a green triangle"


def test_an_animation_shows_its_frames_as_they_come_and_the_video(page, app):
    page.click("button[role=tab]:has-text('Animate')")
    fill(page, {"prompt": "a yellow circle ^ a yellow square", "frames": "3", "first_steps": "8",
                "steps_per_frame": "4", "seed": "2"}, "anim")
    page.click("#anim-go")
    counts = set()
    deadline = time.monotonic() + 120
    while not status(page, "anim").startswith("done"):
        assert time.monotonic() < deadline, status(page, "anim")
        counts.add(page.locator("#anim-frames img").count())
        time.sleep(0.05)
    page.wait_for_function("document.querySelectorAll('#anim-frames img').length === 3")
    assert counts & {1, 2}, counts  # frames came one by one, before the end
    page.wait_for_selector("#anim-video video")
