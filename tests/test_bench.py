"""The benchmark suite: result files, failure reporting, the CLI, charts and the GPU scripts.

Benchmarks here are small fabricated scripts (one that works, one that crashes, one that
writes no JSON, one that hangs, one that does not exist), so these tests check the suite
itself quickly; one end-to-end test runs the real optimizer benchmark at --quick size.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from argparse import Namespace
from pathlib import Path

import pytest

from vesper_sdk import cli
from vesper_sdk.bench import BenchOptions, as_command
from vesper_sdk.bench import cli as bench_cli
from vesper_sdk.benchmarks import charts, convergence, gpu_checks, suite

REPO = Path(__file__).resolve().parents[1]

OK_SCRIPT = """
import argparse, json
ap = argparse.ArgumentParser()
ap.add_argument("--json"); ap.add_argument("--device"); ap.add_argument("--size", default="1")
a = ap.parse_args()
print("variant  ms")
print(f"alpha    1.5   size={a.size} device={a.device}")
json.dump({"headline": "alpha 1.5 ms", "size": a.size,
           "rows": [{"variant": "alpha", "ms": 1.5, "gpu": {"name": "x", "mem": 2}},
                    {"variant": "beta|2", "ms": 12345.0, "gpu": {"name": "y", "mem": 3}}]},
          open(a.json, "w"))
