"""`fast-steer interp dashboard`: the static site of a real run (tiny Llama, random SAE, scripted judge), its
files and escaping, and the site itself in Debian's Chromium from file:// with the network cut off."""

from __future__ import annotations

import io
import json
import re
import shutil

import pytest
from click.testing import CliRunner

from apps.cli import main
from tests.apps.interp.run_factory import FEATURES, JUDGE, finished_run
from train.interp.collection import Collection

INDEX_PREFIX, INDEX_SUFFIX = "window.FS_INDEX = ", ";\n"


@pytest.fixture(scope="module")
def built(chatml_tokenizer, tmp_path_factory):
    """(SAE folder, run folder, site folder, interp.json) of a dashboard written by the CLI."""
    root = tmp_path_factory.mktemp("dashboard")
    sae, run = finished_run(root, chatml_tokenizer)
    site = root / "site"
    result = CliRunner().invoke(
        main, ["interp", "dashboard", str(sae), "--from", str(run), "--out", str(site)]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {site / 'index.html'}" in result.output
    return sae, run, site, json.loads((run / "interp.json").read_text())


def _rows(site) -> list[list]:
    text = (site / "index-data.js").read_text(encoding="utf-8")
    assert text.startswith(INDEX_PREFIX) and text.endswith(INDEX_SUFFIX)
    return json.loads(text[len(INDEX_PREFIX) : -len(INDEX_SUFFIX)])["rows"]


def _live(run, interp) -> list[int]:
    key = interp["settings"]["collection"]["folder"]
    return Collection.open(run / "collections" / key).live_features().tolist()


def test_index_rows_and_one_card_per_feature_that_fired(built):
    _, run, site, interp = built
    rows = _rows(site)
    live = _live(run, interp)
    assert [r[0] for r in rows] == live and len(live) > FEATURES
    assert sorted(p.stem for p in (site / "features").glob("*.html")) == sorted(map(str, live))
    scored = {f["feature"]: f for f in interp["features"]}
    assert len(scored) == FEATURES
    for feature, label, rubric, detection, density, special in rows:
        assert 0 < density <= 1 and 0 <= special <= 1
        if feature in scored:
            assert label == scored[feature]["name"] and rubric == 4
            assert detection == pytest.approx(scored[feature]["detection"]["balanced_accuracy"], abs=1e-3)
        else:
            assert (label, rubric, detection) == ("", None, None)


def test_every_resource_is_inside_the_site_and_text_is_escaped(built):
    sae, _, site, interp = built
    for path in site.rglob("*"):
        if path.suffix in (".html", ".js", ".css"):
            text = path.read_text(encoding="utf-8")
            assert not re.search(r"https?:|url\(|@import|(?:src|href)=[\"']//", text), f"{path} names a URL"
            for ref in re.findall(r'(?:src|href)="([^"]+)"', text):
                assert (path.parent / ref).resolve().is_file(), f"{path} links to {ref}, not in the site"
    feature = interp["features"][0]
    card = (site / "features" / f"{feature['feature']}.html").read_text(encoding="utf-8")
    label = feature["name"]
    assert "&" in label and '"' in label
    assert (
        label.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;") in card
    )
    assert "<|im_start|>" not in card and "&lt;|im_start|&gt;" in card
    assert JUDGE in card and "id='histogram'" not in card and 'id="histogram"' in card
    spec = json.loads(_pre(card, "spec"))
    (intervention,) = spec["interventions"]
    assert (
        intervention["sae"] == str(sae.resolve())
        and intervention["edits"][0]["feature"] == feature["feature"]
    )
    steering = json.loads(_pre(card, "steering"))["steering"]
    assert steering["sae"] == sae.name and steering["layer"] == intervention["layer"]


def _pre(card: str, id_: str) -> str:
    import html

    return html.unescape(re.search(rf"<pre class='snippet' id='{id_}'>(.*?)</pre>", card, re.DOTALL).group(1))


def test_subset_rebuild_and_bad_input(built, tmp_path):
    sae, run, site, interp = built
    chosen = [f["feature"] for f in interp["features"]][:2]

    def dashboard(*extra):
        return CliRunner().invoke(
            main, ["interp", "dashboard", str(sae), "--from", str(run), *map(str, extra)]
        )

    out = tmp_path / "subset"
    result = dashboard("--out", out, "--features", ",".join(map(str, chosen)))
    assert result.exit_code == 0, result.output
    assert sorted(r[0] for r in _rows(out)) == sorted(chosen)
    assert dashboard("--out", out, "--features", str(chosen[0])).exit_code == 0  # an earlier site is replaced
    assert [r[0] for r in _rows(out)] == [chosen[0]]
    result = dashboard("--out", tmp_path / "x", "--features", "999")
    assert result.exit_code == 1 and "out of range" in result.output
    silent = sorted(set(range(48)) - set(_live(run, interp)))
    if silent:
        result = dashboard("--out", tmp_path / "x", "--features", str(silent[0]))
        assert result.exit_code == 1 and "never fire" in result.output
    result = dashboard("--out", tmp_path / "x", "--features", "3-1")
    assert result.exit_code == 1 and "runs backwards" in result.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = dashboard("--out", tmp_path / "mine")
    assert result.exit_code == 1 and "not a fast-steer dashboard" in result.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    result = dashboard("--out", tmp_path / "y", "--from", tmp_path / "nothing")
    assert result.exit_code == 1 and "no interp.json" in result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# -- in the browser ---------------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
]


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (make test installs Debian's chromium)")
    with playwright_api.sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def tab(browser):
    """A page whose every non-file request is aborted and recorded (none may be attempted)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, offline=True)
    attempted: list[str] = []

    def route(r):
        if r.request.url.startswith("file://"):
            r.continue_()
        else:
            attempted.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert attempted == [], f"the site tried the network: {attempted}"
    assert errors == [], f"script errors: {errors}"


@pytest.mark.browser
def test_index_lists_searches_and_sorts(built, tab, tmp_path):
    _, _, site, interp = built
    rows = _rows(site)
    tab.goto((site / "index.html").as_uri())
    tab.wait_for_selector("#features tbody tr")
    assert tab.locator("#features tbody tr").count() == len(rows)
    assert tab.locator("#count").inner_text() == f"{len(rows)} of {len(rows)} features"
    # search: a word of one label only
    target = interp["features"][0]
    word = target["name"].split()[1]
    expected = {r[0] for r in rows if word.lower() in f"{r[0]} {r[1]}".lower()}
    tab.fill("#search", word)
    shown = {int(t) for t in tab.locator("#features tbody tr td:first-child").all_inner_texts()}
    assert target["feature"] in shown and shown == expected and len(shown) < len(rows)
    tab.fill("#search", "no feature is called this")
    assert tab.locator("#features tbody tr").count() == 0
    tab.fill("#search", "")
    # sort by density, largest first
    tab.click("th[data-col='4']")
    firsts = [int(t) for t in tab.locator("#features tbody tr td:first-child").all_inner_texts()]
    by_density = [r[0] for r in sorted(rows, key=lambda r: (-r[4], r[0]))]
    assert firsts == by_density
    _check_screenshot(tab.screenshot(full_page=False), tmp_path / "index.png")


@pytest.mark.browser
def test_card_shows_highlighted_contexts_histogram_and_links(built, tab, tmp_path):
    _, _, site, interp = built
    feature = interp["features"][0]["feature"]
    tab.goto((site / "index.html").as_uri())
    tab.click(f"#features tbody a[href='features/{feature}.html']")
    tab.wait_for_selector("#top .ctx")
    assert tab.locator("h1").inner_text() == f"Feature {feature}"
    assert (
        tab.locator("#label").inner_text() == interp["features"][0]["name"]
    )  # unescaped once, as the judge wrote it
    lit = tab.locator("#top .t[style*='--a']")
    assert lit.count() >= 1
    colour = lit.first.evaluate("e => getComputedStyle(e).backgroundColor")
    assert colour.startswith("rgba(255, 120, 0")  # the demo's token-view colour
    assert tab.locator("#top .t.s").count() > 0  # special tokens marked
    assert tab.locator("#top .t.pk").count() == tab.locator("#top .ctx").count()
    assert tab.locator("#histogram rect.bar").count() == 20
    assert tab.locator("#logit-lens .tokchip").count() > 0
    neighbour = tab.locator("#neighbours a").first
    target = neighbour.get_attribute("href")
    _check_screenshot(tab.screenshot(full_page=False), tmp_path / "card.png")
    neighbour.click()
    tab.wait_for_selector("#top")
    assert tab.url.endswith(f"/features/{target}")


def _check_screenshot(png: bytes, path) -> None:
    """Saved, and not blank: many distinct colours and a real spread of brightness."""
    from PIL import Image, ImageStat

    path.write_bytes(png)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size[0] > 1000
    assert len(image.getcolors(maxcolors=1 << 20) or []) > 50
    assert max(ImageStat.Stat(image.convert("L")).stddev) > 10


def test_cards_link_to_neuronpedia_where_the_sae_has_an_id(built):
    """A card links to the feature's Neuronpedia page when the SAE's metadata has a Neuronpedia id (a registered
    release); the site built from an SAE without one links nowhere (no 'neuronpedia' anywhere)."""
    from apps.interp.dashboard.cards import CardConfig, feature_cards
    from apps.interp.dashboard.render import card_body
    from apps.interp.results import RunResults

    sae, run, site, _ = built
    assert not any("neuronpedia" in p.read_text(encoding="utf-8").lower() for p in site.rglob("*.html"))
    results = RunResults.open(sae, run)
    results.sae.cfg.metadata["neuronpedia_id"] = "tiny-it/2-res-test"
    features = results.select(None)[:3]
    cards = list(feature_cards(results, features, CardConfig()))
    assert [c.feature for c in cards] == features
    for card in cards:
        body = card_body(card, JUDGE, "sae", set(features), CardConfig())
        assert f"<a href='https://www.neuronpedia.org/tiny-it/2-res-test/{card.feature}'" in body
