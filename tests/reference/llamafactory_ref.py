"""LLaMA-Factory 0.9.5 as a reference for the dataset tests: imports its data modules from the
target directory that scripts/setup.sh fills (env QLORA_LF_PATH, default <repo>/.venv-extras),
which holds llamafactory and datasets without touching the venv's torch/transformers/peft."""
import importlib
import os
import sys
import types

LF_PATH = os.environ.get("QLORA_LF_PATH") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", ".venv-extras")


def load():
    """Returns the module llamafactory.data after putting LF_PATH on sys.path. Raises
    ImportError (with what to run) when the directory is missing."""
    path = os.path.realpath(LF_PATH)
    if not os.path.isdir(os.path.join(path, "llamafactory")):
        raise ImportError(f"LLaMA-Factory not found in {path} (env QLORA_LF_PATH); "
                          "run scripts/setup.sh, which installs it there")
    if path not in sys.path:
        sys.path.insert(0, path)
    # We never use audio, but llamafactory.data.mm_plugin imports torchaudio at module level and
    # torchaudio has no wheel for our torch: a placeholder module stands in for it. transformers is
    # imported first so that its cached is_torchaudio_available() reads the real (absent) package
    # rather than find_spec() on a placeholder without a spec (which raises ValueError).
    import transformers.utils.import_utils as tiu
    tiu.is_torchaudio_available()
    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    return importlib.import_module("llamafactory.data")


def template(name):
    """LLaMA-Factory's Template registered as name (e.g. "qwen", "llama3", "empty")."""
    load()
    from llamafactory.data.template import TEMPLATES
    return TEMPLATES[name]


def supervised_processor():
    """The class llamafactory.data.processor.supervised.SupervisedDatasetProcessor."""
    load()
    from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
    return SupervisedDatasetProcessor



def tokenizer_and_template(model_dir, template, **data_kw):
    """A transformers tokenizer of model_dir fixed by LLaMA-Factory's get_template_and_fix_tokenizer,
    the template, and the data_args it read."""
    load()
    from transformers import AutoTokenizer
    from llamafactory.data.template import get_template_and_fix_tokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    # DataArguments' defaults for the fields the template, converters and processors read (its
    # module pulls in llamafactory.hparams, which needs omegaconf and more that we do not use).
    fields = dict(template=template, cutoff_len=2048, train_on_prompt=False, mask_history=False,
                  tool_format=None, default_system=None, enable_thinking=True, preserve_thinking=False,
                  packing=False, neat_packing=False, media_dir=None, streaming=False)
    fields.update(data_kw)
    data_args = types.SimpleNamespace(**fields)
    return tok, get_template_and_fix_tokenizer(tok, data_args), data_args


def dataset_attr(formatting):
    """The dataset_info.json entry a user writes for each of our formattings."""
    from llamafactory.data.parser import DatasetAttr
    if formatting == "alpaca":
        attr = DatasetAttr("file", "t", formatting="alpaca")
        attr.system, attr.history = "system", "history"
    elif formatting == "sharegpt":
        attr = DatasetAttr("file", "t", formatting="sharegpt")
        attr.system = "system"
    elif formatting == "openai":  # LLaMA-Factory's documented OpenAI-style sharegpt tags
        attr = DatasetAttr("file", "t", formatting="sharegpt")
        attr.messages, attr.system = "messages", "system"
        attr.role_tag, attr.content_tag = "role", "content"
        attr.user_tag, attr.assistant_tag, attr.system_tag = "user", "assistant", "system"
    elif formatting == "text":  # pre-training: {"columns": {"prompt": "text"}}
        attr = DatasetAttr("file", "t", formatting="alpaca")
        attr.prompt, attr.query, attr.response = "text", None, None
    else:
        raise ValueError(formatting)
    return attr


def samples(model_dir, rows, template, formatting, **data_kw):
    """LLaMA-Factory's (input_ids, labels) of each row: its converter for `formatting`, then
    SupervisedDatasetProcessor (PretrainDatasetProcessor for text)."""
    load()
    from llamafactory.data.converter import get_dataset_converter
    from llamafactory.data.processor import PretrainDatasetProcessor, SupervisedDatasetProcessor
    tok, tmpl, data_args = tokenizer_and_template(model_dir, template, **data_kw)
    attr = dataset_attr(formatting)
    converter = get_dataset_converter(attr.formatting, attr, data_args)
    columns = [c for c in (attr.prompt, attr.query, attr.response, attr.history, attr.messages, attr.system) if c]
    # datasets' JSON loader gives every row every column (None where absent); do the same.
    converted = [converter({c: row.get(c) for c in set(columns) | set(row)}) for row in rows]
    batch = {k: [c[k] for c in converted] for k in converted[0]}
    if formatting == "text":
        out = PretrainDatasetProcessor(template=tmpl, tokenizer=tok, processor=None, data_args=data_args)
        res = out.preprocess_dataset(batch)
        return [(ids, list(ids)) for ids in res["input_ids"]]  # the collator labels every token
    proc = SupervisedDatasetProcessor(template=tmpl, tokenizer=tok, processor=None, data_args=data_args)
    res = proc.preprocess_dataset(batch)
    return list(zip(res["input_ids"], res["labels"]))


def pairs(model_dir, rows, template, formatting, **data_kw):
    """LLaMA-Factory's (chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels) of
    each preference row: its converter for `formatting` with the dataset_info.json entry of a
    ranking dataset ("ranking": true, columns chosen and rejected), then PairwiseDatasetProcessor
    (what its dpo stage runs). Rows it drops are left out."""
    load()
    from llamafactory.data.converter import get_dataset_converter
    from llamafactory.data.processor import PairwiseDatasetProcessor
    tok, tmpl, data_args = tokenizer_and_template(model_dir, template, **data_kw)
    attr = dataset_attr(formatting)
    attr.ranking, attr.chosen, attr.rejected = True, "chosen", "rejected"
    converter = get_dataset_converter(attr.formatting, attr, data_args)
    columns = [c for c in (attr.prompt, attr.query, attr.response, attr.history, attr.messages,
                           attr.system, attr.chosen, attr.rejected) if c]
    # datasets' JSON loader gives every row every column (None where absent); do the same.
    converted = [converter({c: row.get(c) for c in set(columns) | set(row)}) for row in rows]
    batch = {k: [c[k] for c in converted] for k in converted[0]}
    proc = PairwiseDatasetProcessor(template=tmpl, tokenizer=tok, processor=None, data_args=data_args)
    res = proc.preprocess_dataset(batch)
    return list(zip(res["chosen_input_ids"], res["chosen_labels"], res["rejected_input_ids"],
                    res["rejected_labels"]))
