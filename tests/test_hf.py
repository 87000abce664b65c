"""transformers integration (issue #24): Auto classes, generate(), the chat template,
tokenizer files and the model card, on the tiny model folder the SDK writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import vesper_sdk as vs
from vesper_sdk.hf.card import parse_front_matter, update_model_card
from vesper_sdk.integrity import forget_verified, require_intact

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from vesper_sdk.hf.config import VesperHFConfig  # noqa: E402
from vesper_sdk.hf.modeling import VesperForCausalLM  # noqa: E402

CHATS = [
    [{"role": "system", "content": "You add numbers."},
     {"role": "user", "content": "What is 12+30?"},
     {"role": "assistant", "content": "42"},
     {"role": "user", "content": "and the cat sat on 7 mats?"}],
    [{"role": "system", "content": ""},
     {"role": "user", "content": "  two  blue\nbirds\t sang "},
     {"role": "assistant", "content": "été 🐦 — ok"},
     {"role": "user", "content": "<|user without close"}],
    [{"role": "user", "content": "the red car"}],
]


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def hf_tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_auto_classes_load_the_folder(tiny_model_dir, hf_model):
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    assert isinstance(cfg, VesperHFConfig) and cfg.to_vesper() == vs.VesperLM.from_pretrained(
        tiny_model_dir).config
    assert isinstance(hf_model, VesperForCausalLM) and not hf_model.training
    data = json.loads((tiny_model_dir / "config.json").read_text())
    assert data["auto_map"]["AutoModelForCausalLM"] == "modeling_vesper.VesperForCausalLM"
    assert (tiny_model_dir / "modeling_vesper.py").is_file()


def test_auto_logits_equal_vesperlm(tiny_model_dir, hf_model):
    ref = vs.VesperLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(1)
    ids = torch.randint(7, ref.config.vocab_size, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        want = ref(ids, attention_mask=mask)
        got = hf_model(input_ids=ids, attention_mask=mask)
    diff = (got.logits - want.logits).abs().max().item()
    print(f"max |logits diff| AutoModelForCausalLM vs VesperLM: {diff:.3g}")
    assert diff <= 1e-5
    assert torch.equal(got.confidence, want.confidence) and torch.equal(got.stop, want.stop)


def test_trust_remote_code_uses_auto_map(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, trust_remote_code=True)
    assert type(model).__name__ == "VesperForCausalLM"
    ids = torch.tensor([[1, 20, 30]])
    with torch.no_grad():
        want = vs.VesperLM.from_pretrained(tiny_model_dir).eval()(ids).logits
        assert (model(ids).logits - want).abs().max().item() <= 1e-5


def test_generate_greedy_uses_the_cache(tiny_model_dir, hf_model):
    ref = vs.VesperLM.from_pretrained(tiny_model_dir).eval()
    prompt = torch.tensor([[ref.config.bos_token_id, 40, 41, 42, 43]])
    seen = []
    hook = hf_model.vesper.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].shape))
    try:
        out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                max_new_tokens=10, min_new_tokens=10, do_sample=False)
    finally:
        hook.remove()
    assert seen[0][1] == 5 and all(s[1] == 1 for s in seen[1:])  # prefill, then cached steps
    ids = prompt
    with torch.no_grad():
        for _ in range(10):
            logits = ref(ids).logits[:, -1]
            logits[:, ref.config.eos_token_id] = -float("inf")  # as min_new_tokens does
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    assert out.tolist() == ids.tolist()


def test_generate_sampled_and_batched(hf_model, hf_tok):
    enc = hf_tok(["the cat", "seven dogs ran past one red car"], return_tensors="pt",
                 padding=True)
    torch.manual_seed(0)
    a = hf_model.generate(**enc, max_new_tokens=6, do_sample=True, top_k=20)
    torch.manual_seed(0)
    b = hf_model.generate(**enc, max_new_tokens=6, do_sample=True, top_k=20)
    assert a.tolist() == b.tolist() and a.shape[0] == 2
    # Left-padded batch rows decode as they would alone (greedy).
    batch = hf_model.generate(**enc, max_new_tokens=6, do_sample=False)
    for row, text in enumerate(["the cat", "seven dogs ran past one red car"]):
        alone = hf_model.generate(**hf_tok(text, return_tensors="pt"), max_new_tokens=6,
                                  do_sample=False)
        assert batch[row, enc["input_ids"].shape[1]:].tolist() == \
            alone[0, alone.shape[1] - 6:].tolist()[:batch.shape[1] - enc["input_ids"].shape[1]]


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chat_template_equals_encode_chat(tiny_tokenizer, hf_tok, chat, gen):
    want = tiny_tokenizer.encode_chat(CHATS[chat], add_generation_prompt=gen).ids
    got = hf_tok.apply_chat_template(CHATS[chat], add_generation_prompt=gen, tokenize=True,
                                     return_dict=True)["input_ids"]
    assert got == want


def test_spelled_special_tokens_differ_as_documented(tiny_tokenizer, hf_tok):
    msgs = [{"role": "user", "content": "hi <|eos|> there"}]
    sdk = tiny_tokenizer.encode_chat(msgs).ids
    hf = hf_tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    assert sdk.count(tiny_tokenizer.eos_id) == 1  # the SDK keeps the user's text as text
    assert hf.count(tiny_tokenizer.eos_id) == 2  # transformers makes it the control token


def test_tokenizer_matches_sdk_plain_prompts(tiny_tokenizer, hf_tok):
    text = "the cat sat on 123 mats"
    assert hf_tok(text)["input_ids"] == tiny_tokenizer.encode(text, add_bos=True)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
        tiny_tokenizer.bos_id, tiny_tokenizer.eos_id, tiny_tokenizer.pad_id)
    assert hf_tok.model_max_length == 256


def test_generate_text_equals_sdk_chat(tiny_model_dir, hf_model, hf_tok):
    lm = vs.load(tiny_model_dir, device="cpu")
    for messages in CHATS:
        want = lm.chat(messages, temperature=0.0, max_new_tokens=24)
        enc = hf_tok.apply_chat_template(messages, add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)
        out = hf_model.generate(**enc, max_new_tokens=24, do_sample=False)
        got = hf_tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert got == want


def test_folder_files_are_in_the_manifest(tiny_model_dir):
    forget_verified()
    require_intact(tiny_model_dir)
    manifest = json.loads((tiny_model_dir / "manifest.json").read_text())["files"]
    for name in ("README.md", "tokenizer_config.json", "special_tokens_map.json",
                 "modeling_vesper.py"):
        assert name in manifest


def test_model_card_front_matter_and_sections(make_tiny_model_dir):
    folder = make_tiny_model_dir()
    meta, body = parse_front_matter((folder / "README.md").read_text())
    assert meta["library_name"] == "vesper-sdk" and meta["license"] == "apache-2.0"
    assert "vesperlm" in meta["tags"] and "metrics" in meta
    assert "## Model" in body and "Parameters" in body and "## Use" in body
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nMy notes.\n")
    vs.VesperTokenizer.from_file  # noqa: B018 (the user's edit is accepted below)
    subprocess.run([sys.executable, "-m", "vesper_sdk.cli", "verify", str(folder), "--update"],
                   capture_output=True)
    update_model_card(folder, "Evaluation", {"Perplexity": 12.5}, {"metrics": ["perplexity"]})
    update_model_card(folder, "Evaluation", {"Perplexity": 11.0}, {"metrics": ["perplexity"]})
    text = (folder / "README.md").read_text()
    assert text.count("## Evaluation") == 1 and "| Perplexity | 11 |" in text
    assert text.index("## Evaluation") < text.index("## Use") and "My notes." in text
    assert parse_front_matter(text)[0]["metrics"] == ["perplexity"]
    # Saving again refreshes the Model section and keeps the rest.
    vs.VesperLM.from_pretrained(folder).save_pretrained(folder)
    again = (folder / "README.md").read_text()
    assert "| Perplexity | 11 |" in again and again.count("## Model") == 1
    forget_verified()
    require_intact(folder)


def test_eval_command_updates_the_card(make_tiny_model_dir, tmp_path):
    from vesper_sdk.eval.report import EvalOptions, cli

    folder = make_tiny_model_dir()
    data = tmp_path / "held.txt"
    data.write_text("the cat sat on a mat while seven dogs ran past\n" * 8)
    cli(EvalOptions(model_dir=str(folder), data=str(data), out_dir=str(tmp_path / "ev"),
                    device="cpu"))
    text = (folder / "README.md").read_text()
    assert "## Evaluation" in text and "Perplexity" in text
    forget_verified()
    require_intact(folder)


def test_import_without_transformers(tmp_path):
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import vesper_sdk as vs\n"
            "cfg = vs.VesperConfig.from_preset('tiny', vocab_size=300, num_layers=1)\n"
            f"vs.VesperLM(cfg).save_pretrained({str(tmp_path / 'm')!r})\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert (tmp_path / "m" / "README.md").is_file()


def test_import_is_lazy_about_transformers():
    code = ("import sys, vesper_sdk\n"
            "assert 'transformers' not in sys.modules, 'imported eagerly'\n"
            "from transformers import AutoConfig, AutoModelForCausalLM\n"
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
            "assert CONFIG_MAPPING['vesper'].__name__ == 'VesperHFConfig'\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_folder_with_an_answer_mlp_loads_through_the_auto_classes(make_tiny_model_dir,
                                                                      tmp_path):
    """Calibration may give the MetaHead an answer MLP: its config field and weights
    load through AutoModelForCausalLM as through the SDK."""
    folder = make_tiny_model_dir()
    model = vs.VesperLM.from_pretrained(folder)
    model.set_answer_mlp(8)
    with torch.no_grad():
        for p in model.metahead.answer_mlp.parameters():
            p.normal_()
    model.save_pretrained(tmp_path / "m", extra_files={"tokenizer.json": folder / "tokenizer.json"})
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert hf.config.metahead_answer_hidden == 8
    ids = torch.randint(7, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).confidence, model.eval()(ids).confidence)
    state = {k.split("model.", 1)[-1]: v for k, v in hf.state_dict().items()}
    mlp = {k: v for k, v in state.items() if ".answer_mlp." in k}
    assert len(mlp) == 4 and all(torch.equal(v, model.state_dict()[k.split("vesper.", 1)[-1]])
                                 for k, v in mlp.items())


def test_a_folder_older_than_a_config_field_loads_as_the_sdk_loads_it(make_tiny_model_dir,
                                                                       tmp_path):
    """A config.json written before ``metahead_logit_features`` existed (its MetaHead read
    the hidden state alone) gets the SDK's reading of it through the Auto classes, not
    today's default; the answer check travels in the config as any field."""
    from vesper_sdk.atomic import write_manifest

    folder = make_tiny_model_dir()
    cfg = vs.VesperLM.from_pretrained(folder).config.to_dict()
    cfg.update(metahead_logit_features=False, metahead_answer_check=[1.0, -0.5, 0.8, 0.1])
    torch.manual_seed(0)
    model = vs.VesperLM(vs.VesperConfig(**cfg))
    model.save_pretrained(tmp_path / "m", extra_files={"tokenizer.json": folder / "tokenizer.json"})
    path = tmp_path / "m" / "config.json"
    data = json.loads(path.read_text())
    del data["metahead_logit_features"]
    path.write_text(json.dumps(data))
    write_manifest(tmp_path / "m")
    hf_cfg = AutoConfig.from_pretrained(tmp_path / "m")
    assert hf_cfg.metahead_logit_features is False
    assert hf_cfg.metahead_answer_check == [1.0, -0.5, 0.8, 0.1]
    assert hf_cfg.to_vesper() == vs.VesperLM.from_pretrained(tmp_path / "m").config
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(7, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).confidence, model.eval()(ids).confidence)
