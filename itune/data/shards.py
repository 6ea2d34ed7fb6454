"""Sharded Arrow IPC stream files of packed rows (the format `datasets` memory-maps), and the manifest that describes them.

Row schema (one row = ``seq_len`` tokens):

| column | type | meaning |
|---|---|---|
| ``input_ids`` | list<int32> [seq_len] | token ids; padding positions hold the tokenizer's pad id |
| ``labels`` | list<int32> [seq_len] | unshifted targets, -100 where not trained (prompt, BOS, padding) |
| ``position_ids`` | list<int32> [seq_len] | restart at 0 for every example and for the padding tail |
| ``example_lengths`` | list<int32> | tokens of each example in the row, in row order |
| ``example_ids`` | list<string> | record id of each example |

Files are written to a temporary name and renamed; ``manifest.json`` is written last, so a directory with a
manifest is complete. :func:`verify` re-checks checksums, schema and counts.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from itune.errors import ManifestError
from itune.fileio import atomic_write_text  # noqa: F401  (re-exported for callers)

FORMAT_VERSION = 2  # 2: the manifest carries its own integrity record (``integrity.sha256``)
MANIFEST = "manifest.json"

SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("position_ids", pa.list_(pa.int32())),
        ("example_lengths", pa.list_(pa.int32())),
        ("example_ids", pa.list_(pa.string())),
    ]
)


def numpy_to_arrow(values) -> pa.Array:
    """A 1-D numpy array of numbers (not bool) as an Arrow array over the same memory: ``pa.array(values)``
    without its first call's import of pandas (0.2 to 0.3 s of CPU in each process that makes one, when pandas is
    installed; apache/arrow#34994), which the data path avoids.

    Raises:
        ValueError: ``values`` is not one-dimensional or is a bool array.
    """
    v = np.ascontiguousarray(values)
    if v.ndim != 1 or v.dtype == np.bool_:
        raise ValueError(f"numpy_to_arrow takes a 1-D numeric array, got shape {v.shape} dtype {v.dtype}")
    if not v.dtype.isnative:  # Arrow buffers hold numbers in the machine's byte order
        v = v.astype(v.dtype.newbyteorder("="))
    return pa.Array.from_buffers(pa.from_numpy_dtype(v.dtype), len(v), [None, pa.py_buffer(v)])


_NUMPY_TYPES = {pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
                pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32, pa.uint64(): np.uint64,
                pa.float32(): np.float32, pa.float64(): np.float64}


def arrow_to_numpy(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric Arrow array without nulls as a read-only numpy array over its memory (one copy for a chunked
    array of several chunks): ``values.to_numpy()`` without importing pandas (see :func:`numpy_to_arrow`).

    Raises:
        ValueError: the array holds nulls or is not of a fixed-width numeric type.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    dtype = _NUMPY_TYPES.get(values.type)
    if dtype is None or values.null_count:
        raise ValueError(f"arrow_to_numpy takes a numeric array without nulls, got {values.type} with "
                         f"{values.null_count} nulls")
    dtype = np.dtype(dtype)
    return np.frombuffer(values.buffers()[1], dtype=dtype, count=len(values), offset=values.offset * dtype.itemsize)


def strings_to_arrow(values: list[str]) -> pa.Array:
    """A list of str as an Arrow ``string`` array (``pa.array(values, pa.string())`` without importing pandas,
    see :func:`numpy_to_arrow`).

    Raises:
        UnicodeEncodeError: a string holds a lone surrogate (not representable as UTF-8).
    """
    data = [x.encode("utf-8") for x in values]
    offsets = np.zeros(len(data) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, data), dtype=np.int64, count=len(data)), out=offsets[1:])
    kind, width = (pa.string(), np.int32) if offsets[-1] < 2**31 else (pa.large_string(), np.int64)
    arr = pa.Array.from_buffers(kind, len(data), [None, pa.py_buffer(offsets.astype(width)),
                                                  pa.py_buffer(b"".join(data))])
    return arr if kind == pa.string() else arr.cast(pa.string())


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shards(out_dir: Path, split: str, columns: dict[str, list], max_rows_per_shard: int) -> list[dict]:
    """Writes rows as ``{split}-{i:05d}-of-{n:05d}.arrow`` files.

    Args:
        columns: a list per schema column, all of the same length (rows).
        max_rows_per_shard: bound on rows per file (bounds file size: rows x seq_len x 12 bytes).

    Returns:
        One entry per shard: ``{"file", "rows", "bytes", "sha256"}``.
    """
    n = len(columns["input_ids"])
    num_shards = max(1, -(-n // max_rows_per_shard))
    shards = []
    for s in range(num_shards):
        lo, hi = s * max_rows_per_shard, min(n, (s + 1) * max_rows_per_shard)
        table = pa.table({k: pa.array(columns[k][lo:hi], type=SCHEMA.field(k).type) for k in SCHEMA.names},
                         schema=SCHEMA)
        name = f"{split}-{s:05d}-of-{num_shards:05d}.arrow"
        tmp = out_dir / f".{name}.tmp"
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
            writer.write_table(table, max_chunksize=1024)
        os.replace(tmp, out_dir / name)
        shards.append({"file": name, "rows": hi - lo, "bytes": (out_dir / name).stat().st_size,
                       "sha256": sha256_file(out_dir / name)})
    return shards


def read_manifest(data_dir: str | Path) -> dict:
    """Reads ``data_dir/manifest.json``.

    Raises:
        ManifestError: no manifest (preparation unfinished or wrong directory) or an unknown format version.
    """
    p = Path(data_dir) / MANIFEST
    if not p.is_file():
        raise ManifestError(f"{p}: not found. Prepare the data first (`itune-data prepare ...`); "
                            "a directory without a manifest is incomplete.")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{p}: not valid JSON ({e}); the directory is damaged: prepare the data again") from e
    if not isinstance(m, dict):
        raise ManifestError(f"{p}: not a manifest (a JSON object expected); prepare the data again")
    if m.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{p}: format_version {m.get('format_version')!r}, this itune reads {FORMAT_VERSION}; "
                            "prepare the data again with this version")
    missing = _manifest_problems(m)
    if missing:
        raise ManifestError(f"{p}: not a complete manifest ({'; '.join(missing[:5])}); the directory is damaged: "
                            "prepare the data again")
    stored = (m.get("integrity") or {}).get("sha256") if isinstance(m.get("integrity"), dict) else None
    actual = manifest_integrity(m)
    if stored != actual:
        raise ManifestError(f"{p}: edited after preparation (its integrity sha256 {str(stored)[:12]}... does not match "
                            f"its content, {actual[:12]}...); a changed tokenizer id, vocab_size or seq_len would train "
                            "with wrong values: prepare the data again")
    return m


def manifest_integrity(m: dict) -> str:
    """sha256 of a manifest's content without its ``integrity`` record: canonical JSON (sorted keys, no spaces,
    UTF-8). :func:`write_manifest` stores it as ``integrity.sha256``; :func:`read_manifest` checks it."""
    body = {k: v for k, v in m.items() if k != "integrity"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                          .encode("utf-8")).hexdigest()


def write_manifest(out_dir: str | Path, m: dict) -> dict:
    """Writes ``out_dir/manifest.json`` atomically with its integrity record (``integrity.sha256`` over every
    other key, :func:`manifest_integrity`). Returns the manifest as written."""
    m = {**{k: v for k, v in m.items() if k != "integrity"},
         "integrity": {"sha256": manifest_integrity(m), "covers": "every other key (canonical JSON)"}}
    atomic_write_text(Path(out_dir) / MANIFEST, json.dumps(m, indent=2) + "\n")
    return m


def tokenizer_problems(m: dict) -> list[str]:
    """Where the manifest's tokenizer fields disagree with the tokenizer files they name (``tokenizer.path``):
    fingerprint, ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``. Empty when they agree or when the manifest
    names no tokenizer path that exists (data moved to another machine: the trainer then checks the model's
    tokenizer against the fingerprint)."""
    from itune.data.tokenizer import TextTokenizer

    info = m.get("tokenizer") or {}
    path = info.get("path")
    if not path or not (Path(path) / "tokenizer.json").is_file():
        return []
    tok = TextTokenizer.load(path)
    now = {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
           "pad_id": tok.pad_id}
    return [f"tokenizer.{k}: the manifest says {info.get(k)!r}, the tokenizer files in {path} give {v!r}"
            for k, v in now.items() if info.get(k) != v]


def _manifest_problems(m: dict) -> list[str]:
    """What a manifest lacks of the structure its readers use (keys and their JSON types)."""
    def check(obj, where: str, spec: dict) -> list[str]:
        if not isinstance(obj, dict):
            return [f"{where or 'the manifest'} is not an object"]
        return [f"{where}{'.' if where else ''}{k} missing or not {t.__name__}" for k, t in spec.items()
                if not isinstance(obj.get(k), t) or isinstance(obj.get(k), bool)]

    out = check(m, "", {"seq_len": int, "splits": dict})
    for name, info in m["splits"].items() if isinstance(m.get("splits"), dict) else ():
        where = f"splits.{name}"
        got = check(info, where, {"rows": int, "shards": list})
        out += got
        if got:
            continue
        if "counts" in info:
            out += check(info["counts"], f"{where}.counts", {"read": int, "written": int, "rejected": dict})
        for i, sh in enumerate(info["shards"]):
            out += check(sh, f"{where}.shards[{i}]", {"file": str, "rows": int, "sha256": str})
    return out


def manifest_hash(data_dir: str | Path) -> str:
    """sha256 of the manifest file (identifies the prepared data in checkpoints and results)."""
    return sha256_file(Path(data_dir) / MANIFEST)


def open_split(data_dir: str | Path, split: str) -> pa.Table:
    """Memory-maps every shard of ``split`` and returns them as one table (zero-copy).

    Raises:
        ManifestError: the split is missing, or a shard's row count or schema disagrees with the manifest.
    """
    data_dir = Path(data_dir)
    m = read_manifest(data_dir)
    if split not in m["splits"]:
        raise ManifestError(f"{data_dir}: no split {split!r} in manifest (have {sorted(m['splits'])})")
    tables = []
    for sh in m["splits"][split]["shards"]:
        path = data_dir / sh["file"]
        try:
            t = pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
        except (OSError, pa.ArrowException) as e:
            raise ManifestError(f"{path}: cannot read this shard as Arrow IPC stream ({e}); run "
                                f"`itune-data verify {data_dir}` and prepare the data again") from e
        if t.schema != SCHEMA or t.num_rows != sh["rows"]:
            raise ManifestError(f"{path}: schema or row count ({t.num_rows}) disagrees with the "
                                f"manifest ({sh['rows']}); prepare the data again")
        tables.append(t)
    if not tables:
        return SCHEMA.empty_table()
    return pa.concat_tables(tables)


def check_shard_file(data_dir: str | Path, shard: dict) -> str | None:
    """The problem with one shard file of a manifest entry ``{"file", "sha256", ...}`` (missing, or its sha256
    differs from the manifest's), or None when it is intact."""
    p = Path(data_dir) / shard["file"]
    if not p.is_file():
        return f"{p}: missing"
    if sha256_file(p) != shard["sha256"]:
        return f"{p}: checksum differs from the manifest (the file changed after preparation)"
    return None


def _list_lengths(column: pa.ChunkedArray) -> np.ndarray:
    """int64 ``[rows]``: the length of each list of a list column (differences of its offsets)."""
    parts = [np.diff(arrow_to_numpy(c.offsets).astype(np.int64)) for c in column.chunks]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def verify(data_dir: str | Path) -> list[str]:
    """Re-checks every shard against the manifest: checksums (shards and the held-out eval file), schema, row
    counts, the tokenizer fields against the tokenizer files (:func:`tokenizer_problems`; the manifest's own
    integrity is checked on reading), and the layout the offsets describe: ``input_ids``, ``labels`` and ``position_ids`` of ``seq_len``
    tokens in every row, no nulls, one id per example, example lengths >= 1 that fit their row, and example and
    token counts equal to the manifest's. (Token values are covered by the checksums, not re-derived.)

    Returns:
        A list of problems (empty when the directory is intact).

    Raises:
        ManifestError: no manifest, or one that misses what verification needs (:func:`read_manifest`).
    """
    from concurrent.futures import ThreadPoolExecutor

    data_dir = Path(data_dir)
    m = read_manifest(data_dir)
    problems = tokenizer_problems(m)
    seq_len = m["seq_len"]
    for split, info in m["splits"].items():
        with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:  # hashing releases the GIL
            problems += [x for x in pool.map(lambda sh: check_shard_file(data_dir, sh), info["shards"])
                         if x is not None]
        if "eval_file" in info:
            eval_problem = check_shard_file(data_dir, {"file": info["eval_file"], "sha256": info.get("eval_sha256")})
            if eval_problem:
                problems.append(eval_problem)
        try:
            t = open_split(data_dir, split)
        except (ManifestError, OSError, pa.ArrowException) as e:
            problems.append(f"{split}: unreadable: {e}")
            continue
        if t.num_rows != info["rows"]:
            problems.append(f"{split}: {t.num_rows} rows, manifest says {info['rows']}")
        nulls = [c for c in SCHEMA.names if t[c].null_count or any(x.flatten().null_count for x in t[c].chunks)]
        if nulls:
            problems.append(f"{split}: nulls in {nulls}")
        for col in ("input_ids", "labels", "position_ids"):
            if (_list_lengths(t[col]) != seq_len).any():
                problems.append(f"{split}: {col} rows whose length is not seq_len {seq_len}")
        per_row = _list_lengths(t["example_lengths"])
        if (per_row != _list_lengths(t["example_ids"])).any():
            problems.append(f"{split}: rows whose example_ids and example_lengths differ in number")
        lengths = np.zeros(0, np.int64)  # every example's length, rows one after another
        if not nulls and t.num_rows:
            chunks = t["example_lengths"].chunks
            lengths = np.concatenate([arrow_to_numpy(x.flatten()) for x in chunks]).astype(np.int64)
        filled = np.concatenate([[0], np.cumsum(lengths)])
        bounds = np.concatenate([[0], np.cumsum(per_row)])
        if len(lengths) and ((lengths < 1).any() or (filled[bounds[1:]] - filled[bounds[:-1]] > seq_len).any()):
            problems.append(f"{split}: example_lengths below 1 or adding up to more than seq_len {seq_len} in a row")
        c = info.get("counts")
        if c is None:
            problems.append(f"{split}: the manifest has no counts (read, written, rejected)")
            continue
        expected = info.get("examples", c["written"])  # with a mixture, repeats included
        if int(per_row.sum()) != expected:
            problems.append(f"{split}: {int(per_row.sum())} examples in rows, manifest says {expected}")
        if "tokens" in info and not nulls and int(filled[-1]) != info["tokens"]:
            problems.append(f"{split}: {int(filled[-1])} tokens in rows, manifest says {info['tokens']}")
        if c["read"] != c["written"] + sum(c["rejected"].values()):
            problems.append(f"{split}: read {c['read']} != written {c['written']} + rejected {c['rejected']}")
    return problems
