"""`make lmeval-check`: EleutherAI's lm-evaluation-harness against a running `vesper serve`.

Run by the lm_eval venv's python (``.venv-lmeval/bin/python tests/lmeval/run_check.py``); the
server runs from the project's venv (``.venv/bin/vesper``), so neither needs the other's
packages. Offline throughout: the tasks' data are the JSONL files beside this script, the
tokenizer is the server's own (``tokenizer_backend=remote``: GET /tokenizer_info, POST /tokenize),
and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE are set for lm_eval.

1. ``--model local-completions`` on ``vesper_add_mc`` (multiple_choice: "3+4=", four digits):
   lm_eval scores each choice with ``/v1/completions`` ``echo: true, logprobs: 1,
   max_tokens: 1`` on token ids, four prompts a request. Each choice is one token, so this
   script cross-checks lm_eval's numbers against the server's decode path: a plain
   ``max_tokens: 1, logprobs: 5`` request on the context gives the greedy token and the top-5
   log-probabilities at that position, which must equal the echoed log-probabilities that
   lm_eval summed (and agree with its is_greedy).
2. ``--model local-chat-completions --apply_chat_template`` on ``vesper_chat_gen``
   (generate_until) through ``/v1/chat/completions``.
3. ``--model hf`` (transformers' AutoModelForCausalLM through the folder's ``auto_map``,
   ``trust_remote_code=True``, vesper-sdk importable from the repo root) on both tasks, on a
   copy of the model folder written by the SDK (tokenizer_config.json with the chat template):
   each choice's log-probability must equal the local-completions run's, and each generated
   answer the chat-completions run's.

Exits 1 when lm_eval fails, a result or metric is missing, or a check does not hold; the
output folder is kept then (its path is printed, with lm_eval's and the server's logs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tests" / "lmeval" / "tasks"
MC_TASK, GEN_TASK = "vesper_add_mc", "vesper_chat_gen"
SERVED_NAME = "vesper-lmeval"
TOL = 1e-3  # |echo log-prob - decode log-prob|: the same forward, batched or not, in fp32
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class CheckFailed(Exception):
    pass


def describe(err: Exception) -> str:
    """A failed check's message, or the traceback of a bug in this script."""
    if isinstance(err, CheckFailed):
        return str(err)
    return "unexpected error:\n" + "".join(traceback.format_exception(err))


# ----------------------------------------------------------------------------- HTTP
def http(method: str, url: str, body: dict | None = None, timeout: float = 60.0
         ) -> tuple[int, object]:
    """(status, parsed JSON or raw text); a refused connection is status 0."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        return 0, str(err)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def expect(method: str, url: str, body: dict | None = None) -> dict:
    """The JSON of a 200 answer; anything else fails the check with the request shown."""
    status, out = http(method, url, body)
    if status != 200 or not isinstance(out, dict):
        sent = "" if body is None else " " + json.dumps(body)
        raise CheckFailed(f"{method} {url}{sent}\n  -> HTTP {status}: {str(out)[:600]}")
    return out


# ----------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(vesper: Path, model_dir: Path, port: int, log: Path, name: str | None
                 ) -> subprocess.Popen:
    cmd = [str(vesper), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning"]
    if name:
        cmd += ["--served-model-name", name]
    print("==> " + " ".join(cmd), flush=True)
    with open(log, "wb") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)


def wait_healthy(proc: subprocess.Popen, base: str, log: Path, limit: float = 120.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if proc.poll() is not None:
            raise CheckFailed(f"the server exited ({proc.returncode}) before /health:\n"
                              + tail(log))
        if http("GET", base + "/health", timeout=2)[0] == 200:
            return time.monotonic() - t0
        time.sleep(0.5)
    raise CheckFailed(f"GET /health not 200 within {limit:.0f} s:\n" + tail(log))


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and any children
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "  (no log)"
    return "\n".join("  | " + line for line in lines[-n:])


# ----------------------------------------------------------------------------- probes
def preflight(base: str, model: str) -> list[str]:
    """What lm_eval's local-completions needs, asked directly: failures come back as text."""
    problems = []
    try:
        info = expect("GET", base + "/tokenizer_info")
        if "eos_token" not in info:
            problems.append(f"GET {base}/tokenizer_info: no 'eos_token' key in {info}")
    except CheckFailed as err:
        problems.append(str(err))
    ids = None
    try:
        out = expect("POST", base + "/tokenize", {"prompt": "What is 2+3?",
                                                  "add_special_tokens": False})
        ids = out.get("tokens")
        if not (isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids)):
            problems.append(f"POST {base}/tokenize: 'tokens' is not a list of ids: {out}")
            ids = None
    except CheckFailed as err:
        problems.append(str(err))
    ids = ids or [10, 11, 12]  # without /tokenize: any ids, to see what echo says
    if ids:
        body = {"model": model, "prompt": [ids], "temperature": 0, "max_tokens": 1,
                "logprobs": 1, "seed": 1234, "echo": True}  # lm_eval's exact body
        try:
            out = expect("POST", base + "/v1/completions", body)
            lp = out["choices"][0]["logprobs"]
            n = len(lp["token_logprobs"])
            if n != len(ids) + 1 or len(lp["top_logprobs"]) != n:
                problems.append(
                    f"POST /v1/completions {json.dumps(body)}: echo must give one entry per "
                    f"prompt token plus the generated one ({len(ids) + 1}), got "
                    f"token_logprobs {n}, top_logprobs {len(lp['top_logprobs'])}")
        except CheckFailed as err:
            problems.append(str(err))
        except (KeyError, IndexError, TypeError) as err:
            problems.append(f"POST /v1/completions {json.dumps(body)}: no "
                            f"choices[0].logprobs.token_logprobs/top_logprobs ({err!r})")
    return problems


