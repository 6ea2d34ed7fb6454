"""Tokenizer directories carrying the published chat templates of popular model families.

Each family in ``tests/chat_templates/`` has a ``<name>.jinja`` (the chat template, verbatim from the model's
``tokenizer_config.json`` / ``chat_template.jinja``) and a ``<name>.json`` sidecar: where the text was found, the
special tokens of the real tokenizer config (``bos_token``, ``eos_token``, ``pad_token``, ``add_bos_token``), the
control tokens the template writes (``added_tokens``) and those that are ``special`` in the real tokenizer.

:func:`build_tokenizer_dir` wraps a template around the vocabulary of the shared Mistral-7B-v0.3 tokenizer: it
copies its ``tokenizer.json``, adds the family's control tokens that the vocabulary lacks (``<s>``, ``[INST]``, ...
are reused) and writes ``tokenizer_config.json`` with the template and the recorded special tokens. The result
loads with ``itune.data.tokenizer.TextTokenizer.load`` and ``transformers.AutoTokenizer.from_pretrained``; token
ids are those of the Mistral vocabulary plus the added tokens, not the real model's.
"""

from __future__ import annotations

import json
from pathlib import Path

try:
    from tests.conftest import MISTRAL
except ModuleNotFoundError:  # plain `pytest`: tests/ is on sys.path, the repository root is not
    from conftest import MISTRAL

TEMPLATES_DIR = Path(__file__).resolve().parent / "chat_templates"

#: The families with a template in ``tests/chat_templates/``.
TEMPLATE_NAMES = ("llama3.1", "llama3.2", "qwen2.5", "qwen3", "gemma2", "gemma3", "mistral-v3", "mistral-tekken",
                  "phi3", "phi4", "gpt-oss", "smollm3")


def template_info(name: str) -> dict:
    """The sidecar of template ``name`` plus its text under ``chat_template``."""
    if name not in TEMPLATE_NAMES:
        raise ValueError(f"unknown chat template {name!r}; choose one of {TEMPLATE_NAMES}")
    info = json.loads((TEMPLATES_DIR / f"{name}.json").read_text())
    info["chat_template"] = (TEMPLATES_DIR / f"{name}.jinja").read_text()
    return info


def build_tokenizer_dir(name: str, out_dir: Path) -> Path:
    """Writes a tokenizer directory for family ``name`` into ``out_dir`` (created) and returns it.

    ``tokenizer.json``: the Mistral-7B-v0.3 tokenizer with the family's ``added_tokens`` that are not already in
    its vocabulary added (``special`` as recorded). ``tokenizer_config.json``: ``chat_template`` and the recorded
    ``bos_token`` / ``eos_token`` / ``pad_token`` / ``add_bos_token``.
    """
    from tokenizers import AddedToken, Tokenizer

    info = template_info(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(MISTRAL / "tokenizer.json"))
    special = set(info["special"])
    for text in info["added_tokens"]:
        if tok.token_to_id(text) is not None:  # already in the vocabulary (<s>, </s>, [INST], ...): reused
            continue
        added = AddedToken(text, special=text in special, normalized=False)
        (tok.add_special_tokens if text in special else tok.add_tokens)([added])
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": info["chat_template"],
        "bos_token": info["bos_token"],
        "eos_token": info["eos_token"],
        "pad_token": info["pad_token"],
        "unk_token": None,
        "add_bos_token": info["add_bos_token"],
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out_dir
