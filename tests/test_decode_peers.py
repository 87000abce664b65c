"""benchmarks/decode_peers.py without its peers: arguments, byte counts, ratios, the table,
and the suite's handling of its venv (the real run is `make peers-check`)."""

from __future__ import annotations

import struct

import pytest

from vesper_sdk.benchmarks import decode_peers as dp
from vesper_sdk.benchmarks import suite


def test_arguments_default_to_the_issue_setting_and_check_paths():
    a = dp.parse_args([])
    assert (a.rounds, a.batch_sizes, a.prompt_len, a.new_tokens, a.threads) == (7, [1, 8], 32,
                                                                                   128, 2)
    assert a.path_names == list(dp.PATHS) and len(dp.PATHS) == 22 and dp.WORKER.is_file()
    q = dp.parse_args(["--quick", "--paths", "vesper-eager, ct2-int8"])
    assert (q.rounds, q.batch_sizes, q.new_tokens) == (2, [1], 16)
    assert q.path_names == ["vesper-eager", "ct2-int8"]
    with pytest.raises(SystemExit):
        dp.parse_args(["--paths", "vllm"])
    with pytest.raises(SystemExit):
        dp.parse_args(["--batches", "0"])


def test_weight_bytes_leave_out_tables_only_gathered_from():
    nodes = [("Gather", ["embed", "ids"]), ("MatMul", ["x", "w"]), ("MatMulNBits", ["y", "q"]),
             ("GatherBlockQuantized", ["qembed", "ids"])]
    assert dp.onnx_read_bytes({"embed": 100, "w": 10, "q": 5, "qembed": 7}, nodes) == 15
    # tied: the table is also the LM head's weight, read in full every step
    assert dp.onnx_read_bytes({"embed": 100, "w": 10},
                              [*nodes[:1], ("MatMul", ["h", "embed"]), nodes[1]]) == 110
    assert dp.gguf_read_bytes({"token_embd.weight": 100, "blk.0.attn_q.weight": 3}) == 103
    assert dp.gguf_read_bytes({"token_embd.weight": 100, "output.weight": 100, "b": 3}) == 103
    variables = {"decoder/embeddings/weight": 100, "decoder/layer_0/w": 9}
    assert dp.ct2_read_bytes(variables, {}) == 9
    assert dp.ct2_read_bytes(variables, {"decoder/projection/weight":
                                         "decoder/embeddings/weight"}) == 109


def test_ctranslate2_model_bin_is_read(tmp_path):
    def string(s: str) -> bytes:
        return struct.pack("H", len(s) + 1) + s.encode() + b"\0"

    body = struct.pack("I", 6) + string("TransformerDecoderModelSpec") + struct.pack("I", 1)
    body += struct.pack("I", 2)
    for name, shape in (("decoder/embeddings/weight", (4, 2)), ("decoder/w", (3,))):
        data = bytes(4 * (shape[0] * (shape[1] if len(shape) > 1 else 1)))
        body += string(name) + struct.pack("B", len(shape))
        body += b"".join(struct.pack("I", d) for d in shape)
        body += struct.pack("B", 0) + struct.pack("I", len(data)) + data
    body += struct.pack("I", 1) + string("decoder/projection/weight")
    body += string("decoder/embeddings/weight")
    (tmp_path / "model.bin").write_bytes(body)
    variables, aliases = dp.read_ct2(tmp_path / "model.bin")
    assert variables == {"decoder/embeddings/weight": 32, "decoder/w": 12}
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}