# ----------------------------------------------------------------------------- lm_eval
def run_lm_eval(args: list[str], log: Path, timeout: float) -> float:
    cmd = [sys.executable, "-m", "lm_eval", "run", *args]
    print("==> lm_eval " + " ".join(args), flush=True)
    env = {**os.environ, **OFFLINE, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OPENAI_API_KEY", None)
    t0 = time.monotonic()
    with open(log, "wb") as fh:
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"lm_eval ran past {timeout:.0f} s:\n{tail(log)}") from None
    if rc != 0:
        raise CheckFailed(f"lm_eval exited {rc}:\n{tail(log)}")
    return time.monotonic() - t0


def load_outputs(out: Path, task: str) -> tuple[dict, list[dict]]:
    results = sorted(out.rglob("results_*.json"))
    samples = sorted(out.rglob(f"samples_{task}_*.jsonl"))
    if not results or not samples:
        raise CheckFailed(f"{task}: no results_*.json / samples_{task}_*.jsonl under {out}")
    res = json.loads(results[-1].read_text())
    rows = [json.loads(line) for line in samples[-1].read_text().splitlines() if line.strip()]
    if task not in res.get("results", {}):
        raise CheckFailed(f"{task}: not in the results file's 'results': {list(res)}")
    return res["results"][task], rows


def metric(results: dict, name: str, task: str) -> float:
    value = results.get(f"{name},none")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) \
            or not 0.0 <= value <= 1.0:
        raise CheckFailed(f"{task}: metric {name!r} is {value!r}, want a number in [0, 1] "
                          f"(results: {results})")
    return float(value)


def ll_pair(resp: object) -> tuple[float, bool]:
    """One choice's filtered response: [logprob, is_greedy], which lm_eval logs as strings."""
    while isinstance(resp, list) and len(resp) == 1:
        resp = resp[0]
    try:
        value, greedy = resp  # type: ignore[misc]
        ll = float(value)
        greedy = {"True": True, "False": False, True: True, False: False}[greedy]
    except (TypeError, ValueError, KeyError):
        raise CheckFailed(f"a loglikelihood response is not [logprob, is_greedy]: {resp!r}"
                          ) from None
    if not math.isfinite(ll):
        raise CheckFailed(f"a loglikelihood is not finite: {resp!r}")
    return ll, greedy


def request_args(row: dict) -> list[tuple[str, str]]:
    """(context, continuation) of each request of a logged doc (a dict gen_args_i in 0.4.13)."""
    args = row["arguments"]
    if isinstance(args, dict):
        args = [args[k] for k in sorted(args, key=lambda k: int(k.rsplit("_", 1)[-1]))]
    return [(a["arg_0"], a["arg_1"]) if isinstance(a, dict) else (a[0], a[1]) for a in args]


