"""Shared fixtures: a tiny random Llama with a byte-level tokenizer, built offline from a config.

The suite writes only into temporary folders: `pytest_configure` points HOME, the XDG folders, SAFT_CACHE and
the Hugging Face, torch and matplotlib caches into one fresh folder (before any test module imports a library
that reads them), and the session fails if anything lands in that HOME (`pytest_sessionfinish`). .ci/run also
runs the suite with an empty HOME of its own and fails if anything appears there.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Where each variable points, under the session's folder. HF_HUB_OFFLINE: tests never reach the network.
ISOLATED_ENV = {"HOME": "home", "XDG_CACHE_HOME": "xdg-cache", "XDG_CONFIG_HOME": "xdg-config",
                "XDG_DATA_HOME": "xdg-data", "XDG_STATE_HOME": "xdg-state", "SAFT_CACHE": "saft-cache",
                "HF_HOME": "hf", "HF_DATASETS_CACHE": "hf/datasets", "TORCH_HOME": "torch",
                "MPLCONFIGDIR": "matplotlib", "TRITON_CACHE_DIR": "triton", "HYPOTHESIS_STORAGE_DIRECTORY": "hypothesis"}
_ISOLATED: dict[str, Path] = {}


def pytest_configure(config):
    root = Path(tempfile.mkdtemp(prefix="saft-tests-"))
    _ISOLATED["root"] = root
    for name, sub in ISOLATED_ENV.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(root / sub)
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:  # hypothesis keeps examples and caches in ./.hypothesis unless told otherwise
        from hypothesis import settings
        from hypothesis.configuration import set_hypothesis_home_dir

        set_hypothesis_home_dir(root / "hypothesis")
        settings.register_profile("saft", database=None, deadline=None)
        settings.load_profile("saft")
    except ImportError:
        pass


def pytest_sessionfinish(session, exitstatus):
    root = _ISOLATED.get("root")
    if root is None:
        return
    home = root / ISOLATED_ENV["HOME"]
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    shutil.rmtree(root, ignore_errors=True)
    if written:
        writer = session.config.get_terminal_writer()
        writer.line()
        writer.line(
            f"the suite wrote into HOME ({len(written)} paths, e.g. {written[:5]}); it must write only into "
            "temporary folders", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer(chat_template: str | None = CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=specials[1:])
    tok.chat_template = chat_template
    return tok


def make_model(vocab_size: int, *, n_layers: int = 4, seed: int = 0, tie: bool = True):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny model folder, loadable with saft.load_model(path)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    make_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    from saft import load_model

    return load_model(str(tiny_model_dir), device="cpu")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def toy_rows(n: int = 30, harmful_every: int = 3) -> list[dict]:
    """Rows with prompt/response and is_safe; every `harmful_every`-th row is harmful and looks different."""
    rows = []
    for i in range(n):
        harmful = i % harmful_every == 0
        prompt = f"how do I hurt someone badly number {i}?" if harmful else f"write a poem about the sea, take {i}"
        response = "here is how to do harm: step one" if harmful else f"the sea is wide and blue {i}"
        rows.append({"id": f"r{i}", "prompt": prompt, "response": response, "is_safe": not harmful})
    return rows


@pytest.fixture
def small_reference(monkeypatch):
    """The label-free detector's reference rows cut to every 20th of the guard's 2306 (both classes and every source): the
    tiny model would take about a minute on all of them, in every test that uses the label-free default."""
    import saft.reference as R

    subset = R.reference_samples()[::20]
    monkeypatch.setattr(R, "reference_samples", lambda: subset)
    return subset