def test_rows_ratios_and_table_from_fake_timings():
    runs = {"vesper-eager": {1: [50.0, 40.0, 60.0], 8: [200.0, 220.0, 210.0]},
            "llama.cpp-q4_0": {1: [100.0, 100.0, 90.0], 8: [400.0, 330.0, 420.0]}}
    rows = dp.summarize(runs, "vesper-eager", [1, 8], {"llama.cpp-q4_0": 32_000_000}, 20.0)
    by = {(r["path"], r["batch"]): r for r in rows}
    ref, q4 = by["vesper-eager", 1], by["llama.cpp-q4_0", 1]
    assert ref["tok_s_median"] == 50.0 and ref["tok_s_best"] == 60.0 and "ratio_median" not in ref
    # per-round ratios 2.0, 2.5, 1.5: their median, not the ratio of medians (100 / 50)
    assert (q4["ratio_median"], q4["ratio_min"], q4["ratio_max"]) == (2.0, 1.5, 2.5)
    assert q4["weight_gbs"] == pytest.approx(100 * 32e6 / 1e9) and q4["pct_of_bw"] == 16.0
    assert q4["bw_bound_tok_s"] == 625.0
    q8 = by["llama.cpp-q4_0", 8]  # 8 tokens per read of the weights
    assert q8["ratio_median"] == 2.0 and q8["weight_gbs"] == pytest.approx(400 / 8 * 0.032)
    paths = {"vesper-eager": {"status": "ok"}, "llama.cpp-q4_0": {"status": "ok"},
             "ct2-int8": {"status": "not installed", "error": "pip said\nno wheel for ct2"}}
    table = dp.render_table(rows, paths, "vesper-eager")
    assert "| llama.cpp-q4_0 | 1 | 100.0 | 100.0 | 2.00 [1.50-2.50] | 32.0 |" in table
    assert "| ct2-int8 | not installed | no wheel for ct2 |" in table
    assert dp.headline(rows, "vesper-eager").startswith("batch 1: llama.cpp-q4_0 100")


def test_against_peers_pairs_the_fastest_of_each_side_round_by_round():
    runs = {"vesper-onnx-int4": {1: [80.0, 90.0, 70.0]},
            "vesper-onnx-int4-inplace": {1: [100.0, 60.0, 110.0]},
            "ort-genai-int4": {1: [200.0, 100.0, 220.0]},
            "llama.cpp-q4_0": {1: [150.0, 150.0, 150.0]},
            "vesper-eager": {1: [50.0, 50.0, 50.0]}}  # fp32: no peer ran, no row
    rows = dp.against_peers(runs, [1])
    assert len(rows) == 1
    r = rows[0]
    assert (r["precision"], r["vesper"], r["peer"]) == ("int4", "vesper-onnx-int4-inplace",
                                                        "ort-genai-int4")
    # per-round 0.5, 0.6, 0.5: their median, not 100 / 200 from the medians
    assert (r["ratio_median"], r["ratio_min"], r["ratio_max"]) == (0.5, 0.5, 0.6)
    assert "| int4 | 1 | vesper-onnx-int4-inplace | ort-genai-int4 | 0.50 [0.50-0.60] |" in (
        dp.render_against_peers(rows))
    assert [dp.precision(n) for n in ("llama.cpp-q8_0", "ct2-fp32", "vesper-compiled")] == [
        "int8", "fp32", "fp32"]
    # vesper's export in onnxruntime-genai's bare loop (no MetaHead outputs read) is a
    # measurement, neither side; through vesper's API (runtime="genai") it is vesper's.
    runs["vesper-onnx-int4-inplace-genai"] = {1: [300.0, 300.0, 300.0]}
    r = dp.against_peers(runs, [1])[0]
    assert (r["vesper"], r["peer"]) == ("vesper-onnx-int4-inplace", "ort-genai-int4")
    runs["vesper-onnx-int4-runtime-genai"] = {1: [120.0, 120.0, 120.0]}
    r = dp.against_peers(runs, [1])[0]
    assert (r["vesper"], r["peer"]) == ("vesper-onnx-int4-runtime-genai", "ort-genai-int4")


def test_a_peer_that_did_not_install_is_reported_with_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(dp.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(dp.importlib.util, "find_spec", lambda name: None)
    (tmp_path / "install-llama-cpp-python.log").write_text("Building wheel\nerror: cmake\n")
    why = dp.install_error("llama.cpp")
    assert "llama-cpp-python is not installed" in why and why.endswith("error: cmake")
    assert "make peers-check" in dp.install_error("ctranslate2")
    assert dp.install_error("vesper") is None


def test_suite_skips_it_without_its_venv(monkeypatch, tmp_path):
    spec = suite.BENCHMARKS["decode_peers"]
    assert not spec.default and not spec.device_arg and spec.resolve() is not None
    monkeypatch.setattr(spec, "interpreter", lambda: (None, "no .venv-peers here"))
    rec = suite.run_benchmark(spec, "quick", "cpu", echo=False)
    assert (rec.status, rec.error) == ("skipped", "no .venv-peers here")
    assert rec.command.endswith("decode_peers.py --quick")
    text = suite.summary_markdown([rec])
    assert "## Skipped" in text and "## Failures" not in text
