"""The Gradio demo without a browser: rendering, the chat logic, backends, entry points."""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import httpx
import pytest
from _fixtures_serve import free_port, launched, make_tiny_model

import vesper_sdk as vs
import vesper_sdk.demo.render as render

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def app_module():
    import vesper_sdk.demo.app as app

    return app


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("demo") / "tiny")


@pytest.fixture(scope="module")
def demo(app_module, model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return app_module.build_demo(model_dir, cache_dir=tmp_path_factory.mktemp("cache"),
                                 device="cpu")


def run_to_end(session, message: str, backend: str = "PyTorch fp32", turns=None, **kw):
    """Drive ChatSession.respond to its last update; return (turns, status, updates)."""
    params = dict(temperature=0.0, max_tokens=12, threshold=0.85, retries=0, regulate=True)
    params.update(kw)
    updates = list(session.respond(message, turns or [], backend, params["temperature"],
                                   params["max_tokens"], params["threshold"],
                                   params["retries"], params["regulate"]))
    turns, status = updates[-1]
    return turns, status, updates


# ----------------------------------------------------------------------------- rendering
def test_confidence_colour_runs_red_to_green(app_module) -> None:
    hue = [int(re.match(r"hsl\((\d+),", render.confidence_colour(c)).group(1))
           for c in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert hue == [0, 30, 60, 90, 120]
    assert render.confidence_colour(-3) == render.confidence_colour(0)
    assert render.confidence_colour(7) == render.confidence_colour(1)


def test_render_chat_colours_marks_and_escapes(app_module) -> None:
    tv, turn = app_module.TokenView, app_module.Turn
    tokens = [tv("<b>Hi", 0.9, -0.1), tv(" there", 0.2, -2.0, "conservative"),
              tv("", 0.5, -1.0, "stopped", special=True)]
    stats = app_module.answer_stats(tokens, 0.5, "PyTorch fp32")
    page = app_module.render_chat([turn("user", "<script>x</script>"),
                                   turn("assistant", "<b>Hi there", tokens, stats)])
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "&lt;b&gt;Hi" in page and "<b>Hi" not in page
    spans = re.findall(r'<span class="(vesper-tok[^"]*)" style="background-color:([^"]+)"',
                       page)
    assert spans == [("vesper-tok", render.confidence_colour(0.9)),
                     ("vesper-tok vesper-regulated", render.confidence_colour(0.2)),
                     ("vesper-tok vesper-regulated vesper-end",
                      render.confidence_colour(0.5))]
    assert "regulator: conservative" in page
    # Stats: speed counts all 3 generated tokens; confidence only the 2 visible ones.
    assert stats["tokens"] == 2 and stats["tokens_per_s"] == pytest.approx(6.0)
    assert stats["mean_confidence"] == pytest.approx(0.55)
    assert stats["min_confidence"] == pytest.approx(0.2) and stats["min_token"] == " there"
    assert stats["regulated"] == 2 and stats["retry"] is None
    assert stats["regulator_kinds"] == {"conservative": 1, "stopped": 1}
    line = re.search(r'<div class="vesper-stats">(.*?)</div>', page).group(1)
    for part in ("6.0</b> tokens/s", "mean confidence <b>0.55</b>", "lowest <b>0.20</b>",
                 "regulator: <b>2</b> actions (1 conservative, 1 stopped)"):
        assert part in line, line


def test_answer_level_flags_are_reported_once_not_underlined(app_module) -> None:
    tv = app_module.TokenView
    tokens = [tv("a", 0.3, -1.0, "conservative, retry 2"), tv("b", 0.9, -0.1, "retry 2")]
    stats = app_module.answer_stats(tokens, 1.0, "ONNX Runtime")
    assert stats["regulated"] == 1 and stats["retry"] == "retry 2"
    page = app_module.render_chat([app_module.Turn("assistant", "ab", tokens, stats)])
    assert page.count("vesper-regulated") == 1
    assert "1 conservative), kept retry 2" in page


def test_legend_shows_scale_and_regulator_mark(app_module) -> None:
    assert "vesper-scale" in app_module.LEGEND and "vesper-regulated" in app_module.LEGEND
    assert "linear-gradient" in app_module.CSS and "hsl(0," in app_module.CSS


# ----------------------------------------------------------------------------- chat logic
def test_chat_matches_the_model_and_reports_stats(demo, model_dir: Path) -> None:
    session = demo.vesper_session
    llm = vs.load(model_dir, device="cpu")
    messages = [{"role": "user", "content": "what is the sun?"}]
    expected = llm.chat(messages, max_new_tokens=12, temperature=0.0)
    turns, status, updates = run_to_end(session, "what is the sun?", regulate=False)
    assert status == ""
    assert [t.role for t in turns] == ["user", "assistant"]
    answer = turns[-1]
    assert answer.text == expected
    assert len(answer.tokens) == 12 and answer.stats["tokens"] == 12
    assert answer.stats["regulated"] == 0
    assert 0.0 < answer.stats["min_confidence"] <= answer.stats["mean_confidence"] < 1.0
    assert answer.stats["tokens_per_s"] > 0
    # A second turn sees the first as history (the model gets the whole conversation).
    turns2, _, _ = run_to_end(session, "and the moon?", turns=turns, regulate=False)
    history = [*messages, {"role": "assistant", "content": expected},
               {"role": "user", "content": "and the moon?"}]
    assert turns2[-1].text == llm.chat(history, max_new_tokens=12, temperature=0.0)
    assert len(turns2) == 4


def test_regulator_controls_reach_the_decoder(demo) -> None:
    session = demo.vesper_session
    # threshold 1.0: every position is below it, so every token is flagged conservative.
    turns, _, _ = run_to_end(session, "hello", threshold=1.0, temperature=1.0)
    flags = [t.regulated for t in turns[-1].tokens if not t.special]
    assert flags and all(f and "conservative" in f for f in flags)
    # threshold 0.0: no position is below it, so no token is conservative.
    turns, _, _ = run_to_end(session, "hello", threshold=0.0, temperature=1.0)
    assert not any(t.regulated and "conservative" in t.regulated for t in turns[-1].tokens)
    # Retries: the kept attempt's tokens say so, and the stats line reports it once.
    turns, _, _ = run_to_end(session, "hello", threshold=1.0, retries=2, temperature=0.5)
    assert all("of 3" in t.regulated or "retry" in t.regulated
               for t in turns[-1].tokens if not t.special)
    retry = turns[-1].stats["retry"]
    assert retry in ("kept first of 3", "retry 1", "retry 2")
    assert turns[-1].stats["regulated"] >= 1


def test_empty_message_changes_nothing(demo) -> None:
    turns, status, _ = run_to_end(demo.vesper_session, "   ")
    assert turns == [] and status == ""


def test_too_long_message_is_reported_not_raised(demo) -> None:
    turns, status, _ = run_to_end(demo.vesper_session, "the cat sees the dog " * 200)
    assert "too long" in status and "too long" in turns[-1].error


def test_fit_context_drops_oldest_turns(app_module, model_dir: Path) -> None:
    tok = vs.VesperTokenizer.from_file(model_dir)
    msgs = [{"role": "system", "content": "be nice"}]
    for i in range(40):
        msgs += [{"role": "user", "content": f"question {i} about the river"},
                 {"role": "assistant", "content": f"answer {i} about the tree"}]
    msgs.append({"role": "user", "content": "last"})
    kept = app_module.fit_context(tok, msgs, 64, 256)
    assert kept[0] == msgs[0] and kept[-1] == msgs[-1]
    assert kept[1:] == msgs[-(len(kept) - 1):]  # the most recent turns, in order
    assert len(tok.chat_prompt_ids(kept)) + 64 <= 256
    # ... and it kept as much as fits: one more message would not.
    assert len(tok.chat_prompt_ids(kept[:1] + msgs[-len(kept):])) + 64 > 256
    # The message being answered is never dropped: too long alone is an error.
    with pytest.raises(RuntimeError, match="too long"):
        app_module.fit_context(tok, [msgs[0], {"role": "user", "content": "river " * 300}],
                               64, 256)


def test_failed_exchanges_are_left_out_of_the_history(app_module) -> None:
    turn = app_module.Turn
    turns = [turn("user", "a"), turn("assistant", "b"), turn("user", "c"),
             turn("assistant", error="boom"), turn("user", "d")]
    assert app_module.history_of(turns) == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "d"}]


