"""Torch-free tokenizer access for data preparation, built on the `tokenizers` library.

A tokenizer directory is a Hugging Face tokenizer directory: ``tokenizer.json`` (required) and optionally
``tokenizer_config.json`` / ``special_tokens_map.json`` naming the BOS, EOS and pad tokens. The same directory is
copied into every model export, so `transformers.AutoTokenizer.from_pretrained` loads it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from itune.errors import DataFormatError

#: A byte-fallback piece (SentencePiece ``<0xNN>``): one byte of a character's UTF-8 encoding.
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>\Z")
_SPACE = "\u2581"
#: Strings whose offsets computed from ids must equal the tokenizer's own before :meth:`TextTokenizer.piece_offsets`
#: is used (a guard at load; the tests compare every real example and random strings).
_PROBES = ("", " ", "a", " a", "  a", "\u2581x", "a  b\n\tc ", "\U0001F600", " \U0001F600x", "\u00fc\u4e2d\u6587",
           "a\u0301b", "1 2\r\n3", "x\u200by", "Hello world. Hi!")


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
        chat_template_kwargs: extra variables passed to the chat template (``apply_chat_template(**kwargs)`` in
            ``transformers``), e.g. ``{"enable_thinking": False}`` for Qwen3 / SmolLM3.
    """

    path: Path
    bos_id: int | None
    eos_id: int
    pad_id: int
    fingerprint: str
    _tok: object
    chat_template: str | None = None
    special_tokens: dict = None  # {"bos_token": "<s>", "eos_token": "</s>", ...}: the texts a chat template sees
    #: extra variables the chat template is rendered with ({"enable_thinking": False}); see
    #: itune.data.render.check_chat_template_kwargs
    chat_template_kwargs: dict = field(default_factory=dict)
    _special_texts: tuple | None = field(default=None, repr=False, compare=False)
    _special_re: object = field(default=None, repr=False, compare=False)
    _piece_tables: object = field(default=None, repr=False, compare=False)  # (chars, width, prepend), or False

    @property
    def special_texts(self) -> tuple[str, ...]:
        """Texts of the special added tokens (``</s>``, ``[INST]``, ``<|im_end|>``...), longest first."""
        if self._special_texts is None:
            dec = self._tok.get_added_tokens_decoder()
            self._special_texts = tuple(sorted({t.content for t in dec.values() if t.special and t.content},
                                               key=lambda x: (-len(x), x)))
        return self._special_texts

    def _special_pattern(self):
        """``(regex of the special texts, their first characters)``: a text holding none of those characters (a
        substring test, much faster than the regex) holds no special text."""
        if self._special_re is None:
            texts = self.special_texts
            self._special_re = (literal_union_regex(texts) if texts else re.compile(r"(?!x)x"),
                                tuple(sorted({t[0] for t in texts})))
        return self._special_re

    def find_special_text(self, text: str) -> str | None:
        """The first special-token text (:attr:`special_texts`) that occurs in ``text``, or None."""
        pattern, firsts = self._special_pattern()
        if not any(c in text for c in firsts):
            return None
        m = pattern.search(text)
        return m.group(0) if m else None

    def special_text_matches(self, text: str) -> list[str]:
        """Every special-token text in ``text``, left to right, non-overlapping (longest first at a position)."""
        pattern, firsts = self._special_pattern()
        return pattern.findall(text) if any(c in text for c in firsts) else []

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
        # rows are cut by itune's over-long policy and padded by the packer: a tokenizer.json's own truncation
        # or padding would drop or add tokens unseen by the labels
        tok.no_truncation()
        tok.no_padding()
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

    def encode_batch_flat(self, texts: list[str], special_tokens_in_text: bool = True):
        """Token ids of ``texts`` as :meth:`encode_batch`, concatenated, without offsets (``encode_batch_fast``: the
        Rust backend skips the offsets bookkeeping, about 30% of the encoding time of a SentencePiece BPE
        tokenizer).

        Returns:
            ``(ids int32 [tokens], counts int64 [texts])``: every text's ids one after another, and tokens per text.
        """
        self._literal(special_tokens_in_text)
        flat: list[int] = []
        extend = flat.extend
        counts = np.empty(len(texts), dtype=np.int64)
        for i, e in enumerate(self._tok.encode_batch_fast(texts, add_special_tokens=False)):
            ids = e.ids
            extend(ids)
            counts[i] = len(ids)
        return np.array(flat, dtype=np.int32), counts

    @property
    def has_piece_offsets(self) -> bool:
        """Whether :meth:`piece_offsets` can compute offsets from ids (see there)."""
        if self._piece_tables is None:
            self._piece_tables = _piece_tables(self) or False
        return self._piece_tables is not False

    def piece_offsets(self, ids: np.ndarray, counts: np.ndarray, texts: list[str], base: np.ndarray | None = None):
        """Character offsets of the tokens of several encodings, computed from their ids alone.

        For a SentencePiece-style BPE tokenizer (``Metaspace`` pre-tokenizer without splitting, or the legacy
        ``Prepend`` + ``Replace`` normalizer; byte fallback) the pieces of an encoding spell the text with
        ``"\u2581"`` for each space, after the ``"\u2581"`` the tokenizer prepends (``Metaspace``: to a text that
        does not start with a space or ``"\u2581"``, unless ``prepend_scheme`` is ``never``; ``Prepend``: to any
        non-empty text). A token's end is
        therefore the running sum of its pieces' lengths in characters (a byte piece counts 1 when it starts a
        character's UTF-8 sequence, 0 when it continues one), less the prepended character, and its start is its
        end less its width (every byte piece of a character spans that whole character, as in the tokenizer's own
        offsets; the prepended character is aligned with the first one). An encoding holding an added token or
        ``<unk>``, or whose pieces do not spell exactly its text (after that prepended character), is reported not
        ``ok`` (use :meth:`encode_batch` offsets for it).

        Args:
            ids: int ``[tokens]``, the encodings' ids concatenated (:meth:`encode_batch_flat`).
            counts: int ``[encodings]``, tokens per encoding.
            texts: the encoded texts, ``[encodings]``.
            base: int ``[encodings]`` added to the offsets of each encoding (default 0), e.g. the texts' positions
                in their concatenation.

        Returns:
            ``(starts int64 [tokens], ends int64 [tokens], ok bool [encodings])``: where ``ok``, equal to the
            ``Encoding.offsets`` of :meth:`encode_batch` (plus ``base``); elsewhere ``base``. With ``base`` placing
            the texts one after another, the offsets are non-decreasing over the whole batch (tests/test_render_batch.py compares them on every real
            example and on random strings).

        Raises:
            ValueError: the tokenizer has no such tables (:attr:`has_piece_offsets` is False).
        """
        if not self.has_piece_offsets:
            raise ValueError(f"{self.path}: offsets cannot be computed from ids for this tokenizer")
        chars, width, prepend = self._piece_tables
        ids = np.asarray(ids)
        counts = np.asarray(counts, dtype=np.int64)
        k = len(counts)
        text_lengths = np.fromiter(map(len, texts), dtype=np.int64, count=k)
        if prepend == "never":
            expected = np.zeros(k, dtype=np.int64)
        elif prepend == "nonempty":
            expected = (text_lengths > 0).astype(np.int64)
        else:  # Metaspace: not before a leading space (which becomes the "\u2581")
            expected = np.fromiter((t[:1] not in ("", " ", _SPACE) for t in texts), dtype=np.int64, count=k)
        c = chars[ids]  # the tables cover every id, added tokens included
        neg = c < 0
        bad = np.zeros(k, dtype=bool)
        if neg.any():  # an added token or <unk>: this encoding's offsets are not computed here
            bad[np.repeat(np.arange(k), counts)[neg]] = True
            c = np.where(neg, 0, c)
        cum = np.empty(len(c) + 1, dtype=np.int64)
        cum[0] = 0
        np.cumsum(c, out=cum[1:])
        first = np.cumsum(counts) - counts
        before = cum[first]
        shift = cum[first + counts] - before - text_lengths
        ok = ~bad & (shift == expected)  # a character dropped (no byte fallback, no <unk>) fails this
        base = np.zeros(k, dtype=np.int64) if base is None else np.asarray(base, dtype=np.int64)
        ends = cum[1:] - np.repeat(before + shift - base, counts)
        head = first[(counts > 0) & (shift == 1)]
        ends[head] = np.maximum(ends[head], base[(counts > 0) & (shift == 1)] + 1)  # a prepended "\u2581"
        starts = ends - width[ids]  # alone is aligned with the first character
        nz = first[counts > 0]  # only a first token can start before its text (the prepended "\u2581")
        starts[nz] = np.maximum(starts[nz], base[counts > 0])
        if not ok.all():  # offsets of an encoding not ok are meaningless: all set to its base, so that the
            at = np.repeat(~ok, counts)  # offsets of the whole batch stay non-decreasing (one search over it)
            starts[at] = ends[at] = np.repeat(base, counts)[at]
        return starts, ends, ok

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Decodes ids to text."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        return self._tok.id_to_token(i)


