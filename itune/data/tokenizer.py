"""Torch-free tokenizer access for data preparation, built on the `tokenizers` library.

A tokenizer directory is a Hugging Face tokenizer directory: ``tokenizer.json`` (required) and optionally
``tokenizer_config.json`` / ``special_tokens_map.json`` naming the BOS, EOS and pad tokens. The same directory is
copied into every model export, so `transformers.AutoTokenizer.from_pretrained` loads it too.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from itune.errors import DataFormatError


def _special_token(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def _chat_template(path: Path, cfg: dict) -> str | None:
    """The chat template: ``tokenizer_config.json`` ``chat_template`` (a string, or a list of named templates
    of which ``default`` is taken), else ``chat_template.jinja`` beside it."""
    t = cfg.get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    if isinstance(t, str) and t:
        return t
    p = path / "chat_template.jinja"
    return p.read_text(encoding="utf-8") if p.is_file() else None


@dataclass
class TextTokenizer:
    """A fast tokenizer plus its special token ids.

    Attributes:
        path: the tokenizer directory.
        bos_id: id prepended once to every example (None when the tokenizer has no BOS token).
        eos_id: id appended after every trained response; always trained, never treated as padding.
        pad_id: id written into padding positions. Padding is decided by position (labels -100 and its own
            position_ids run), never by comparing token ids, so pad_id == eos_id is safe.
    """

    path: Path
    bos_id: int | None
    eos_id: int
    pad_id: int
    fingerprint: str
    _tok: object
    chat_template: str | None = None
    special_tokens: dict = None  # {"bos_token": "<s>", "eos_token": "</s>", ...}: the texts a chat template sees
    _special_texts: tuple | None = field(default=None, repr=False, compare=False)
    _special_re: object = field(default=None, repr=False, compare=False)

    @property
    def special_texts(self) -> tuple[str, ...]:
        """Texts of the special added tokens (``</s>``, ``[INST]``, ``<|im_end|>``...), longest first."""
        if self._special_texts is None:
            dec = self._tok.get_added_tokens_decoder()
            self._special_texts = tuple(sorted({t.content for t in dec.values() if t.special and t.content},
                                               key=lambda x: (-len(x), x)))
        return self._special_texts

    def _special_pattern(self):
        if self._special_re is None:
            import re

            self._special_re = re.compile("|".join(map(re.escape, self.special_texts))) if self.special_texts \
                else re.compile(r"(?!x)x")
        return self._special_re

    def find_special_text(self, text: str) -> str | None:
        """The first special-token text (:attr:`special_texts`) that occurs in ``text``, or None."""
        m = self._special_pattern().search(text)
        return m.group(0) if m else None

    def special_text_matches(self, text: str) -> list[str]:
        """Every special-token text in ``text``, left to right, non-overlapping (longest first at a position)."""
        return self._special_pattern().findall(text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TextTokenizer":
        """Loads ``path/tokenizer.json`` and the special tokens from ``tokenizer_config.json``.

        Raises:
            DataFormatError: the directory has no tokenizer.json or no EOS token is defined.
        """
        from tokenizers import Tokenizer

        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise DataFormatError(
                f"{path}: no tokenizer.json found. Give a Hugging Face tokenizer directory "
                "(or make one with `itune-data train-tokenizer`)."
            )
        tok = Tokenizer.from_file(str(tj))
        cfg: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            p = path / name
            if p.is_file():
                cfg.update({k: v for k, v in json.loads(p.read_text()).items() if v is not None})
        add_bos = cfg.get("add_bos_token", True)
        bos = _special_token(cfg.get("bos_token"))
        eos = _special_token(cfg.get("eos_token"))
        pad = _special_token(cfg.get("pad_token"))
        if eos is None or tok.token_to_id(eos) is None:
            raise DataFormatError(
                f"{path}: no EOS token defined (tokenizer_config.json 'eos_token' = {eos!r}); "
                "add it so responses can be terminated."
            )
        eos_id = tok.token_to_id(eos)
        bos_id = tok.token_to_id(bos) if (bos and add_bos) else None
        pad_id = tok.token_to_id(pad) if pad and tok.token_to_id(pad) is not None else eos_id
        h = hashlib.sha256(tj.read_bytes())
        h.update(json.dumps([bos_id, eos_id, pad_id]).encode())
        specials = {k: _special_token(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        return cls(path, bos_id, eos_id, pad_id, h.hexdigest()[:16], tok, _chat_template(path, cfg),
                   {k: v for k, v in specials.items() if v is not None})

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _literal(self, special_tokens_in_text: bool) -> None:
        # encode_special_tokens=True would encode "<s>" or "[INST]" in the text as ordinary text
        self._tok.encode_special_tokens = not special_tokens_in_text

    def encode_with_offsets(self, text: str, special_tokens_in_text: bool = True
                            ) -> tuple[list[int], list[tuple[int, int]]]:
        """Encodes ``text`` without adding special tokens. Special-token strings in ``text`` (``</s>``,
        ``[INST]``, an added ``<|user|>``) become their control tokens (the text a template writes), or plain text
        with ``special_tokens_in_text=False``. Record contents never reach here with such strings: rendering refuses
        them (:func:`itune.data.render.render_batch`).

        Returns:
            (ids, offsets): offsets[i] = (start, end) character span of token i in ``text``.
        """
        self._literal(special_tokens_in_text)
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_batch(self, texts: list[str], special_tokens_in_text: bool = True):
        """``tokenizers.Encoding`` objects of ``texts`` as :meth:`encode_with_offsets` (parallel in the Rust
        backend)."""
        self._literal(special_tokens_in_text)
        return self._tok.encode_batch(texts, add_special_tokens=False)

    def encode_batch_with_offsets(self, texts: list[str], special_tokens_in_text: bool = True):
        """Batch version of :meth:`encode_with_offsets` (parallel in the Rust backend)."""
        self._literal(special_tokens_in_text)
        encs = self._tok.encode_batch(texts, add_special_tokens=False)
        return [(e.ids, e.offsets) for e in encs]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Decodes ids to text."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        return self._tok.id_to_token(i)


def train_sentencepiece(text_lines, out_dir: str | os.PathLike, vocab_size: int = 1024, seed: int = 0) -> Path:
    """Trains a SentencePiece unigram model and writes a Hugging Face tokenizer directory.

    The SentencePiece model (``tokenizer.model``) is converted to ``tokenizer.json`` (Unigram model, Metaspace
    pre-tokenizer, byte fallback) so that the `tokenizers` library and `transformers.AutoTokenizer` both load it
    and produce the same ids as SentencePiece itself. Special tokens: ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2.

    Args:
        text_lines: iterable of training sentences.
        out_dir: directory to create.
        vocab_size: number of pieces.

    Returns:
        The output directory.
    """
    import io

    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if vocab_size < 300:
        from itune.errors import ConfigError

        raise ConfigError(f"vocab_size {vocab_size} is too small: byte fallback needs 256 byte pieces plus the "
                          "special tokens and the characters of the corpus; use at least 300")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text_lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        split_digits=True,
        remove_extra_whitespaces=False,
        num_threads=1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 1000000,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n"
    )
    return out