# ----------------------------------------------------------------------------- backends
def test_int8_backend_is_built_once_and_cached(demo) -> None:
    session = demo.vesper_session
    turns, status, updates = run_to_end(session, "hi", backend="INT8 (bitsandbytes)",
                                        regulate=False)
    assert "first use" in updates[0][1]  # the user is told why this one takes longer
    assert status == "" and turns[-1].error is None and len(turns[-1].tokens) == 12
    folder = session.variants.folder_for("int8")
    assert (folder / "config.json").is_file()
    first = session.variants.get("INT8 (bitsandbytes)")
    assert session.variants.get("INT8 (bitsandbytes)") is first
    assert first.model_dir == folder


def test_onnx_backend_runs_through_onnx_runtime(demo) -> None:
    session = demo.vesper_session
    turns, status, _ = run_to_end(session, "hi", backend="ONNX Runtime", regulate=False)
    assert status == "" and len(turns[-1].tokens) == 12
    assert (session.variants.folder_for("onnx") / "model.onnx").is_file()
    assert type(session.variants.get("ONNX Runtime").backend).__name__ == "OnnxBackend"


def test_missing_extra_gives_a_clear_message(app_module, model_dir: Path, tmp_path: Path,
                                             monkeypatch) -> None:
    # None in sys.modules makes `import bitsandbytes` raise ImportError, as if absent.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    demo = app_module.build_demo(model_dir, cache_dir=tmp_path, device="cpu")
    turns, status, _ = run_to_end(demo.vesper_session, "hi", backend="INT4 (bitsandbytes NF4)")
    assert "pip install 'vesper-sdk[quantize]'" in status
    assert turns[-1].error and not turns[-1].tokens
    assert not any(tmp_path.rglob("config.json"))  # no half-built variant left behind


