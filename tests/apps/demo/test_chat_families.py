"""The demo beyond ChatML: Neuronpedia links in the feature panel (an SAE folder whose cfg.json metadata has a
`neuronpedia_id`, as a registered release gets; none without one), and Gemma 2's refused system message folded
into the first user turn, through the backend the page calls."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gradio")

from apps.demo.conversation import with_user_turn  # noqa: E402
from apps.demo.settings import GenerationSettings  # noqa: E402
from steer.chat_template import fold_system  # noqa: E402
from tests.apps.demo.helpers import tiny_backend  # noqa: E402
from tests.chat_families import family_tokenizer  # noqa: E402

NP_ID = "tiny-it/2-res-test"
PAGES = "https://www.neuronpedia.org/tiny-it/2-res-test"
GREEDY = GenerationSettings(temperature=0.0, max_new_tokens=8)


def _add_neuronpedia_id(folder) -> None:
    path = folder / "cfg.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["metadata"]["neuronpedia_id"] = NP_ID
    path.write_text(json.dumps(cfg), encoding="utf-8")


def test_feature_panel_links_each_feature_to_neuronpedia(chatml_tokenizer, tmp_path):
    backend = tiny_backend(chatml_tokenizer, tmp_path / "sae", before_load=_add_neuronpedia_id)
    rows = backend.feature_rows("tiny-sae")
    assert rows and all(row[-1] == f"[{row[1]}]({PAGES}/{row[1]})" for row in rows)
    assert backend.feature_link("tiny-sae", 12) == f"{PAGES}/12"
    assert f"<a href='{PAGES}/12' target='_blank'>" in backend.contexts_html("tiny-sae", 12)


def test_an_sae_without_a_neuronpedia_id_shows_no_link(chatml_tokenizer, tmp_path):
    backend = tiny_backend(chatml_tokenizer, tmp_path / "sae")
    assert not backend.linked and backend.feature_link("tiny-sae", 12) is None
    assert all(len(row) == 3 for row in backend.feature_rows("tiny-sae")), "no link column"
    assert "neuronpedia" not in backend.contexts_html("tiny-sae", 12).lower()


def test_gemma2_system_prompt_is_folded(tmp_path):
    tok = family_tokenizer("gemma2")
    backend = tiny_backend(tok, tmp_path / "sae")
    system = with_user_turn([], "Name a colour.", system_prompt="You are terse.")
    folded = fold_system(system)
    expected = tok.apply_chat_template(folded, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert backend.prompt_ids(system)[0].tolist() == list(expected)
    reply = backend.reply([], "Name a colour.", GREEDY, system_prompt="You are terse.")
    assert reply.text == backend.reply([], folded[0]["content"], GREEDY).text
    finished = [*system, {"role": "assistant", "content": "Blue."}]
    n_tokens = len(tok.apply_chat_template(fold_system(finished), return_dict=True)["input_ids"])
    assert f"of {n_tokens} tokens" in backend.token_view_html("tiny-sae", 3, finished)