def check_mc(base: str, model: str, rows: list[dict], limit: int) -> int:
    """Each choice of each doc against the server's decode path; returns exact comparisons."""
    if len(rows) != limit:
        raise CheckFailed(f"{MC_TASK}: {len(rows)} logged samples, want {limit}")
    compared = 0
    for row in rows:
        args, resps = request_args(row), row["filtered_resps"]
        if len(args) != len(row["doc"]["choices"]) or len(resps) != len(args):
            raise CheckFailed(f"{MC_TASK} doc {row['doc_id']}: {len(args)} requests, "
                              f"{len(resps)} responses for {row['doc']['choices']}")
        ctx = args[0][0]
        ctx_ids = expect("POST", base + "/tokenize",
                         {"prompt": ctx, "add_special_tokens": False})["tokens"]
        out = expect("POST", base + "/v1/completions",
                     {"model": model, "prompt": [ctx_ids], "max_tokens": 1, "temperature": 0,
                      "logprobs": 5})
        lp = out["choices"][0]["logprobs"]
        if not lp["tokens"]:
            continue  # the greedy token ended the text at once: nothing to compare with
        greedy_lp, top = lp["token_logprobs"][0], lp["top_logprobs"][0]
        greedy_ids = expect("POST", base + "/tokenize", {"prompt": ctx + lp["tokens"][0],
                                                         "add_special_tokens": False})["tokens"]
        for (_, cont), resp in zip(args, resps, strict=True):
            ll, is_greedy = ll_pair(resp)
            where = f"{MC_TASK} doc {row['doc_id']} {ctx!r} + {cont!r}"
            if ll > 0:
                raise CheckFailed(f"{where}: log-probability {ll} > 0")
            full = expect("POST", base + "/tokenize", {"prompt": ctx + cont,
                                                       "add_special_tokens": False})["tokens"]
            if full[:len(ctx_ids)] != ctx_ids:
                continue  # the context's tokens change with the continuation: no reference
            # the continuation's first token is at most as likely as the greedy one there
            if ll > greedy_lp + TOL:
                raise CheckFailed(f"{where}: lm_eval's log-probability {ll:.5f} (echo) beats "
                                  f"the greedy token {lp['tokens'][0]!r} at {greedy_lp:.5f} "
                                  "(decode): the echoed log-probs are not those of this position")
            if len(full) != len(ctx_ids) + 1:
                continue  # several tokens: the decode path gives only the first one's
            if full == greedy_ids and not is_greedy:
                raise CheckFailed(f"{where}: the greedy token, but lm_eval says is_greedy "
                                  f"False (echo top-1 differs from its own log-prob?)")
            if full != greedy_ids and is_greedy and ll < greedy_lp - TOL:
                raise CheckFailed(f"{where}: is_greedy True but {ll:.5f} < greedy "
                                  f"{greedy_lp:.5f}")
            ref = greedy_lp if full == greedy_ids else top.get(cont)
            if ref is not None:
                if abs(ll - ref) > TOL:
                    raise CheckFailed(f"{where}: lm_eval (echo) {ll:.5f} vs decode "
                                      f"{ref:.5f}: they must be the same number")
                compared += 1
    return compared


def check_gen(rows: list[dict], limit: int) -> list[str]:
    if len(rows) != limit:
        raise CheckFailed(f"{GEN_TASK}: {len(rows)} logged samples, want {limit}")
    answers = []
    for row in rows:
        resp = row["filtered_resps"]
        while isinstance(resp, list) and len(resp) == 1:
            resp = resp[0]
        if not isinstance(resp, str) or not resp.strip():
            raise CheckFailed(f"{GEN_TASK} doc {row['doc_id']}: empty or non-text response "
                              f"{resp!r} to {row['doc']['question']!r}")
        answers.append(f"{row['doc']['question']!r} -> {resp!r} (want {row['target']!r})")
    return answers