print(f"wrote {a.json}")
"""
FAIL_SCRIPT = """
import sys
print("starting")
raise SystemExit("boom: the kernel is broken")
"""
NOJSON_SCRIPT = "print('forgot to write the JSON')\n"
HANG_SCRIPT = "import time\ntime.sleep(60)\n"


def _spec(name: str, script: Path, **kw) -> suite.BenchSpec:
    args = kw.pop("args", {"cpu": ["--size", "7"], "quick": ["--size", "1"]})
    return suite.BenchSpec(name=name, module=f"not.installed.{name}", script=script, args=args,
                           timeout_s=kw.pop("timeout_s", {"cpu": 60, "quick": 60}), **kw)


@pytest.fixture
def registry(tmp_path: Path) -> dict[str, suite.BenchSpec]:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name, body in (("ok", OK_SCRIPT), ("fail", FAIL_SCRIPT), ("nojson", NOJSON_SCRIPT),
                       ("hang", HANG_SCRIPT)):
        (scripts / f"{name}.py").write_text(textwrap.dedent(body))
    return {
        "ok": _spec("ok", scripts / "ok.py", headline=lambda r: f"{r['rows'][0]['ms']} ms"),
        "fail": _spec("fail", scripts / "fail.py"),
        "nojson": _spec("nojson", scripts / "nojson.py"),
        "hang": _spec("hang", scripts / "hang.py", timeout_s={"cpu": 1, "quick": 1}),
        "gone": _spec("gone", scripts / "gone.py"),
        "extra": _spec("extra", scripts / "ok.py", default=False),
    }


def _run(registry, out, only=None, **kw):
    return suite.run_suite(only, device="cpu", out_dir=out, charts=False, echo=False,
                           registry=registry, **kw)


# ----------------------------------------------------------------------------- writers
def test_markdown_table_formats_cells():
    table = suite.markdown_table([{"a": 1, "b": 0.000123456, "c": "x|y"},
                                  {"a": 123456, "b": 2.5, "d": True}])
    assert table.splitlines() == [
        "| a | b | c | d |",
        "|---|---|---|---|",
        "| 1 | 1.235e-04 | x\\|y |  |",
        "| 123,456 | 2.5 |  | true |",
    ]
    assert suite.fmt(1234.5) == "1,234" or suite.fmt(1234.5) == "1,235"
    assert suite.fmt(float("nan")) == "nan" and suite.fmt(None) == ""


def test_json_to_markdown_renders_scalars_and_row_lists():
    md = suite.json_to_markdown({"preset": "tiny", "steps": 3,
                                 "rows": [{"variant": "a", "t": {"fwd": 1.0, "bwd": 2.0}}]})
    assert "| field | value |" in md and "| preset | tiny |" in md
    # nested dicts of scalars become a.b columns
    assert "| variant | t.fwd | t.bwd |" in md and "| a | 1 | 2 |" in md


def test_suite_writes_json_markdown_and_summary_for_each_benchmark(registry, tmp_path):
    out = tmp_path / "results"
    code, records = _run(registry, out, only="ok")
    assert code == 0 and [r.status for r in records] == ["ok"]
    data = json.loads((out / "ok.json").read_text())
    # every figure keeps its context
    for key in ("command", "machine", "versions", "date", "git", "wall_s", "result"):
        assert key in data, key
    assert {"cpu", "cpu_cores"} <= set(data["machine"])
    assert {"python", "torch", "triton", "onnxruntime", "bitsandbytes",
            "transformers"} <= set(data["versions"])
    assert data["result"]["size"] == "7", "CPU-sized arguments were not passed"
    assert "--size 7 --device cpu" in data["command"] and "--json" not in data["command"]
    assert data["headline"] == "1.5 ms" and data["status"] == "ok"
    md = (out / "ok.md").read_text()
    assert "| variant | ms | gpu.name | gpu.mem |" in md
    assert "| beta\\|2 | 12,345 | y | 3 |" in md
    assert "alpha    1.5" in md  # the benchmark's own printed table is kept
    assert "wrote" not in md  # but not the path of the scratch JSON, deleted since
    summary = (out / "SUMMARY.md").read_text()
    assert "[ok](ok.md)" in summary and "1.5 ms" in summary and "## Failures" not in summary


def test_failures_are_reported_by_name_and_error_and_make_exit_code_nonzero(registry, tmp_path):
    out = tmp_path / "results"
    code, records = _run(registry, out)  # the default set: everything but "extra"
    assert code == 1
    status = {r.name: r.status for r in records}
    assert status == {"ok": "ok", "fail": "failed", "nojson": "failed", "hang": "timeout",
                      "gone": "missing"}
    errors = {r.name: r.error for r in records}
    assert errors["fail"].startswith("exit code 1: boom: the kernel is broken")
    assert "wrote no JSON" in errors["nojson"]
    assert "timed out after 1 s" in errors["hang"]
    assert "gone.py does not exist" in errors["gone"]
    summary = (out / "SUMMARY.md").read_text()
    assert "## Failures" in summary
    for name, state in (("fail", "failed"), ("nojson", "failed"), ("hang", "timeout"),
                        ("gone", "missing")):
        assert f"### {name}: {state}" in summary
        assert f"[{name}]({name}.md)" in summary
        assert (out / f"{name}.json").is_file() and (out / f"{name}.md").is_file()
    assert "boom: the kernel is broken" in summary
    assert json.loads((out / "fail.json").read_text())["returncode"] == 1


def test_quick_profile_and_selection(registry, tmp_path):
    out = tmp_path / "r"
    code, records = _run(registry, out, only="ok, extra", quick=True)
    assert code == 0 and [r.name for r in records] == ["ok", "extra"]
    assert json.loads((out / "ok.json").read_text())["result"]["size"] == "1"
    with pytest.raises(ValueError, match="unknown benchmark.*nope"):
        suite.select("ok,nope", registry)
    assert [s.name for s in suite.select("all", registry)] == list(registry)
    assert "extra" not in [s.name for s in suite.select(None, registry)]


def test_summary_keeps_earlier_results_of_benchmarks_not_run_now(registry, tmp_path):
    out = tmp_path / "r"
    _run(registry, out, only="fail")
    code, _ = _run(registry, out, only="ok")
    assert code == 0  # only what ran now decides the exit code
    summary = (out / "SUMMARY.md").read_text()
    assert "failed (earlier)" in summary and "| [ok](ok.md) | ok |" in summary


# ---------------------------------------------------------------------------------- CLI
def test_vesper_bench_help_lists_the_options():
    proc = subprocess.run([sys.executable, "-m", "vesper_sdk.cli", "bench", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--only", "--quick", "--device", "--out-dir", "--timeout", "--charts",
                 "--list"):
        assert flag in proc.stdout, flag
    assert "optimizer" in proc.stdout and "convergence" in proc.stdout


def test_vesper_bench_exit_code_and_usage_errors(registry, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(suite, "BENCHMARKS", registry)
    opts = BenchOptions(only="ok,fail", device="cpu", out_dir=str(tmp_path / "r"),
                        charts=False)
    assert bench_cli(opts) == 1
    assert "boom: the kernel is broken" in capsys.readouterr().out
    assert cli.main(["bench", "--only", "ok", "--device", "cpu", "--no-charts",
                     "--out-dir", str(tmp_path / "r2")]) == 0
    assert cli.main(["bench", "--only", "nope"]) == 2  # a usage error, not a crash
    assert "unknown benchmark" in capsys.readouterr().err
    assert as_command(BenchOptions(only="ok", quick=True, charts=False)) == \
        "vesper bench --only ok --quick --no-charts"


def test_sigterm_stops_the_running_benchmark_too(tmp_path):
    # An outer `timeout` (as in gpu_suite.sh) sends SIGTERM to `vesper bench`; the benchmark
    # runs in its own session, so without care it would outlive the suite.
    pidfile = tmp_path / "pid"
    script = tmp_path / "hang.py"
    script.write_text(f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
                      "time.sleep(120)\n")
    driver = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from vesper_sdk.benchmarks import suite
        from vesper_sdk.bench import BenchOptions, cli
        suite.BENCHMARKS = {{"hang": suite.BenchSpec(
            name="hang", module="x", script=Path({str(script)!r}), args={{"cpu": []}},
            timeout_s={{"cpu": 120}})}}
        sys.exit(cli(BenchOptions(only="hang", device="cpu", charts=False,
                                  out_dir={str(tmp_path / "r")!r})))
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver])
    try:
        for _ in range(600):  # the benchmark has started once it wrote its pid
            if pidfile.is_file() and pidfile.read_text():
                break
            time.sleep(0.1)
        child = int(pidfile.read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
    finally:
        proc.kill()
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_real_benchmarks_are_registered_and_found():
    # Each default benchmark module exists in this checkout (the suite reports, not hides,
    # one that does not), and every profile has arguments.
    for spec in suite.BENCHMARKS.values():
        assert set(spec.args) == {"cpu", "quick", "cuda"}, spec.name
    assert suite.BENCHMARKS["optimizer"].resolve() == REPO / "benchmarks" / "optimizer.py"
    assert suite.BENCHMARKS["convergence"].resolve() == REPO / "benchmarks" / "convergence.py"


@pytest.mark.slow
def test_quick_run_of_the_real_optimizer_benchmark(tmp_path):
    # The real benchmark at its --quick size, two of its variants (time), through the
    # same subprocess, JSON, markdown and chart path as `vesper bench --quick`.
    spec = suite.BENCHMARKS["optimizer"]
    rec = suite.run_benchmark(spec, "quick", "cpu", echo=False,
                              extra_args=["--only", "velvet", "adamw_foreach"])
    assert rec.status == "ok", rec.error
    res = rec.result["results"]
    assert res["velvet"]["ms_per_step"] > 0 and res["adamw_foreach"]["ms_per_step"] > 0
    assert rec.headline.startswith("tiny: Velvet")
    suite.write_record(rec, tmp_path, spec)
    written, errors = charts.make_charts(tmp_path, ["optimizer"])
    assert errors == {} and (tmp_path / "optimizer.png").read_bytes()[:4] == b"\x89PNG"
    assert "| velvet |" in (tmp_path / "optimizer.md").read_text()


# ------------------------------------------------------------------------------- charts
def _record(result, **kw):
    return {"status": "ok", "date": "2026-11-26T00:00:00", "result": result,
            "machine": {"cpu": "test CPU", "cpu_cores": 2}, **kw}


def test_charts_draw_every_benchmark_from_fabricated_results(tmp_path):
    results = {
        "optimizer": {"preset": "tiny", "parameters": 1_000_000, "results": {
            "velvet": {"ms_per_step": 1.0, "fraction_of_copy": 0.9},
            "adamw_fused": {"ms_per_step": 2.0, "fraction_of_copy": 0.4},
            "per_tensor": {"skipped": "no GPU"}, "copy": {"ms_per_step": 0.9}}},
        "train_step": {"preset": "tiny", "rows": [
            {"variant": "ours", "fwd_ms": 10, "bwd_ms": 20, "opt_ms": 1, "tok_s": 5e4},
            {"variant": "seed-style", "total_ms": 50}]},
        "generate": {"settings": {"device": "cpu"}, "rows": [
            {"batch": 1, "vesper": {"tok_s_best": 90.0}, "hf-gpt2": {"tok_s_best": 70.0}}]},
        "quantized": {"config": "tiny", "rows": [
            {"variant": "fp32", "perplexity": 10.0, "size_mb": 8.0, "decode_tok_s": 50.0},
            {"variant": "bnb-nf4", "perplexity": 10.4, "size_mb": 2.0, "decode_tok_s": 30.0}]},
        "convergence": {"settings": {"steps": 10}, "curves": [
            {"corpus": "c", "optimizer": o, "lr": 1e-3, "seeds": 2, "steps": [0, 5, 10],
             "mean": [7, 5 + d, 4 + d], "min": [7, 4.9 + d, 3.9 + d],
             "max": [7, 5.1 + d, 4.1 + d]} for o, d in (("velvet", 0.0), ("adamw", 0.1))]},
    }
    for name, res in results.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(_record(res)))
    (tmp_path / "fail.json").write_text(json.dumps({"status": "failed"}))
    written, errors = charts.make_charts(tmp_path)
    assert errors == {}
    assert sorted(Path(p).name for p in written) == sorted(f"{n}.png" for n in results)
    for p in written:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_errors_are_reported_and_failed_runs_skipped(tmp_path):
    (tmp_path / "generate.json").write_text(json.dumps(_record({"rows": []})))
    (tmp_path / "optimizer.json").write_text(json.dumps({"status": "failed", "result": None}))
    written, errors = charts.make_charts(tmp_path)
    assert written == [] and list(errors) == ["generate"]
    assert "tok_s_best" in errors["generate"]


# -------------------------------------------------------------------------- convergence
def test_convergence_summary_pairs_runs_by_seed():
    def run(opt, seed, loss):
        return {"corpus": "c", "optimizer": opt, "lr": 1e-3, "seed": seed, "steps": [0, 10],
                "val_loss": [7.0, loss], "final_val_loss": loss, "final_val_ppl": math.exp(loss),
                "seconds": 1.0}
    # Velvet's loss lower by ln 2 on seed 0 (ppl halved), higher by ln 2 on seed 1.
    runs = [run("adamw", 0, 3.0), run("velvet", 0, 3.0 - math.log(2)),
            run("adamw", 1, 3.0), run("velvet", 1, 3.0 + math.log(2))]
    curves, table, paired = convergence.summarise(runs)
    [p] = paired
    assert p["ppl_change_pct_per_seed"] == [-50.0, 100.0]
    assert p["ppl_change_pct"] == pytest.approx(25.0) and p["velvet_better_in"] == 1
    v = next(c for c in curves if c["optimizer"] == "velvet")
    assert v["steps"] == [0, 10] and v["min"][1] == pytest.approx(3 - math.log(2))
    adamw = next(r for r in table if r["optimizer"] == "adamw")
    assert adamw["final_val_loss"] == 3.0 and adamw["final_val_loss_std"] == 0.0
    report = {"settings": {"model": "m", "steps": 10, "batch_size": 2, "seq_len": 8,
                           "schedule": "cosine", "seeds": [0, 1], "eval_every": 5,
                           "eval_batches": 1}, "params": 1000, "lr_policy": "same",
              "table": table, "paired": paired, "corpora": {"c": {"name": "c"}}}
    md = convergence.to_markdown(report)
    assert "| c | velvet | +25.00 % ± " in md and "-50.00 %, +100.00 %" in md
    # A second Velvet variant gets its own paired row against the same AdamW runs.
    runs += [run("velvet-beta1", 0, 3.0), run("velvet-beta1", 1, 3.0)]
    paired = convergence.summarise(runs)[2]
    assert [(p["optimizer"], p["ppl_change_pct"]) for p in paired] == [
        ("velvet", pytest.approx(25.0)), ("velvet-beta1", 0.0)]


def test_convergence_reuses_only_finished_runs_of_the_same_options_and_code(tmp_path):
    key = {"options": {"optimizer": "adamw", "lr": 0.002, "max_steps": 10}, "code": "abc"}
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "study.json").write_text(json.dumps(key))
    (run / "metrics.jsonl").write_text('{"step": 0, "val_loss": 7.0}\n'
                                       '{"step": 10, "loss": 5.0, "val_loss": 5.5}\n')
    assert convergence._finished_run(run, key, steps=10)
    assert not convergence._finished_run(run, {**key, "code": "changed"}, steps=10)
    other = {**key, "options": {**key["options"], "lr": 0.001}}
    assert not convergence._finished_run(run, other, steps=10)
    assert not convergence._finished_run(run, key, steps=20)  # stopped early
    (run / "model" / "config.json").unlink()  # interrupted: no model folder written
    assert not convergence._finished_run(run, key, steps=10)
    assert not convergence._finished_run(tmp_path / "absent", key, steps=10)
    assert len(convergence.code_fingerprint()) == 16


def test_stdlib_docstring_corpus_is_deterministic_english_text():
    text, meta = convergence.stdlib_docstrings(max_chars=30_000)
    again, meta2 = convergence.stdlib_docstrings(max_chars=30_000)
    assert text == again and meta["sha256"] == meta2["sha256"]
    assert 20_000 < len(text) <= 30_000 and meta["docstrings"] > 100
    assert "\n\n" in text  # documents separated by blank lines, as the trainer splits them
    words = re.findall(r"[a-z]+", text.lower())
    assert sum(w in ("the", "of", "a", "to", "is") for w in words) > 0.05 * len(words)


def test_convergence_options():
    args = convergence.parse_args(["--quick", "--sweep", "1e-3,3e-3", "--corpora", "skills"])
    assert args.steps == 10 and args.seeds == 2 and args.sweep == [1e-3, 3e-3]
    assert args.corpora == ["skills"]
    assert args.optimizers == ["velvet", "velvet-beta1", "adamw"]
    # Each is a TrainOptions setting: the beta1 guidance is what tells the two Velvets apart.
    assert convergence._TRAIN_OPTIONS["velvet"]["perplexity_guided"] is False
    assert convergence._TRAIN_OPTIONS["velvet-beta1"]["perplexity_guided"] is True
    with pytest.raises(SystemExit):
        convergence.parse_args(["--optimizers", "sgd"])
    assert isinstance(args, Namespace)


# -------------------------------------------------------------------------- GPU scripts
def test_gpu_scripts_parse_as_bash():
    for name in ("gpu_suite.sh", "fetch_gpu_wheels.sh"):
        proc = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / name)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_gpu_suite_references_only_files_that_exist():
    script = (REPO / "benchmarks" / "gpu_suite.sh").read_text()
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    paths = set(re.findall(r"\b((?:benchmarks|tests|kernels|vesper_sdk)/[\w/]+\.(?:py|sh))",
                           code))
    assert {"benchmarks/gpu_checks.py", "benchmarks/suite.py", "benchmarks/charts.py"} <= paths
    missing = [p for p in paths if not (REPO / p).is_file()]
    assert missing == []
    # the benchmarks it runs by name through the suite are registered there
    for name in re.findall(r"^bench_step (\w+)", code, flags=re.M):
        assert name in suite.BENCHMARKS, name
    assert "pyproject.toml" in code and (REPO / "pyproject.toml").is_file()


def test_gpu_checks_script_runs_its_checks_on_cpu(tmp_path):
    # On CPU the kernel goes through Triton's interpreter: same code path as on the GPU
    # but for the compilation, so the script cannot fail on a first GPU run for a bug here.
    out = tmp_path / "checks.json"
    assert gpu_checks.main(["--device", "cpu", "--checks",
                            "kernel,optimizer,decode,head_loss,answer_mlp",
                            "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] and report["checks"]["kernel"]["cases"] >= 12
    assert report["checks"]["optimizer"]["rows"][0]["impl"] == "triton"
    decode = report["checks"]["decode"]["rows"]
    assert [r["variant"] for r in decode] == [
        "dynamic cache (reference)", "static eager", "static eager, FFN pair",
        "static eager, pipelined"]
    assert all(r["same_tokens"] and r["conf_max_diff"] < 1e-3 for r in decode[1:])
    assert [r["pair_ffn"] for r in decode[1:]] == [False, True, False]
    head = report["checks"]["head_loss"]["rows"]
    assert [r["case"] for r in head] == ["chunked, eager"] and head[0]["max_grad_rel"] < 1e-4
    assert report["checks"]["answer_mlp"]["rows"][0]["auroc"] > 0.9
    assert gpu_checks.main(["--device", "cpu", "--checks", "nope"]) == 2


def test_decode_profile_splits_an_onnx_step_into_the_runtimes_run_and_host_work(capsys):
    from vesper_sdk.benchmarks import decode_profile

    # Enough tokens that the per-step time stands out of a busy machine's noise.
    assert decode_profile.main(["--onnx", "int4", "--preset", "tiny", "--vocab-size", "512",
                                "--new-tokens", "24", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "ONNX Runtime, int4 in-place export, 1 threads" in out
    # The step inside the loop (what the host work is measured against) and run alone.
    assert re.search(r"ORT run: +[0-9.]+ ms/step inside the loop \(host work around it "
                     r"-?[0-9.]+ ms/step, -?[0-9]+% of the loop\); [0-9.]+ ms run back to back",
                     out)
    summary = out.strip().splitlines()[-1]  # last: what the GPU suite's table reads
    assert re.search(r"^summary: loop .* ONNX Runtime's run [0-9.]+ ms: host -?[0-9.]+ "
                     r"ms/token", summary)
    for bad in (["--onnx", "int4", "--device", "cuda"], ["--new-tokens", "1"]):
        with pytest.raises(SystemExit) as err:
            decode_profile.main(bad)
        assert err.value.code == 2


def test_generate_headline_names_every_path_and_its_ratio_to_hf():
    from vesper_sdk.benchmarks.suite import generate_headline

    row = {"batch": 1, "vesper": {"tok_s_best": 120.0}, "vesper-onnx": {"tok_s_best": 150.0},
           "vesper-compiled": {"tok_s_best": 140.0}, "hf-gpt2": {"tok_s_best": 100.0}}
    assert generate_headline({"rows": [row]}) == (
        "batch 1: 120 tok/s vs HF 100 (1.20x), compiled 140 (1.40x), via ONNX Runtime 150 "
        "(1.50x)")


def test_quantized_headline_gives_the_int4_ratios_to_gpt2_both_ways():
    from vesper_sdk.benchmarks.suite import quantized_headline

    rows = [{"variant": "fp32", "perplexity": 2.0, "size_mb": 12.0, "decode_tok_s": 900.0},
            {"variant": "onnx-int4", "perplexity": 2.01, "perplexity_delta_pct": 0.5,
             "size_ratio": 0.25, "decode_tok_s": 4800.0, "speedup_vs_gpt2_generate": 4.61,
             "speedup_vs_gpt2_loop": 3.59}]
    headline = quantized_headline({"rows": rows})
    assert headline.endswith("onnx-int4 vs HF GPT-2: 4.61x generate() through the API, "
                             "3.59x bare loops")
    # Without transformers there is no baseline, and the headline says nothing of one.
    del rows[1]["speedup_vs_gpt2_generate"]
    assert "GPT-2" not in quantized_headline({"rows": rows})


def test_train_step_benchmark_times_the_chunked_head_beside_the_full_logits(tmp_path):
    from vesper_sdk.benchmarks import train_step

    out = tmp_path / "ts.json"
    assert train_step.main(["--quick", "--vocab", "512", "--steps", "1", "--warmup", "0",
                            "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["rows"]] == ["seed-style", "ours-full-logits", "ours"]
    # The same model, data and seed: the heads differ in how, not what, they compute.
    losses = [r["final_loss"] for r in report["rows"]]
    assert abs(losses[1] - losses[2]) < 1e-4 * abs(losses[1])
    assert train_step.main(["--quick", "--vocab", "512", "--steps", "1", "--warmup", "0",
                            "--device", "cpu", "--variants", "ours", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["rows"]] == ["ours"] and report["speedup"] is None
    with pytest.raises(SystemExit):
        train_step.main(["--variants", "nope"])
