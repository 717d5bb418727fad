"""Drive the demo page in Debian's Chromium with Playwright: pick a feature, set a strength, chat, and
round-trip the spec through export / import."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("gradio")
playwright_api = pytest.importorskip("playwright.sync_api")

from steer.spec import Intervention  # noqa: E402
from tests.apps.demo.helpers import GRADIO_WARNINGS, LAYER, serve, tiny_backend  # noqa: E402

pytestmark = [pytest.mark.browser, *GRADIO_WARNINGS]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def page(chatml_tokenizer, tmp_path_factory):
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (make test installs Debian's chromium)")
    backend = tiny_backend(chatml_tokenizer, tmp_path_factory.mktemp("browser") / "sae")
    app, url = serve(backend)
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        tab = browser.new_page(viewport={"width": 1500, "height": 1100})
        tab.set_default_timeout(TIMEOUT_MS)
        tab.goto(url)
        tab.wait_for_selector("#send")
        yield backend, tab
        browser.close()
    app.close()


def _cells(tab, selector: str) -> list[str]:
    return [t.strip() for t in tab.locator(f"{selector} [role=gridcell]").all_inner_texts()]


def _wait_for_reply(tab) -> tuple[str, str]:
    """Wait until the send event (and the token view that follows it) is done; both replies' texts (not the
    steered pane's note of the positions it edited)."""
    tab.wait_for_function(
        "document.querySelector('#token-view').innerText.includes('on the steered conversation')",
        timeout=TIMEOUT_MS,
    )
    plain = tab.locator("#plain-chat .message:not(.thought) [data-testid=bot]").all_inner_texts()
    steered = tab.locator("#steered-chat .message:not(.thought) [data-testid=bot]").all_inner_texts()
    return plain[-1].strip(), steered[-1].strip()


def test_pick_feature_steer_and_chat(page):
    backend, tab = page
    top = backend.default_sae.top_features
    # Pick the second row of the feature table: the feature id box follows it.
    tab.click("#feature-table [data-testid=cell-1-1]")
    tab.wait_for_function(
        f"document.querySelector('#feature-id input').value === '{top[1].feature}'", timeout=TIMEOUT_MS
    )
    # Its top contexts are shown.
    tab.wait_for_function(
        f"document.querySelector('#contexts').innerText.includes('Top contexts of feature {top[1].feature}')"
    )
    # The strongest strength the layer allows, at every position.
    limit = backend.max_strength(backend.default_sae)
    strength_box = tab.locator("#strength input[data-testid=number-input]")
    strength_box.fill(str(limit))
    strength_box.press("Enter")
    tab.click("#positions label:has-text('all')")
    tab.click("#add-edit")
    tab.wait_for_function("document.querySelectorAll('#edits [role=gridcell]').length === 4")
    assert _cells(tab, "#edits") == [str(top[1].feature), "add", f"{limit:g}", "all"]
    # Greedy, so the only difference between the panes is the intervention.
    temperature_box = tab.get_by_label("number input for temperature (0 = greedy)")
    temperature_box.fill("0")
    temperature_box.press("Enter")
    tab.fill("#message textarea", "Tell me about the sea.")
    tab.click("#send")
    plain, steered = _wait_for_reply(tab)
    assert plain and steered
    assert plain != steered
    note = tab.locator("#steered-chat .thought").last.inner_text().split()
    assert note[0] == "steered" and int(note[1]) > 0 and note[2] == "positions", note
    assert tab.locator("#token-view .fs-special").count() > 0


def test_spec_export_import_round_trip(page):
    backend, tab = page
    tab.click("text=Spec JSON")
    tab.click("#export-spec")
    code = tab.locator("#spec-json .cm-content")
    tab.wait_for_function("document.querySelector('#spec-json .cm-content').innerText.includes('\"edits\"')")
    exported = json.loads(code.inner_text())  # what `fast-steer chat --spec` reads
    (spec,) = [Intervention.from_dict(item) for item in exported["interventions"]]
    assert spec.layer == LAYER and spec.positions == "all"
    assert [e.op for e in spec.edits] == ["add"]
    assert exported["metadata"]["strength_scale"]["norm"] == backend.default_sae.residual_norm
    before = _cells(tab, "#edits")
    tab.click("#clear-edits")
    tab.wait_for_function("document.querySelectorAll('#edits [role=gridcell]').length === 0")
    tab.click("#import-spec")
    tab.wait_for_function("document.querySelectorAll('#edits [role=gridcell]').length === 4")
    assert _cells(tab, "#edits") == before
    assert exported["interventions"][0]["sae"] == backend.default_sae.ref
