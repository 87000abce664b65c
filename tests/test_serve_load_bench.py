"""The serving load benchmark (benchmarks/serve_load.py): its pieces, and one quick real run.

The quick run starts real ``vesper serve`` subprocesses on a tiny random model, through
the suite (``vesper bench --quick --only serve_load``), and checks the shape and the
consistency of what it reports -- never how fast anything was.
"""

from __future__ import annotations

import json

import pytest

from vesper_sdk.benchmarks import serve_load, suite

ROW_KEYS = {"model", "scheduler", "load", "load_factor", "offered_rps", "sent", "completed",
            "errors", "unfinished", "wall_s", "output_tokens", "output_tok_s", "request_rps",
            "mean_completion_tokens", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
            "itl_p99_ms", "e2e_p50_ms"}


def test_percentiles_and_poisson_arrivals():
    assert serve_load.pct([], 50) is None
    assert serve_load.pct([3.0, 1.0, 2.0], 50) == 2.0
    assert serve_load.pct([0.0, 10.0], 99) == pytest.approx(9.9)
    a = serve_load.poisson_arrivals(10.0, 5.0, 1000, seed=3)
    assert a == serve_load.poisson_arrivals(10.0, 5.0, 1000, seed=3)  # seeded
    assert a == sorted(a) and a[-1] <= 5.0 and 20 < len(a) < 100  # ~50 expected
    assert len(serve_load.poisson_arrivals(10.0, 5.0, 7, seed=3)) == 7  # the cap


def test_jobs_are_seeded_and_fit_the_context(tmp_path):
    folder = serve_load.build_random_model("tiny", tmp_path / "tiny")  # 256-token context
    jobs = serve_load.make_jobs(folder, 30, (8, 200), (8, 128), seed=1)
    again = serve_load.make_jobs(folder, 30, (8, 200), (8, 128), seed=1)
    assert [(j.prompt, j.max_tokens) for j in jobs] == [(j.prompt, j.max_tokens) for j in again]
    for j in jobs:
        assert len(j.prompt) + j.max_tokens <= 256 and 8 <= j.max_tokens <= 128
        assert 8 <= len(j.prompt) <= 200 and j.prompt[0] == 1  # BOS of the demo tokenizer
    assert len({len(j.prompt) for j in jobs}) > 5  # a mix of lengths


def _row(model, sched, load, tok_s, ttft_p99):
    return {"model": model, "scheduler": sched, "load": load, "offered_rps": 2.0,
            "output_tok_s": tok_s, "ttft_p99_ms": ttft_p99}


def test_comparison_and_headline_at_the_saturating_load():
    rows = [_row("small", "static", "light", 50.0, 100.0),
            _row("small", "static", "saturating", 100.0, 3000.0),
            _row("small", "continuous", "saturating", 140.0, 600.0),
            _row("demo", "static", "saturating", 900.0, 200.0)]
    comps = serve_load.compare(rows)
    assert comps == [{"model": "small", "load": "saturating",
                      "ttft_p99_static_over_continuous": 5.0,
                      "tok_s_continuous_over_static": 1.4, "meets_target": True}]
    text = suite.serve_load_headline({"rows": rows})
    assert "small at 1x: continuous 140 tok/s vs static 100 (1.40x)" in text
    assert "(5.00x lower)" in text and "demo static at 2.0 req/s: 900 tok/s" in text


@pytest.mark.slow
def test_quick_run_through_the_suite(tmp_path):
    spec = suite.BENCHMARKS["serve_load"]
    assert spec.resolve() is not None and set(spec.args) == {"cpu", "quick", "cuda"}
    rec = suite.run_benchmark(spec, "quick", "cpu", echo=False, out_dir=tmp_path)
    assert rec.status == "ok", rec.error
    res = rec.result
    assert res["benchmark"] == "serve_load" and res["settings"]["models"] == ["tiny"]
    rows = res["rows"]
    assert res["notes"] == [] and [(r["scheduler"], r["load"]) for r in rows] == [
        (s, load) for s in ("static", "continuous")
        for load in ("light", "saturating", "overloaded")]
    cap = res["models"]["tiny"]["capacity_rps"]
    assert cap > 0 and res["models"]["tiny"]["hidden_size"] == 64
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["offered_rps"] == pytest.approx(r["load_factor"] * cap, rel=0.01)
        assert r["sent"] == r["completed"] + r["errors"] + r["unfinished"] > 0
        assert r["errors"] == 0 and r["completed"] > 0, r
        assert r["output_tok_s"] > 0 and r["output_tokens"] >= r["completed"]
        assert 1 <= r["mean_completion_tokens"] <= 16  # --quick answers: 4..16 tokens
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"]
        assert 0 < r["itl_p50_ms"] <= r["itl_p99_ms"]
    assert [r["load_factor"] for r in rows[:3]] == [0.3, 1.0, 2.0]
    (comp,) = res["comparisons"]
    assert comp["model"] == "tiny" and comp["tok_s_continuous_over_static"] > 0
    assert rec.headline and "tiny" in rec.headline
    assert "| tiny | static | saturating |" in res["markdown"]
    assert (tmp_path / "serve_load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    suite.write_record(rec, tmp_path, spec)
    assert json.loads((tmp_path / "serve_load.json").read_text())["status"] == "ok"
