"""Chat templates and JSON datasets (src/data/chat_template, sft_dataset) against LLaMA-Factory
0.9.5 itself: the same rows go through its converters (data/converter.py) and processors
(SupervisedDatasetProcessor, PretrainDatasetProcessor) with the SmolLM2 tokenizer fixed by its
get_template_and_fix_tokenizer, and through our sft_probe; input_ids and labels must be equal
token for token, for every template name, one-turn, multi-turn, system, alpaca history,
train_on_prompt, mask_history, cutoff_len truncation, text (pre-training) rows and bad rows.

Then our prompt ids against transformers' tokenizer.apply_chat_template(tokenize=True) with a
real jinja template: SmolLM2's own (smollm2), llama-cpp-python's ChatML and Llama-3-Instruct
templates (chatml, qwen with an explicit system, llama3) and the jinja LLaMA-Factory writes for
its replace_jinja_template templates (default, alpaca). No real jinja is available offline for
llama2, mistral (llama-cpp-python's "mistral-instruct" is the older "[INST] x [/INST]" form that
LLaMA-Factory's template does not follow) or empty.

Environment: QLORA_SMOLLM2_DIR (default <repo>/.models/smollm2) and QLORA_LF_PATH, the folder(s)
holding llamafactory and its extra packages (default <repo>/.venv-extras; several joined by ':').
"""
import ast
import json
import os

import pytest

import llamafactory_ref
from conftest import binary, run

REPO = os.environ.get("QLORA_SOURCE_DIR") or os.path.join(os.path.dirname(__file__), "..", "..")
SMOL = os.environ.get("QLORA_SMOLLM2_DIR") or os.path.join(REPO, ".models", "smollm2")
TEMPLATES = ["default", "alpaca", "chatml", "qwen", "llama2", "llama3", "mistral", "smollm2", "empty"]


def _import_llamafactory():
    try:
        llamafactory_ref.load()
    except ImportError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module", autouse=True)
def _lf():
    if not os.path.exists(os.path.join(SMOL, "tokenizer.json")):
        pytest.fail(f"no SmolLM2 tokenizer in {SMOL} (set QLORA_SMOLLM2_DIR)")
    _import_llamafactory()


def lf_tokenizer_and_template(template, **data_kw):
    return llamafactory_ref.tokenizer_and_template(SMOL, template, **data_kw)


def lf_samples(rows, template, formatting, **data_kw):
    return llamafactory_ref.samples(SMOL, rows, template, formatting, **data_kw)


# ---- ours ----

def our_samples(tmp_path, rows, template, formatting, cutoff_len=None, train_on_prompt=False,
                mask_history=False, skip_bad=False):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    args = [binary("sft_probe"), SMOL, str(path), "--template", template, "--formatting", formatting]
    if cutoff_len is not None:
        args += ["--cutoff-len", str(cutoff_len)]
    if train_on_prompt:
        args.append("--train-on-prompt")
    if mask_history:
        args.append("--mask-history")
    if skip_bad:
        args.append("--skip-bad")
    lines = [json.loads(l) for l in run(args).stdout.splitlines()]
    return [(l["input_ids"], l["labels"]) for l in lines[:-1]], lines[-1]["report"]


def assert_same(tmp_path, rows, template, formatting, **kw):
    data_kw = {k: v for k, v in kw.items() if k in ("cutoff_len", "train_on_prompt", "mask_history")}
    want = lf_samples(rows, template, formatting, **data_kw)
    got, report = our_samples(tmp_path, rows, template, formatting, **kw)
    assert len(got) == len(want), f"{template}/{formatting} {kw}: {len(got)} samples, LLaMA-Factory {len(want)}"
    for i, ((gi, gl), (wi, wl)) in enumerate(zip(got, want)):
        assert gi == wi, f"{template}/{formatting} {kw} sample {i} input_ids:\n ours {gi}\n   LF {wi}"
        assert gl == wl, f"{template}/{formatting} {kw} sample {i} labels:\n ours {gl}\n   LF {wl}"
    return got, report