def literal_union_regex(texts) -> re.Pattern:
    """A regular expression matching any of ``texts`` (non-empty literals), the longest one where several start
    at the same position: the same matches as ``"|".join(map(re.escape, longest first))``, but written as a trie
    (``<(?:s>|/s>|unk>)|\\[(?:INST\\]|...)``), so a position is rejected after a character or two instead of
    after trying every text (a tokenizer may have hundreds of special tokens)."""
    trie: dict = {}
    for t in texts:
        node = trie
        for ch in t:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        alts = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body  # greedy: the longer text first, this one otherwise

    return re.compile(build(trie))


def _piece_tables(tok: TextTokenizer) -> tuple[np.ndarray, np.ndarray, str] | None:
    """``(chars, width)`` int32 ``[highest id + 1]`` and the prepend rule (``unless_space``, ``nonempty`` or
    ``never``) for :meth:`TextTokenizer.piece_offsets`, or None when the tokenizer is not of the kind it handles or
    fails the :data:`_PROBES` check. ``chars`` is -1 for added tokens, ``<unk>`` and ids the vocabulary skips."""
    from tokenizers import models

    model = tok._tok.model
    if not isinstance(model, models.BPE) or model.dropout or model.continuing_subword_prefix \
            or model.end_of_word_suffix:
        return None

    def spec(part):  # a normalizer / pre-tokenizer as its JSON form, None when absent
        return None if part is None else json.loads(part.__getstate__())

    norm, pre = spec(tok._tok.normalizer), spec(tok._tok.pre_tokenizer)
    metaspace = isinstance(pre, dict) and pre.get("type") == "Metaspace" and pre.get("replacement") == _SPACE \
        and pre.get("split") is False and pre.get("prepend_scheme") in ("first", "always", "never")
    legacy = pre is None and isinstance(norm, dict) and norm.get("type") == "Sequence" and norm.get("normalizers") == [
        {"type": "Prepend", "prepend": _SPACE}, {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE}]
    if not ((norm is None and metaspace) or legacy):
        return None
    prepend = "nonempty" if legacy else ("never" if pre["prepend_scheme"] == "never" else "unless_space")
    vocab = tok._tok.get_vocab(with_added_tokens=True)
    size = max(vocab.values(), default=-1) + 1  # ids need not be contiguous
    chars = np.full(size, -1, dtype=np.int32)
    width = np.zeros(size, dtype=np.int32)
    added = set(tok._tok.get_added_tokens_decoder())
    unk = tok._tok.token_to_id(model.unk_token) if model.unk_token else None
    for piece, i in tok._tok.get_vocab(with_added_tokens=False).items():
        if i in added or i == unk:
            continue
        m = _BYTE_PIECE.match(piece) if model.byte_fallback else None
        if m:
            chars[i], width[i] = (0 if int(m.group(1), 16) & 0xC0 == 0x80 else 1), 1
        else:
            chars[i] = width[i] = len(piece)
    tok._piece_tables = (chars, width, prepend)
    encs = tok._tok.encode_batch(list(_PROBES), add_special_tokens=False)
    flat = np.asarray([i for e in encs for i in e.ids], dtype=np.int64)
    starts, ends, ok = tok.piece_offsets(flat, [len(e) for e in encs], list(_PROBES))
    want = [o for e in encs for o in e.offsets]
    tok._piece_tables = None
    if not ok.all() or list(zip(starts.tolist(), ends.tolist())) != [tuple(o) for o in want]:
        return None
    return chars, width, prepend


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
