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