ALPACA = [
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    {"instruction": "Translate to German", "input": "Good morning, world.", "output": "Guten Morgen, Welt. Grüße 🙂",
     "system": "You translate."},
    {"instruction": "And now?", "input": "", "output": " It is 3 o'clock.\n",
     "history": [["What time is it?", "I do not know."], ["Guess.", "Noon"]]},
]
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello, how can I help?"}]},
    {"conversations": [{"from": "system", "value": "Be brief."},
                       {"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"},
                       {"from": "human", "value": "And 3+3?"}, {"from": "gpt", "value": "6, of course."},
                       {"from": "observation", "value": "{\"result\": 6}"}, {"from": "gpt", "value": "Confirmed."}]},
    {"system": "Row-level system.",
     "conversations": [{"from": "human", "value": "日本語で答えて"}, {"from": "gpt", "value": "はい、わかりました。"}]},
]
OPENAI = [
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."},
                  {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another."},
                  {"role": "assistant", "content": "Red."}]},
    {"messages": [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]},
]
TEXT = [{"text": "The quick brown fox jumps over the lazy dog."},
        {"text": "  Leading spaces, a tab\tand\nnew lines; ünïcödé ✓"}]


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_template_alpaca_and_sharegpt(tmp_path, template):
    assert_same(tmp_path, ALPACA, template, "alpaca")
    assert_same(tmp_path, SHAREGPT, template, "sharegpt")


def test_openai_messages(tmp_path):
    for template in ("smollm2", "llama3", "mistral"):
        assert_same(tmp_path, OPENAI, template, "openai")


@pytest.mark.parametrize("template", ["smollm2", "default", "llama2"])
def test_train_on_prompt(tmp_path, template):
    got, report = assert_same(tmp_path, SHAREGPT, template, "sharegpt", train_on_prompt=True)
    assert report["target_tokens"] == report["tokens"]


@pytest.mark.parametrize("template", ["smollm2", "llama2", "alpaca"])
def test_mask_history(tmp_path, template):
    assert_same(tmp_path, SHAREGPT, template, "sharegpt", mask_history=True)
    assert_same(tmp_path, ALPACA, template, "alpaca", mask_history=True)


@pytest.mark.parametrize("cutoff_len", [20, 33, 47])
@pytest.mark.parametrize("mask_history", [False, True])
def test_cutoff_len(tmp_path, cutoff_len, mask_history):
    # The short row 1 of SHAREGPT keeps every token; the long ones are cut by infer_seqlen.
    got, report = assert_same(tmp_path, SHAREGPT[1:], "smollm2", "sharegpt", cutoff_len=cutoff_len,
                              mask_history=mask_history)
    assert report["truncated"] >= 1
    assert all(len(ids) <= cutoff_len for ids, _ in got)
    assert_same(tmp_path, ALPACA, "llama3", "alpaca", cutoff_len=cutoff_len, mask_history=mask_history)


@pytest.mark.parametrize("template", ["smollm2", "chatml", "llama3", "empty"])
def test_text_rows(tmp_path, template):
    assert_same(tmp_path, TEXT, template, "text")
    got, report = assert_same(tmp_path, TEXT, template, "text", cutoff_len=7)
    assert report["truncated"] == 2 and all(len(ids) == 7 for ids, _ in got)


def test_bad_rows_are_the_rows_llamafactory_drops(tmp_path):
    """LLaMA-Factory silently drops rows with a wrong role order or an odd number of turns; with
    skip_bad we skip exactly those, and report each with its line."""
    rows = [SHAREGPT[0],
            {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
            {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                               {"from": "human", "value": "c"}]},
            {"conversations": [{"from": "human", "value": "a"}, {"from": "system", "value": "b"}]},
            SHAREGPT[1]]
    got, report = assert_same(tmp_path, rows, "smollm2", "sharegpt", skip_bad=True)
    assert (report["rows_read"], report["samples"], report["skipped"]) == (5, 2, 3)
    assert [b.split(": ")[0].rsplit(":", 1)[1] for b in report["first_bad"]] == ["2", "3", "4"]


# ---- prompt ids against transformers' apply_chat_template with real jinja templates ----

