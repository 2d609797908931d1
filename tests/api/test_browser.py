"""The real page in headless Chromium (Debian's package, driven by Playwright) against the real server,
a real PostgreSQL and a small collection of real Fashion-MNIST images embedded by efficientnet_lite0."""
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from backend.pipeline.datasets import load_dataset, select_balanced
from tests.helpers import ROOT, running_server, write_fashion_mnist

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("browser"), pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                                   "(./setup.sh install installs it)")]


def _fashion_mnist_server(env: dict, folder: Path):
    """`python -m backend serve` on a collection of 60 Fashion-MNIST images; yields (base URL, data dir, env)."""
    data_dir = REAL_FASHION_MNIST if (REAL_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists() else folder / "fm"
    if data_dir != REAL_FASHION_MNIST:
        write_fashion_mnist(data_dir, n_per_class=6)
    populate = subprocess.run([sys.executable, "-m", "backend", "populate", "--dataset", "fashion-mnist",
                               "--num-images", "60", "--data-dir", str(data_dir)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert populate.returncode == 0, populate.stderr
    # Writes open on localhost: the history panel shows what was searched, which is guarded as writes are.
    with running_server({**env, "OPEN_WRITES": "true"}, folder / "server.log", timeout=120) as (base, _):
        yield base, data_dir, env


@pytest.fixture(scope="module")
def server(new_cli_env, tmp_path_factory):
    """The Fashion-MNIST server the module's tests share (a populate and a start-up take half a minute): they search
    its default collection and leave it as it was; yields (base URL, data dir, env)."""
    yield from _fashion_mnist_server(new_cli_env(), tmp_path_factory.mktemp("server"))


@pytest.fixture
def own_server(cli_env, tmp_path):
    """A Fashion-MNIST server of the test's own, for a test that counts what the server recorded."""
    yield from _fashion_mnist_server(cli_env, tmp_path)


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        yield page
        browser.close()


def _query_png(data_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    item = select_balanced(load_dataset("fashion-mnist", "test", data_dir), 10)[1]  # a held-out test image
    path = tmp_path / "query.png"
    path.write_bytes(item.read())
    return path, item.category


def _drop(page, path: Path) -> None:
    """A real drop event on the drop zone, carrying the file in a DataTransfer."""
    data = list(path.read_bytes())
    handle = page.evaluate_handle("""(bytes) => {
        const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(bytes)], 'query.png', {type: 'image/png'}));
        return dt;
    }""", data)
    page.dispatch_event("#drop-zone", "dragenter", {"dataTransfer": handle})
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": handle})


def test_drop_search_click_result_and_errors(server, page, tmp_path, output_dir):
    base, data_dir, _ = server
    query, category = _query_png(data_dir, tmp_path)
    page.goto(base + "/")  # a browser at the root lands on the page
    assert page.url.endswith("/app/")
    page.wait_for_selector("#status:has-text('60 images indexed')")
    _drop(page, query)
    assert page.get_attribute("#preview", "alt").startswith("Query image")
    page.wait_for_selector("#results li")
    cards = page.locator("#results li")
    assert cards.count() == 10
    first = cards.first.inner_text()
    assert "#1" in first and any(ch.isdigit() for ch in first.split("#1")[1])
    assert page.locator("#chosen-categories li").count() == 3
    assert page.locator("#summary").inner_text().startswith("Similar images: 10 results")
    assert page.locator("#no-match").is_hidden()  # a garment among garments: a close match
    page.screenshot(path=str(output_dir / "results.png"), full_page=True)

    from skimage import data as photos  # a real photo of a cat, dropped on a collection of clothes

    cat = tmp_path / "cat.png"
    PILImage.fromarray(photos.chelsea()).save(cat)
    _drop(page, cat)
    page.wait_for_selector("#no-match:not([hidden])")
    assert "No close match in this collection" in page.locator("#no-match").inner_text()
    assert page.locator("#results li").count() == 10  # still shown, under the warning
    page.screenshot(path=str(output_dir / "no-close-match.png"), full_page=True)
    _drop(page, query)
    page.wait_for_selector("#no-match", state="hidden")

    clicked_id = page.locator("#results li button.card").nth(1).get_attribute("data-image-id")
    page.locator("#results li button.card").nth(1).click()
    page.wait_for_selector(f"#summary:has-text('Images like #{clicked_id}')")
    assert clicked_id not in [b.get_attribute("data-image-id") for b in page.locator("#results li button.card").all()]

    (tmp_path / "notes.txt").write_text("this is not an image")
    page.set_input_files("#file-input", str(tmp_path / "notes.txt"))
    page.wait_for_selector("#error:not([hidden])")
    assert "not an image" in page.locator("#error").inner_text()

    page.set_input_files("#file-input", str(query))  # the file picker
    page.wait_for_selector("#error[hidden]", state="attached")
    page.wait_for_selector("#summary:has-text('Similar images')")
    page.click("#prototypes-button")
    page.wait_for_selector("#summary:has-text('Closest categories')")
    assert page.locator("#chosen-categories li").count() == 3


def test_docs_and_redoc_list_the_operations_with_no_network(server, page):
    base = server[0]
    outside = []

    def only_imsrc(route):  # as on a machine without internet: anything not from imsrc itself fails
        if route.request.url.startswith(base):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort("internetdisconnected")

    page.route("**/*", only_imsrc)
    page.goto(base + "/docs")
    page.wait_for_selector(".opblock-summary-path[data-path='/search']", timeout=30_000)
    assert page.locator(".opblock").count() > 20 and outside == []
    page.goto(base + "/redoc")
    page.wait_for_selector("text=Find the stored images most similar to the uploaded one", timeout=30_000)
    assert page.locator("[data-section-id^='tag/']").count() >= 5
    assert all(url.endswith("/logo-mini.svg") for url in outside), outside  # only ReDoc's "by Redocly" badge


def test_a_page_that_may_not_read_the_history_says_why_and_still_shows_analytics(server):
    from playwright.sync_api import sync_playwright

    base = server[0]
    port = base.rsplit(":", 1)[1]
    with sync_playwright() as p:
        # The page under another name than localhost: open writes (and so the history) are refused to it for real.
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--host-resolver-rules=MAP imsrc.test 127.0.0.1"])
        page = browser.new_page()
        asked = []
        page.on("request", lambda request: asked.append(request.url))
        page.goto(f"http://imsrc.test:{port}/app/")
        page.wait_for_selector("#history-note:has-text('Analytics only: reading the history needs write access')")
        assert "taken only on localhost" in page.inner_text("#history-note")
        page.click("#load-history")
        page.wait_for_selector("#latency:has-text('searches in 30 days'), #latency:has-text('No searches yet')")
        assert not any("/history" in url for url in asked) and any("/analytics" in url for url in asked)
        assert page.locator("#history li").count() == 0 and page.locator("#error").is_hidden()
        browser.close()


def test_the_shipped_samples_and_the_readmes_curl_find_their_kind(server):
    import re

    import httpx

    base, data_dir, _ = server
    used = re.findall(r"-F file=@(\S+)", (ROOT / "README.md").read_text())
    assert used and all((ROOT / path).is_file() for path in used)
    for name, kind in {"sneaker": "Sneaker", "bag": "Bag", "trouser": "Trouser", "dress": "Dress", "cat": None}.items():
        path = next((ROOT / "samples").glob(f"{name}.*"))
        answer = httpx.post(base + "/search?limit=5", files={"file": (path.name, path.read_bytes())}, timeout=60)
        assert answer.status_code == 200 and len(answer.json()["results"]) == 5, answer.text
        if kind and data_dir == REAL_FASHION_MNIST:  # test images of the real set: their kind is among the top 5
            assert kind in {hit["category"] for hit in answer.json()["results"]}, (name, answer.json()["results"])


def test_page_works_at_phone_width_and_by_keyboard(server, page, output_dir):
    base, _, _ = server
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(base + "/app/")
    page.wait_for_selector("#categories button")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "drop-zone"
    page.locator("#categories button").first.click()
    page.wait_for_selector("#browse li img")
    assert all(img.get_attribute("alt") for img in page.locator("img:visible").all())
    page.screenshot(path=str(output_dir / "phone.png"), full_page=True)


def test_more_results_continue_the_ranking_and_the_slider_drops_low_scores(server, page, tmp_path, output_dir):
    base, data_dir, _ = server
    query, _ = _query_png(data_dir, tmp_path)
    page.goto(base + "/app/")
    page.wait_for_selector("#status:has-text('60 images indexed')")
    page.fill("#limit", "5")
    _drop(page, query)
    page.wait_for_selector("#results li")
    assert page.locator("#results li").count() == 5 and page.is_visible("#more-button")
    page.click("#more-button")
    page.wait_for_function("document.querySelectorAll('#results li').length === 10")
    ranks = [text.split()[0] for text in page.locator("#results .caption").all_inner_texts()]
    assert ranks == [f"#{n}" for n in range(1, 11)]  # the second page continues the first
    assert page.locator("#summary").inner_text().startswith("Similar images: 10 results")
    scores = [float(s) for s in page.locator("#results .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    floor = int(scores[2] * 100) / 100  # the slider's step: at least the first three stay
    page.evaluate("""(v) => { const s = document.getElementById('min-score'); s.value = v;
        s.dispatchEvent(new Event('input')); s.dispatchEvent(new Event('change')); }""", str(floor))
    assert page.locator("#min-score-value").inner_text() == f"{floor:.2f}"
    page.wait_for_function("(f) => [...document.querySelectorAll('#results .score')].every("
                           "(s) => Number(s.textContent) >= f) && document.querySelectorAll('#results li').length > 0",
                           arg=floor)
    kept = [float(s) for s in page.locator("#results .score").all_inner_texts()]
    above = sum(s >= floor for s in scores)  # of the first 10, as ranked before
    assert len(kept) == min(above, 5) and all(s >= floor for s in kept)
    assert page.is_visible("#more-button") == (above > 5)  # no "more" once the scores fall under the floor
    page.screenshot(path=str(output_dir / "paging.png"), full_page=True)


@pytest.fixture(scope="module")
def server_with_metadata(new_cli_env, tmp_path_factory):
    """The server on 60 Fashion-MNIST images loaded from a CSV that gives each a `shade` (dark or light: its mean
    pixel below or above the median) and `n` (0-59); yields (base URL, {file name: (category, shade, n)}, photos
    folder)."""
    from statistics import median

    cli_env, tmp_path = new_cli_env(), tmp_path_factory.mktemp("server_with_metadata")
    data_dir = REAL_FASHION_MNIST if (REAL_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists() else tmp_path / "fm"
    if data_dir != REAL_FASHION_MNIST:
        write_fashion_mnist(data_dir, n_per_class=6)
    folder = tmp_path / "csv"
    folder.mkdir()
    items = select_balanced(load_dataset("fashion-mnist", "train", data_dir), 60)
    brightness = {}
    for item in items:
        (folder / item.original_name).write_bytes(item.read())
        brightness[item.original_name] = float(np.asarray(PILImage.open(folder / item.original_name)).mean())
    middle = median(brightness.values())
    known = {item.original_name: (item.category, "dark" if brightness[item.original_name] < middle else "light", n)
             for n, item in enumerate(items)}
    (folder / "images.csv").write_text("file,category,shade,n\n" + "".join(
        f"{name},{cat},{shade},{n}\n" for name, (cat, shade, n) in known.items()))
    populate = subprocess.run([sys.executable, "-m", "backend", "populate", "--dataset", "csv", "--data-dir",
                               str(folder / "images.csv")], cwd=ROOT, env=cli_env, capture_output=True, text=True,
                              timeout=300)
    assert populate.returncode == 0, populate.stderr
    with running_server(cli_env, tmp_path / "server.log", timeout=120) as (base, _):
        yield base, known, folder


def _shown(page) -> list[str]:
    """The file names of the results shown, in order (from the images' alt text)."""
    return [alt.rsplit("(", 1)[1].rstrip(")") for alt in
            (img.get_attribute("alt") for img in page.locator("#results li img").all())]


def _wait_summary(page, text: str) -> None:
    page.wait_for_selector(f"#summary:has-text('{text}')")
    page.wait_for_function("!document.body.classList.contains('busy')")


def test_filters_several_examples_not_like_this_and_export(server_with_metadata, page, tmp_path, output_dir):
    import csv

    base, known, folder = server_with_metadata
    page.goto(base + "/app/")
    page.wait_for_selector("#status:has-text('60 images indexed')")
    page.wait_for_selector("#filters:not([hidden]) select[data-key='shade']")
    page.fill("#limit", "20")
    page.uncheck("#use-prototypes")  # every category: 20 results whatever the filter leaves
    first = next(iter(known))
    _drop(page, folder / first)
    _wait_summary(page, "Similar images: 20 results")
    page.select_option("select[data-key='shade']", "dark")
    page.wait_for_function("document.querySelectorAll('#results li').length === 20 && "
                           "!document.body.classList.contains('busy')")
    _wait_summary(page, "Similar images")
    assert {known[name][1] for name in _shown(page)} == {"dark"}
    page.fill("input[data-key='n'][data-op='gte']", "10")
    page.fill("input[data-key='n'][data-op='lte']", "19")
    page.locator("input[data-key='n'][data-op='lte']").blur()  # a number is taken when the field is left
    page.wait_for_function("document.querySelectorAll('#results li').length < 20")
    _wait_summary(page, "Similar images")
    names = _shown(page)
    assert names and all(known[n][1] == "dark" and 10 <= known[n][2] <= 19 for n in names)
    page.screenshot(path=str(output_dir / "filters.png"), full_page=True)

    page.select_option("select[data-key='shade']", "")
    page.fill("input[data-key='n'][data-op='gte']", "")
    page.fill("input[data-key='n'][data-op='lte']", "")
    page.locator("input[data-key='n'][data-op='lte']").blur()
    _wait_summary(page, "Similar images: 20 results")
    picks = [page.locator("#results li button.card").nth(i).get_attribute("data-image-id") for i in (1, 2)]
    assert page.locator("#results li .pick").count() == 20  # every result can be selected
    for i in (1, 2):
        page.locator("#results li .pick").nth(i).check()
    assert page.locator("#with-these-button").inner_text() == "Search with these (2)"
    page.click("#with-these-button")
    _wait_summary(page, f"Images like #{picks[0]}, #{picks[1]}")
    shown_ids = [b.get_attribute("data-image-id") for b in page.locator("#results li button.card").all()]
    assert len(shown_ids) == 20 and not set(picks) & set(shown_ids)
    unwanted = shown_ids[0]
    page.locator("#results li .unlike").first.click()
    _wait_summary(page, f"not like #{unwanted}")
    assert unwanted not in [b.get_attribute("data-image-id") for b in page.locator("#results li button.card").all()]
    page.screenshot(path=str(output_dir / "examples.png"), full_page=True)

    shown = [b.get_attribute("data-image-id") for b in page.locator("#results li button.card").all()]
    page.select_option("#export-format", "csv")
    with page.expect_download() as download:
        page.click("#export-button")
    rows = list(csv.DictReader(open(download.value.path(), newline="")))
    assert [r["image_id"] for r in rows] == shown and json_ok(rows[0]["metadata"])


def json_ok(text: str) -> bool:
    import json

    meta = json.loads(text)
    return set(meta) == {"shade", "n"}


def test_a_region_dragged_on_the_preview_searches_that_region(server_with_metadata, page, tmp_path, output_dir):
    """Four stored images side by side in one picture: dragging over the top-right one finds it first."""
    base, known, folder = server_with_metadata
    by_category = {}
    for name, (category, _, _) in known.items():
        by_category.setdefault(category, name)
    four = list(by_category.items())[:4]
    picture = PILImage.new("L", (56, 56))
    for n, (_, name) in enumerate(four):
        picture.paste(PILImage.open(folder / name), ((n % 2) * 28, (n // 2) * 28))
    path = tmp_path / "four.png"
    picture.save(path)
    page.goto(base + "/app/")
    page.wait_for_selector("#status:has-text('60 images indexed')")
    _drop(page, path)
    _wait_summary(page, "Similar images")
    box = page.locator("#preview").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.5 + 1, box["y"] + 1)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.75, box["y"] + box["height"] * 0.25, steps=5)
    page.mouse.move(box["x"] + box["width"] - 1, box["y"] + box["height"] * 0.5 - 1, steps=5)
    page.mouse.up()
    _wait_summary(page, "Similar to the region")
    assert page.is_visible("#region") and page.is_visible("#region-note")
    top_right_category, top_right_name = four[1]
    assert _shown(page)[0] == top_right_name
    page.screenshot(path=str(output_dir / "region.png"), full_page=True)
    page.click("#clear-region")
    _wait_summary(page, "Similar images")
    assert page.is_hidden("#region")


def test_duplicate_review_is_kept(cli_env, page, tmp_path, output_dir):
    """Two copies of a photo among distinct ones: the page shows them side by side; "Not duplicates" is stored, and
    the group does not come back, even after a reload."""
    from skimage import data as photos

    folder = tmp_path / "photos" / "all"
    folder.mkdir(parents=True)
    coffee = PILImage.fromarray(photos.coffee())
    coffee.save(folder / "coffee.png")
    coffee.resize((480, 320)).save(folder / "coffee-copy.jpg", quality=95)
    PILImage.fromarray(photos.rocket()).save(folder / "rocket.png")
    PILImage.fromarray(photos.astronaut()).save(folder / "astronaut.png")
    populate = subprocess.run([sys.executable, "-m", "backend", "populate", "--dataset", "folder", "--data-dir",
                               str(tmp_path / "photos")], cwd=ROOT, env=cli_env, capture_output=True, text=True,
                              timeout=300)
    assert populate.returncode == 0, populate.stderr
    with running_server({**cli_env, "OPEN_WRITES": "true"}, tmp_path / "server.log", timeout=120) as (base, _):
        page.goto(base + "/app/")
        page.wait_for_selector("#status:has-text('4 images indexed')")
        page.click("#find-duplicates")
        page.wait_for_selector("#duplicate-groups .group")
        assert page.locator("#duplicate-groups .group").count() == 1
        alts = [img.get_attribute("alt") for img in page.locator("#duplicate-groups img").all()]
        assert len(alts) == 2 and all("coffee" in alt for alt in alts)
        page.locator("#duplicates-heading").scroll_into_view_if_needed()
        page.screenshot(path=str(output_dir / "duplicates.png"), full_page=True)
        page.click("#duplicate-groups button[data-decision='not_duplicates']")
        page.wait_for_selector("#duplicates-summary:has-text('No near-duplicates left')")
        page.reload()
        page.click("#find-duplicates")
        page.wait_for_selector("#duplicates-summary:has-text('No near-duplicates left')")
        assert page.locator("#duplicate-groups .group").count() == 0


def test_history_lists_searches_runs_one_again_and_charts_them(own_server, page, tmp_path, output_dir):
    base, data_dir, _ = own_server
    query, _ = _query_png(data_dir, tmp_path)
    page.goto(base + "/app/")
    page.wait_for_selector("#status:has-text('60 images indexed')")
    _drop(page, query)
    _wait_summary(page, "Similar images: 10 results")
    first = [b.get_attribute("data-image-id") for b in page.locator("#results li button.card").all()]
    page.locator("#results li button.card").nth(0).click()
    _wait_summary(page, "Images like")
    page.click("#load-history")
    page.wait_for_selector("#history li")
    assert page.locator("#history li").count() == 2 and "2 searches recorded" in page.inner_text("#history-summary")
    assert page.locator("#history li img").count() == 1  # the uploaded query's thumbnail
    assert page.locator("#chart rect").count() == 1 and "2 searches in 30 days" in page.inner_text("#latency")
    assert page.locator("#top-images li").count() > 0
    page.locator("#history-heading").scroll_into_view_if_needed()
    page.screenshot(path=str(output_dir / "history.png"), full_page=True)
    page.locator("#history li").nth(1).locator("button").click()  # the older one: the upload
    _wait_summary(page, "again: 10 results")
    assert [b.get_attribute("data-image-id") for b in page.locator("#results li button.card").all()] == first


def test_collection_switcher_searches_the_chosen_collection(server, page, tmp_path, output_dir):
    """A second collection, made and filled through the API while the server runs: the switcher shows it, and the
    page's status, categories, searches and images are then that collection's; switching back restores the first."""
    import io

    import httpx
    from skimage import data as photos

    base, data_dir, cli_env = server
    made = httpx.post(base + "/collections", json={"name": "photos", "model": "efficientnet_lite0",
                                                   "description": "scikit-image's photos"})
    assert made.status_code == 201, made.text
    for name, category in (("coffee", "drinks"), ("chelsea", "animals"), ("astronaut", "people"), ("rocket", "things")):
        buffer = io.BytesIO()
        PILImage.fromarray(getattr(photos, name)()).convert("RGB").save(buffer, format="PNG")
        up = httpx.post(base + "/upload?collection=photos", files={"file": (f"{name}.png", buffer.getvalue())},
                        data={"category": category}, timeout=60)
        assert up.status_code == 200, up.text
    page.goto(base + "/app/")
    page.wait_for_selector("#collection-switcher:not([hidden])")
    assert page.locator("#collection option").all_inner_texts() == ["default (efficientnet_lite0)",
                                                                     "photos (efficientnet_lite0)"]
    page.wait_for_selector("#status:has-text('60 images indexed')")
    page.select_option("#collection", "photos")
    page.wait_for_selector("#status:has-text('photos: 4 images indexed')")
    page.wait_for_selector("#categories button:has-text('animals (1)')")
    assert "collection=photos" in page.url
    cat = tmp_path / "cat.png"
    PILImage.fromarray(photos.chelsea()).save(cat)
    _drop(page, cat)
    page.wait_for_selector("#results li")
    # The photos collection's images only: one per category of the 3 (of its 4) stage 1 chose.
    assert page.locator("#results li").count() == 3
    assert all("collection=photos" in img.get_attribute("src") for img in page.locator("#results li img").all())
    page.wait_for_function("() => document.querySelector('#results li img').naturalWidth > 0")  # the bytes load
    assert "animals" in page.locator("#results li").first.inner_text()  # the cat itself, first
    page.screenshot(path=str(output_dir / "collections.png"), full_page=True)
    page.reload()  # the choice is kept in the address
    page.wait_for_selector("#status:has-text('photos: 4 images indexed')")
    # A re-embed with another model while the server serves: the page shows its progress, then the switch.
    done = subprocess.run([sys.executable, "-m", "backend", "--collection", "photos", "reembed", "--model",
                           "efficientnet_lite2"], cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    page.reload()
    page.wait_for_selector("#status:has-text('efficientnet_lite2: 4 of 4 vectors (ready to switch to)')")
    switched = httpx.post(base + "/collections/photos/model", json={"model": "efficientnet_lite2"})
    assert switched.status_code == 200 and switched.json()["previous"] == "efficientnet_lite0"
    for _ in range(100):  # the server opens the collection with the new model, then swaps it in
        if httpx.get(base + "/status?collection=photos").json()["model"] == "efficientnet_lite2":
            break
        time.sleep(0.2)
    page.reload()
    page.wait_for_selector("#status:has-text('model efficientnet_lite2 · efficientnet_lite0: 4 of 4 vectors')")
    _drop(page, cat)
    page.wait_for_selector("#results li")
    assert "animals" in page.locator("#results li").first.inner_text()  # the new model finds the cat too
    page.screenshot(path=str(output_dir / "reembed.png"))
    page.select_option("#collection", "default")
    page.wait_for_selector("#status:has-text('default: 60 images indexed')")
    assert "efficientnet_lite2" not in page.locator("#status").inner_text()  # the default collection kept its model
    # The same query runs again in the collection switched to: its results, not the other collection's.
    page.wait_for_function("() => { const imgs = [...document.querySelectorAll('#results li img')];"
                           " return imgs.length === 10 && imgs.every((i) => i.src.includes('collection=default')); }")
    page.wait_for_selector("#categories button:has-text('Sneaker')")
    # The operator's view: index size and memory per collection this server has loaded.
    page.goto(base + "/metrics")
    metrics = page.locator("body").inner_text()
    assert 'imsrc_index_vectors{collection="photos",index_type="flatip",model="efficientnet_lite2"} 4.0' in metrics
    assert 'imsrc_index_bytes{collection="default"}' in metrics
    assert 'model="efficientnet_lite0"} 4.0' not in metrics  # the model photos was switched away from
    page.evaluate("() => window.find('imsrc_index_vectors{collection')")  # scrolls to (and marks) the series
    page.screenshot(path=str(output_dir / "metrics.png"))