def test_in_memory_model_explains_why_variants_are_missing(app_module, model_dir: Path
                                                           ) -> None:
    llm = vs.load(model_dir, device="cpu")
    llm.model_dir = None
    demo = app_module.build_demo(llm)
    turns, status, _ = run_to_end(demo.vesper_session, "hi", backend="ONNX Runtime")
    assert "model folder" in status
    turns, status, _ = run_to_end(demo.vesper_session, "hi", regulate=False)
    assert status == "" and turns[-1].tokens


# ----------------------------------------------------------------------------- entry points
def test_missing_default_model_fails_clearly(app_module, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(app_module, "DEFAULT_MODEL_DIR", tmp_path / "default_model")
    with pytest.raises(FileNotFoundError, match="MODEL_DIR"):
        app_module.build_demo()
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        app_module.build_demo(tmp_path)


def test_offline_settings(app_module) -> None:
    import gradio as gr

    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    theme = app_module.theme()
    fonts = [*theme._font, *theme._font_mono]
    assert not any(isinstance(f, gr.themes.GoogleFont) for f in fonts)
    assert all(isinstance(f, str) for f in fonts)  # system fonts only: nothing to fetch
    assert "googleapis" not in theme._get_theme_css()


def test_vesper_demo_cli_options(app_module) -> None:
    from vesper_sdk.cli import build_parser, options_from_args

    args = build_parser().parse_args(["demo", "runs/a", "--port", "9999", "--host", "0.0.0.0"])
    opts = options_from_args(args._cls, args)
    assert isinstance(opts, app_module.DemoOptions)
    assert (opts.model_dir, opts.port, opts.host) == ("runs/a", 9999, "0.0.0.0")
    defaults = options_from_args(args._cls, build_parser().parse_args(["demo"]))
    assert defaults.model_dir is None and defaults.host == "127.0.0.1"


def test_main_reports_a_bad_folder(app_module, tmp_path: Path, capsys) -> None:
    assert app_module.main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "not a model folder" in err and "Traceback" not in err


def test_runs_as_a_script_and_prints_its_url(model_dir: Path, tmp_path: Path) -> None:
    # `python demo/app.py` from the repo root: absolute imports only, prints the address.
    port = free_port()
    cmd = [sys.executable, "demo/app.py", str(model_dir), "--port", str(port), "--device",
           "cpu", "--cache-dir", str(tmp_path)]
    with launched(cmd, "VesperLM demo running at", cwd=REPO) as line:
        assert f"http://127.0.0.1:{port}" in line
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=30)
        assert page.status_code == 200 and "VesperLM chat" in page.text


def test_a_token_shows_its_top_5_and_an_answer_its_confidence_badge() -> None:
    # The badge is the MetaHead's answer confidence over the whole answer (the end token
    # too), as the engine pooled it up to the last token: not the mean token confidence,
    # nor the confidence of the answer's first tokens.
    tok = render.TokenView("4", 0.9, -0.1, alternatives=[("4", 0.9), ("5", 0.05)],
                           answer_logit=math.log(0.6 / 0.4), answer_confidence=0.6)
    end = render.TokenView("", 0.5, 0.0, special=True, answer_logit=math.log(0.8 / 0.2),
                           answer_confidence=0.8)
    stats = render.answer_stats([tok, end], 0.1, "PyTorch fp32")
    page = render.render_chat([render.Turn("assistant", "4", [tok, end], stats)])
    assert "top 5: &#x27;4&#x27; 0.90, &#x27;5&#x27; 0.05" in page
    assert "answer confidence 0.80" in page
    withheld = render.TokenView("I'm not sure.", 0.3, 0.0, regulated="abstained")
    stats = render.answer_stats([withheld], 0.1, "PyTorch fp32")
    page = render.render_chat([render.Turn("assistant", "x", [withheld], stats)])
    assert "abstained: not sure enough to answer" in page and "vesper-regulated" in page