def _llama_cpp_templates():
    """The chat template strings of llama-cpp-python's llama_chat_format.py (0.3.36), which
    scripts/setup.sh takes from its source distribution into <extras>/chat_templates, read as
    text (never imported)."""
    path = os.path.join(llamafactory_ref.LF_PATH, "chat_templates", "llama_chat_format.py")
    if not os.path.isfile(path):
        pytest.fail(f"{path} is missing: scripts/setup.sh puts it there")
    consts = {}
    for node in ast.parse(open(path, encoding="utf-8").read()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    consts[t.id] = node.value.value
    return consts


CONVERSATIONS = [
    {"system": "You are a helpful assistant.",
     "messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]},
    {"system": "Answer in one word.",
     "messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"},
                  {"role": "user", "content": "Of Italy? Grüße"}, {"role": "assistant", "content": "Rome 🙂"}]},
]


# Templates whose prompt ends in plain text ("...<|end_header_id|>\n\n", "### Response:\n"):
# there ids differ from the jinja's at each prompt/answer seam inside the text compared, so only
# the first prompt (no seam inside) is compared token for token, the rest as decoded text.
PROMPT_ENDS_IN_TEXT = {"llama3", "alpaca"}


def _jinja_ids(tok, chat_template, messages, add_generation_prompt):
    out = tok.apply_chat_template(messages, chat_template=chat_template, tokenize=True,
                                  add_generation_prompt=add_generation_prompt)
    if not isinstance(out, list):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def _jinja_cases():
    consts = _llama_cpp_templates()
    cases = [("smollm2", None)]  # None: the tokenizer's own chat_template.jinja
    cases += [("chatml", consts["CHATML_CHAT_TEMPLATE"]), ("qwen", consts["CHATML_CHAT_TEMPLATE"])]
    cases.append(("llama3", consts["LLAMA3_INSTRUCT_CHAT_TEMPLATE"]))
    cases += [("default", "llamafactory"), ("alpaca", "llamafactory")]
    return cases


@pytest.mark.parametrize("template,jinja", [pytest.param(t, j, id=t) for t, j in _jinja_cases()])
def test_prompt_ids_match_apply_chat_template(tmp_path, template, jinja):
    tok, _, _ = lf_tokenizer_and_template(template)  # LLaMA-Factory's fixed tokenizer (EOS, stop words)
    if jinja == "llamafactory":  # the jinja its fix_jinja_template wrote into the tokenizer
        jinja = tok.chat_template
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(CONVERSATIONS, ensure_ascii=False), encoding="utf-8")
    lines = run([binary("sft_probe"), SMOL, str(path), "--template", template, "--encode-only"]).stdout.splitlines()
    assert len(lines) == len(CONVERSATIONS)
    for conv, line in zip(CONVERSATIONS, lines):
        pairs = json.loads(line)["pairs"]
        messages = [{"role": "system", "content": conv["system"]}] + conv["messages"]
        whole = [i for p, a in pairs for i in p + a]
        jinja_whole = _jinja_ids(tok, jinja, messages, False)
        if template in PROMPT_ENDS_IN_TEXT:
            # LLaMA-Factory encodes prompt and answer apart, so "\n\n" + "Paris" is two pieces
            # ("\n\n" one token) where the jinja string is encoded at once ("\n", "\nParis" ...):
            # the same text, other ids at that seam. We follow LLaMA-Factory (tests above).
            assert tok.decode(whole) == tok.decode(jinja_whole), f"{template}: whole conversation text differs"
        else:
            assert whole == jinja_whole, f"{template}: whole conversation differs"
        # every prompt up to the generation prompt
        prompt = []
        for t, (p, a) in enumerate(pairs):
            prompt += p
            want = _jinja_ids(tok, jinja, messages[: 2 + 2 * t], True)
            if t == 0 or template not in PROMPT_ENDS_IN_TEXT:
                assert prompt == want, f"{template}: prompt of turn {t}:\n ours {prompt}\n jinja {want}"
            else:  # the earlier answers hold the seam described above
                assert tok.decode(prompt) == tok.decode(want), f"{template}: prompt text of turn {t} differs"
            prompt += a