# ----------------------------------------------------------------------------- hf backend
def sdk_env() -> dict[str, str]:
    """lm_eval's environment with vesper-sdk importable (the repo root on PYTHONPATH)."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def run_hf(a: argparse.Namespace, out: Path) -> list[str]:
    """lm_eval --model hf on both tasks, checked against the server runs' samples."""
    folder = out / "hf-model"
    code = ("import sys, pathlib, vesper_sdk as vs\n"
            "src, dst = pathlib.Path(sys.argv[1]), sys.argv[2]\n"
            "vs.VesperLM.from_pretrained(src).save_pretrained(\n"
            "    dst, extra_files={'tokenizer.json': src / 'tokenizer.json'})\n")
    subprocess.run([sys.executable, "-c", code, str(a.model_dir), str(folder)], check=True,
                   env={**os.environ, **sdk_env()})
    # add_bos_token=False: the server run scores the context's tokens as they are (no BOS),
    # and the chat template writes its own BOS; by default the folder's tokenizer adds BOS.
    args = f"pretrained={folder},trust_remote_code=True,dtype=float32,add_bos_token=False"
    os.environ.update(sdk_env())
    lines = []
    secs = run_lm_eval(["--model", "hf", "--model_args", args, "--device", "cpu",
                        "--tasks", MC_TASK, "--include_path", str(TASKS), "--batch_size", "4",
                        "--limit", str(a.limit_mc), "--seed", "1234",
                        "--output_path", str(out / "hf-mc"), "--log_samples"],
                       out / "lm_eval_hf_mc.log", a.timeout)
    res, rows = load_outputs(out / "hf-mc", MC_TASK)
    acc = metric(res, "acc", MC_TASK)
    compared = 0
    if (out / "mc").is_dir():  # the server run's samples, when it ran
        _, ref_rows = load_outputs(out / "mc", MC_TASK)
        ref = {r["doc_id"]: r["filtered_resps"] for r in ref_rows}
        for row in rows:
            for mine, theirs in zip(row["filtered_resps"], ref.get(row["doc_id"], []),
                                    strict=False):
                (x, _), (y, _) = ll_pair(mine), ll_pair(theirs)
                if abs(x - y) > TOL:
                    raise CheckFailed(f"{MC_TASK} doc {row['doc_id']}: hf log-prob {x:.5f} vs "
                                      f"server {y:.5f}")
                compared += 1
    lines.append(f"{MC_TASK} (hf, {len(rows)} docs, {secs:.0f} s): acc {acc:.4f}; {compared} "
                 f"choice log-probs equal local-completions' (tol {TOL})")
    secs = run_lm_eval(["--model", "hf", "--model_args", args, "--device", "cpu",
                        "--apply_chat_template",
                        "--tasks", GEN_TASK, "--include_path", str(TASKS), "--batch_size", "1",
                        "--limit", str(a.limit_gen), "--seed", "1234",
                        "--output_path", str(out / "hf-gen"), "--log_samples"],
                       out / "lm_eval_hf_gen.log", a.timeout)
    res, rows = load_outputs(out / "hf-gen", GEN_TASK)
    em = metric(res, "exact_match", GEN_TASK)
    check_gen(rows, a.limit_gen)
    same = 0
    if (out / "gen").is_dir():
        _, ref_rows = load_outputs(out / "gen", GEN_TASK)
        ref = {r["doc_id"]: r["resps"] for r in ref_rows}
        for row in rows:
            if row["resps"] != ref.get(row["doc_id"]):
                raise CheckFailed(f"{GEN_TASK} doc {row['doc_id']}: hf answered "
                                  f"{row['resps']!r}, the server {ref.get(row['doc_id'])!r}")
            same += 1
    lines.append(f"{GEN_TASK} (hf, {len(rows)} docs, {secs:.0f} s): exact_match {em:.4f}; "
                 f"{same} answers equal the chat-completions run's")
    return lines


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=ROOT / "vesper_sdk/assets/default_model")
    p.add_argument("--vesper", type=Path, default=ROOT / ".venv/bin/vesper",
                   help="the `vesper` command that serves (default: the project's .venv)")
    p.add_argument("--out", type=Path, default=None,
                   help="keep lm_eval's output here (default: a temporary folder, removed "
                        "when every check passes)")
    p.add_argument("--limit-mc", type=int, default=16)
    p.add_argument("--limit-gen", type=int, default=8)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per lm_eval run")
    a = p.parse_args(argv)

    for path in (a.vesper, a.model_dir / "config.json"):
        if not path.exists():
            print(f"lmeval-check: {path} is missing (run `make setup` first?)", file=sys.stderr)
            return 2
    out = a.out or Path(tempfile.mkdtemp(prefix="vesper-lmeval-"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(OFFLINE)
    os.environ["HF_HOME"] = str(out / "hf")  # a fresh datasets cache: nothing comes from before

    t_start = time.monotonic()
    helptext = subprocess.run([str(a.vesper), "serve", "--help"], capture_output=True,
                              text=True).stdout
    name = SERVED_NAME if "--served-model-name" in helptext else None
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server_log = out / "server.log"
    failures: list[str] = []
    summary: list[str] = []
    proc = start_server(a.vesper, a.model_dir, port, server_log, name)
    try:
        up = wait_healthy(proc, base, server_log)
        models = [m.get("id") for m in expect("GET", base + "/v1/models").get("data", [])]
        if not models:
            raise CheckFailed("GET /v1/models lists no model")
        model = models[0]
        if name and model != name:
            raise CheckFailed(f"served with --served-model-name {name}, /v1/models says "
                              f"{models}")
        summary.append(f"server up in {up:.1f} s on port {port}, model id {model!r}"
                       + ("" if name else " (no --served-model-name flag yet)"))

        # 1. loglikelihood through local-completions
        problems = preflight(base, model)
        if problems:
            failures.append("local-completions prerequisites (lm_eval's requests, sent "
                            "directly):\n  " + "\n  ".join(problems))
        else:
            try:
                secs = run_lm_eval(
                    ["--model", "local-completions", "--model_args",
                     f"model={model},base_url={base}/v1/completions,tokenizer_backend=remote,"
                     "tokenized_requests=True,num_concurrent=1,max_retries=1,max_length=1024,"
                     "timeout=120",
                     "--tasks", MC_TASK, "--include_path", str(TASKS), "--batch_size", "4",
                     "--limit", str(a.limit_mc), "--seed", "1234",
                     "--output_path", str(out / "mc"), "--log_samples"],
                    out / "lm_eval_mc.log", a.timeout)
                res, rows = load_outputs(out / "mc", MC_TASK)
                acc, acc_norm = metric(res, "acc", MC_TASK), metric(res, "acc_norm", MC_TASK)
                compared = check_mc(base, model, rows, a.limit_mc)
                if compared == 0:
                    raise CheckFailed(f"{MC_TASK}: no choice could be compared with the "
                                      "decode path (none was the greedy token or in its top 5)")
                summary.append(
                    f"{MC_TASK} (local-completions, {len(rows)} docs x 4 choices, {secs:.0f} s): "
                    f"acc {acc:.4f}, acc_norm {acc_norm:.4f}; {compared} choice log-probs "
                    f"equal the decode path's (tol {TOL})")
            except Exception as err:  # noqa: BLE001 - the chat half still runs
                failures.append(describe(err))

        # 2. generate_until through local-chat-completions
        try:
            secs = run_lm_eval(
                ["--model", "local-chat-completions", "--model_args",
                 f"model={model},base_url={base}/v1/chat/completions,num_concurrent=2,"
                 "max_retries=1,timeout=120",
                 "--apply_chat_template", "--tasks", GEN_TASK, "--include_path", str(TASKS),
                 "--limit", str(a.limit_gen), "--seed", "1234",
                 "--output_path", str(out / "gen"), "--log_samples"],
                out / "lm_eval_gen.log", a.timeout)
            res, rows = load_outputs(out / "gen", GEN_TASK)
            em = metric(res, "exact_match", GEN_TASK)
            answers = check_gen(rows, a.limit_gen)
            if em == 0:
                raise CheckFailed(f"{GEN_TASK}: exact_match 0: the bundled model answers these "
                                  "in `vesper chat`; answers:\n  " + "\n  ".join(answers))
            summary.append(f"{GEN_TASK} (local-chat-completions, {len(rows)} docs, {secs:.0f} s):"
                           f" exact_match {em:.4f}\n    " + "\n    ".join(answers))
        except Exception as err:  # noqa: BLE001
            failures.append(describe(err))
    except Exception as err:  # noqa: BLE001 - the server is stopped and the reason shown
        failures.append(describe(err))
    finally:
        stop_server(proc)

    # 3. the same tasks through transformers (lm_eval's hf backend)
    try:
        summary += run_hf(a, out)
    except Exception as err:  # noqa: BLE001
        failures.append(describe(err))

    print("\n==> lmeval-check summary")
    for line in summary:
        print("  " + line)
    print(f"  took {time.monotonic() - t_start:.0f} s")
    if failures:
        print(f"\nlmeval-check FAILED ({len(failures)}):", file=sys.stderr)
        for f in failures:
            print("- " + f, file=sys.stderr)
        print(f"logs kept in {out} (server.log, lm_eval_*.log)", file=sys.stderr)
        return 1
    if a.out is None:
        shutil.rmtree(out, ignore_errors=True)
    print("lmeval-check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
