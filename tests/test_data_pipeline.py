"""Scalable preparation: output identical for any --num-proc and for job-array slices once merged; mixtures with
weights and a per-task cap; Slurm array defaults; merge refuses incomplete or inconsistent slices."""

import json
import os
from collections import Counter

import numpy as np
import pytest
import yaml

from data_tools.cli import main
from itune.data.pipeline import merge_slices
from itune.data.prepare import SourcesOptions, load_mixture, prepare_sources, slice_from_env
from itune.data.shards import open_split, read_manifest, verify
from itune.errors import ConfigError, ManifestError
from tests.conftest import MISTRAL
from tests.test_sources import ALPACA_LIBRE, SHAREGPT_DUMMY, _jsonl

X = -100


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory):
    return _jsonl(tmp_path_factory.mktemp("bad") / "bad.jsonl", [
        {"prompt": "Q1", "completion": "A1"},
        "not json",
        {"prompt": "Q2", "completion": ""},
        {"prompt": "Q3", "completion": "A3"},
    ])


def _opts(out, inputs, **kw):
    kw.setdefault("chunk_records", 128)  # several chunks per file, so slices and workers really split the work
    return SourcesOptions(inputs=inputs, tokenizer=MISTRAL, out_dir=out, seq_len=kw.pop("seq_len", 512),
                          on_error="skip", **kw)


def _files(out):
    """Every output file's bytes (manifest without its timing, and so without the integrity record covering it)."""
    got = {}
    for p in sorted(out.iterdir()):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "manifest.json":
                m = json.loads(data)
                m.pop("seconds")
                m.pop("integrity")
                m["preparation"].pop("slice_seconds")
                data = json.dumps(m, sort_keys=True).encode()
            got[p.name] = data
    return got


@pytest.fixture(scope="module")
def single(tmp_path_factory, bad_file):
    out = tmp_path_factory.mktemp("single") / "out"
    prepare_sources(_opts(out, [ALPACA_LIBRE, SHAREGPT_DUMMY, bad_file]))
    return out


def test_output_identical_for_any_num_proc(tmp_path, single, bad_file):
    out = tmp_path / "np2"
    prepare_sources(_opts(out, [ALPACA_LIBRE, SHAREGPT_DUMMY, bad_file], num_proc=2))
    a, b = _files(single), _files(out)
    assert sorted(a) == ["manifest.json", "rejects.jsonl", "train-00000-of-00001.arrow"]
    assert a == b
    assert not (out / "slices").exists()  # intermediate files removed after the merge
    m = read_manifest(out)
    assert m["splits"]["train"]["counts"] == {"read": 1709, "written": 1701,
                                              "rejected": {"empty_assistant": 7, "invalid_json": 1}}
    assert verify(out) == []


def test_shards_written_by_several_processes_equal_one_process(tmp_path, bad_file):
    """The merge writes shards in num_proc processes (shard s by process s % num_proc): the files are the same as
    one process writes, and the rows are spread evenly (no shard over max_rows_per_shard)."""
    outs = {}
    for n in (1, 3):
        outs[n] = tmp_path / f"np{n}"
        prepare_sources(_opts(outs[n], [SHAREGPT_DUMMY, bad_file], num_proc=n, max_rows_per_shard=17))
    a, b = _files(outs[1]), _files(outs[3])
    assert a == b
    shards_ = read_manifest(outs[3])["splits"]["train"]["shards"]
    rows = [s["rows"] for s in shards_]
    assert len(rows) == -(-sum(rows) // 17) >= 4 and max(rows) <= 17 and max(rows) - min(rows) <= 1
    assert [s["file"] for s in shards_] == [f"train-{i:05d}-of-{len(rows):05d}.arrow" for i in range(len(rows))]
    assert verify(outs[3]) == []


def test_slices_merged_equal_single_process(tmp_path, single, bad_file):
    out = tmp_path / "sliced"
    for i in (2, 0, 1):  # array tasks finish in any order
        s = prepare_sources(_opts(out, [ALPACA_LIBRE, SHAREGPT_DUMMY, bad_file], shard_index=i, num_shards=3))
        assert s["index"] == i and all(c % 3 == i for c in s["chunks"])
        assert not (out / "manifest.json").exists()
    m = merge_slices(out)
    a, b = _files(single), _files(out)
    ma, mb = json.loads(a.pop("manifest.json")), json.loads(b.pop("manifest.json"))
    assert a == b  # shards and rejects byte for byte
    assert (mb["preparation"]["slices"], mb["preparation"]["chunk_records"], ma["preparation"]["slices"]) == (3, 128, 1)
    times = json.loads((out / "manifest.json").read_text())["preparation"]["slice_seconds"]
    assert len(times) == 3 and all(x > 0 for x in times)
    ma.pop("preparation"), mb.pop("preparation")
    assert ma == mb
    assert m["splits"]["train"]["rows"] == read_manifest(single)["splits"]["train"]["rows"]


def test_merge_refuses_missing_or_inconsistent_slices(tmp_path, bad_file):
    out = tmp_path / "o"
    prepare_sources(_opts(out, [bad_file], shard_index=0, num_shards=3, chunk_records=1))
    prepare_sources(_opts(out, [bad_file], shard_index=2, num_shards=3, chunk_records=1))
    with pytest.raises(ManifestError, match=r"1 of 3 slices are missing or unfinished \(--shard-index 1\)"):
        merge_slices(out)
    prepare_sources(_opts(out, [bad_file], shard_index=1, num_shards=3, chunk_records=1, seq_len=256))
    with pytest.raises(ManifestError, match="slice-00001-of-00003: from another preparation"):
        merge_slices(out)
    with pytest.raises(ManifestError, match="no finished slice"):
        merge_slices(tmp_path / "empty")
    assert main(["merge", str(tmp_path / "empty")]) == 2


def test_slice_from_slurm_array_environment():
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "2"}
    assert slice_from_env(None, None, env) == (1, 2)
    assert slice_from_env(0, 3, env) == (0, 3)  # explicit options win
    assert slice_from_env(None, None, {}) == (0, 1)
    with pytest.raises(ConfigError, match="the index must be in"):
        slice_from_env(3, 3, {})
    with pytest.raises(ConfigError, match="give both"):
        slice_from_env(1, None, {})


def test_mixture_weights_and_task_cap(tmp_path):
    out = tmp_path / "mix"
    m = prepare_sources(_opts(out, [{"path": ALPACA_LIBRE, "weight": 0.5},
                                    {"path": SHAREGPT_DUMMY, "weight": 2, "name": "chat", "template": "tokenizer"}]))
    alp, chat = m["sources"]
    assert alp["counts"]["written"] == 1199 and chat["counts"]["written"] == 500
    assert alp["mixture"]["available"] == 1199 and alp["mixture"]["examples"] == 600  # round(599.5), half to even
    assert (chat["mixture"]["available"], chat["mixture"]["examples"]) == (500, 1000)
    assert (chat["template"], chat["weight"], m["template"]) == ("tokenizer", 2.0, "per_source")
    info = m["splits"]["train"]
    assert info["examples"] == 1600 and info["examples_per_task"] == {"alpaca_libre_tasks_v3": 600, "chat": 1000}
    assert info["counts"]["written"] == 1699  # counts are of records; the mixture is of examples written
    t = open_split(out, "train")
    ids = Counter(sum(t["example_ids"].to_pylist(), []))
    alp_prefix = "alpaca_libre_tasks_v3.jsonl:"
    chat_ids = {k: v for k, v in ids.items() if not k.startswith(alp_prefix)}
    assert len(chat_ids) == 500 and set(chat_ids.values()) == {2}  # every conversation exactly twice
    assert sum(v for k, v in ids.items() if k not in chat_ids) == 600 and max(ids.values()) == 2
    trained = Counter()  # trained tokens per example id, summed over its occurrences in the rows
    for lab, lens, eids in zip(t["labels"].to_pylist(), t["example_lengths"].to_pylist(),
                               t["example_ids"].to_pylist()):
        pos = 0
        for n, e in zip(lens, eids):
            trained["alp" if e.startswith(alp_prefix) else "chat"] += sum(1 for x in lab[pos:pos + n] if x != X)
            pos += n
    assert trained == {"alp": alp["mixture"]["trainable_tokens"], "chat": chat["mixture"]["trainable_tokens"]}
    assert sum(trained.values()) == info["trainable_tokens"]
    assert verify(out) == []
    # the same weights give the same selection; another seed another one
    again = prepare_sources(_opts(tmp_path / "again", [{"path": ALPACA_LIBRE, "weight": 0.5}]))
    other = prepare_sources(_opts(tmp_path / "other", [{"path": ALPACA_LIBRE, "weight": 0.5}], seed=1))
    sel = [Counter(sum(open_split(d, "train")["example_ids"].to_pylist(), []))
           for d in (tmp_path / "again", tmp_path / "other")]
    assert again["sources"][0]["mixture"]["examples"] == other["sources"][0]["mixture"]["examples"] == 600
    assert set(sel[0]) == {k for k in ids if k.startswith(alp_prefix)} and sel[0] != sel[1]


def test_cap_per_task_examples_proportional(tmp_path):
    rows = [{"prompt": f"{t} q{i}", "completion": f"a{i}", "task": t}
            for t, n in (("big", 10), ("mid", 4), ("small", 2)) for i in range(n)]
    f = _jsonl(tmp_path / "tasks.jsonl", rows)
    m = prepare_sources(_opts(tmp_path / "o", [f], task_field="task", max_per_task=3, seq_len=64))
    info = m["splits"]["train"]
    assert info["examples_per_task"] == {"big": 3, "mid": 3, "small": 2}
    assert m["mixture"]["capped_per_task"] == {"big": 7, "mid": 1} and m["mixture"]["max_per_task"] == 3
    assert info["counts"] == {"read": 16, "written": 16, "rejected": {}} and info["examples"] == 8
    assert verify(tmp_path / "o") == []


def test_manifest_length_histograms(single):
    m = read_manifest(single)
    info = m["splits"]["train"]
    t = open_split(single, "train")
    lengths = np.asarray(sum(t["example_lengths"].to_pylist(), []))
    h = info["length_histogram"]
    assert h["edges"] == list(range(0, 513, 16)) and sum(h["counts"]) == info["examples"] == len(lengths)
    assert h["counts"] == np.histogram(lengths, bins=h["edges"])[0].tolist()
    fill = np.asarray([sum(x) for x in t["example_lengths"].to_pylist()])
    assert info["row_fill_histogram"]["counts"] == np.histogram(fill, bins=h["edges"])[0].tolist()
    assert len(m["template_fingerprint"]) == 16 and m["tokenizer"]["fingerprint"]


def test_mixture_file_and_cli(tmp_path, capsys):
    mix = tmp_path / "mix.yaml"
    mix.write_text(yaml.safe_dump({"sources": [{"path": str(SHAREGPT_DUMMY), "weight": 0.1},
                                               {"path": "rel.jsonl", "template": "chat"}], "max_per_task": 40}))
    _jsonl(tmp_path / "rel.jsonl", [{"prompt": "p", "completion": "c"}])
    entries, cap = load_mixture(mix)
    assert cap == 40 and entries[1]["path"] == tmp_path / "rel.jsonl"
    rc = main(["prepare", "--mixture", str(mix), "--tokenizer", str(MISTRAL), "--seq-len", "256",
               "--out", str(tmp_path / "o"), "--num-proc", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "mixture weight 0.1: 4 of 40 examples written" in out
    m = read_manifest(tmp_path / "o")
    assert [s["template"] for s in m["sources"]] == ["chat", "chat"] and m["mixture"]["max_per_task"] == 40
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources:\n  - path: x.jsonl\n    wieght: 2\n")
    rc = main(["prepare", "--mixture", str(bad), "--tokenizer", str(MISTRAL), "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown mixture keys ['wieght']" in err and "x.jsonl: input file not found" in err
    bad.write_text("- a.jsonl\n")
    assert main(["prepare", "--mixture", str(bad), "--tokenizer", str(MISTRAL), "--out", str(tmp_path / "o3")]) == 2
    assert "a non-empty list 'sources'" in capsys.readouterr().err


def test_cli_slices_then_merge(tmp_path, capsys, bad_file):
    out = tmp_path / "o"
    for i in range(2):
        assert main(["prepare", "--input", str(bad_file), "--tokenizer", str(MISTRAL), "--seq-len", "64",
                     "--on-error", "skip", "--num-shards", "2", "--shard-index", str(i), "--out", str(out)]) == 0
    assert "when every slice is done: itune-data merge" in capsys.readouterr().out
    assert main(["merge", str(out)]) == 0
    assert "read 4 = written 2 + rejected 2" in capsys.readouterr().out
    assert verify(out) == [] and not (out / "slices").exists()


def test_superni_slices_and_workers_equal_single_process(tmp_path):
    from itune.data.prepare import PrepareOptions, prepare_superni
    from tests.conftest import SUPERNI

    def opts(out, **kw):
        return PrepareOptions(SUPERNI, MISTRAL, out, seq_len=512, max_instances_per_task=20,
                              max_eval_instances_per_task=10, **kw)

    m = prepare_superni(opts(tmp_path / "one"))
    prepare_superni(opts(tmp_path / "np2", num_proc=2))
    for i in range(2):
        prepare_superni(opts(tmp_path / "sliced", shard_index=i, num_shards=2))
    assert main(["merge", str(tmp_path / "sliced")]) == 0
    one, np2, sliced = (_files(tmp_path / d) for d in ("one", "np2", "sliced"))
    assert sorted(one) == ["manifest.json", "rejects.jsonl", "test-00000-of-00001.arrow", "test_eval.jsonl",
                           "train-00000-of-00001.arrow"]
    assert one == np2
    ms = json.loads(sliced.pop("manifest.json"))
    m1 = json.loads(one.pop("manifest.json"))
    assert one == sliced and ms["splits"] == m1["splits"] and ms["preparation"]["slices"] == 2
    tr, te = m["splits"]["train"], m["splits"]["test"]
    assert te["tasks"] == m["heldout_tasks"] and not set(tr["tasks"]) & set(te["tasks"])
    assert te["eval_instances"] == 10 * len(te["tasks"]) and set(te["examples_per_task"].values()) == {10}
    assert max(tr["examples_per_task"].values()) == 20 and m["prompt_format"] == "tk_instruct"
    assert m["source"]["kind"] == "superni" and len(m["source_files"]) == len(tr["tasks"]) + len(te["tasks"])


def test_token_reader_reopens_past_its_open_file_limit(tmp_path):
    from itune.data.pipeline import _TokenReader, pack_tokens, unpack_tokens

    dirs = []
    for k in range(3):
        d = tmp_path / f"s{k}"
        d.mkdir()
        ids = np.arange(10 * k, 10 * k + 10, dtype=np.int32)
        (d / "tokens.bin").write_bytes(pack_tokens(ids, np.full(10, k % 2, dtype=bool)).tobytes())
        dirs.append(d)
    r = _TokenReader(dirs, max_open=2)
    for sl in (0, 1, 2, 0, 2, 1):
        ids, labels = unpack_tokens(r.read(sl, 3, 4))
        assert ids.tolist() == [10 * sl + 3 + i for i in range(4)]
        assert labels.tolist() == (ids.tolist() if sl % 2 else [X] * 4)
        assert len(r.fds) <= 2
    r.close()
    assert r.fds == {}


def test_token_reader_gathers_from_several_slices_in_one_call(tmp_path):
    """One gather call mixing slices returns the tokens in the requested order; a file shorter than an example's
    end is named."""
    from itune.data.pipeline import _TokenReader

    dirs = []
    for k in range(3):
        d = tmp_path / f"s{k}"
        d.mkdir()
        (d / "tokens.bin").write_bytes(np.arange(1000 * k, 1000 * k + 50, dtype=np.uint32).tobytes())
        dirs.append(d)
    r = _TokenReader(dirs)
    got = r.gather(np.array([2, 0, 2, 1]), np.array([5, 0, 40, 49]), np.array([3, 2, 10, 1]))
    assert got.dtype == np.uint32
    assert got.tolist() == [2005, 2006, 2007, 0, 1] + list(range(2040, 2050)) + [1049]
    assert r.gather(np.array([1]), np.array([7]), np.array([0])).tolist() == []
    with pytest.raises(ManifestError, match=r"s1/tokens.bin: 8 bytes short at token 49"):
        r.gather(np.array([0, 1]), np.array([0, 49]), np.array([1, 3]))
    r.close()


def test_shard_rows_equal_a_plain_layout(tmp_path):
    """_write_shard's vectorised rows equal rows built one token at a time: examples back to back from position
    0 (ids, trained labels, positions restarting per example), then padding (pad id, -100, positions from 0);
    a row filled exactly has no padding run; batches of rows are cut at WRITE_BATCH_ROWS."""
    import pyarrow as pa

    from itune.data import pipeline
    from itune.data.pipeline import _write_shard, pack_tokens

    rng = np.random.default_rng(3)
    seq_len, n = 16, 40
    lengths = rng.integers(1, 9, n)
    lengths[:2] = (seq_len, 10)  # a full row, and (with example 2, 6 tokens) another one
    lengths[2] = 6
    ids = rng.integers(3, 1000, int(lengths.sum())).astype(np.int32)
    trained = rng.random(len(ids)) < 0.5
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "tokens.bin").write_bytes(pack_tokens(ids, trained).tobytes())
    offsets = np.cumsum(lengths) - lengths
    rows, row, used = [], [], 0
    for i in range(n):  # first fit in order: the row layout does not depend on how rows were chosen
        if used + lengths[i] > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += lengths[i]
    rows.append(row)
    order = rng.permutation(len(rows))  # rows in any order, examples in any order within the shard
    rows = [rows[k] for k in order]
    ex = np.array([i for r in rows for i in r])
    job = {"path": str(tmp_path / "shard.arrow"), "dirs": [tmp_path / "s"], "seq_len": seq_len, "pad_id": 0,
           "per_row": np.array([len(r) for r in rows]), "length": lengths[ex].astype(np.int64),
           "slice": np.zeros(len(ex), np.int64), "offset": offsets[ex].astype(np.int64),
           "id": pa.array([f"e{i}" for i in ex])}
    old_batch = pipeline.WRITE_BATCH_ROWS
    pipeline.WRITE_BATCH_ROWS = 3
    try:
        entry = _write_shard(job)
    finally:
        pipeline.WRITE_BATCH_ROWS = old_batch
    t = pa.ipc.open_stream(pa.memory_map(job["path"], "r")).read_all()
    assert entry["rows"] == t.num_rows == len(rows) and t.to_batches()[0].num_rows == 3
    for k, r in enumerate(rows):
        want_ids, want_labels, want_pos = [], [], []
        for i in r:
            span = range(offsets[i], offsets[i] + lengths[i])
            want_ids += [int(ids[j]) for j in span]
            want_labels += [int(ids[j]) if trained[j] else X for j in span]
            want_pos += list(range(lengths[i]))
        pad = seq_len - len(want_ids)
        assert t["input_ids"][k].as_py() == want_ids + [0] * pad
        assert t["labels"][k].as_py() == want_labels + [X] * pad
        assert t["position_ids"][k].as_py() == want_pos + list(range(pad))
        assert t["example_lengths"][k].as_py() == [int(lengths[i]) for i in r]
        assert t["example_ids"][k].as_py() == [f"e{i}" for i in r]
    assert any(sum(lengths[i] for i in r) == seq_len for r in rows)  # a row without padding was written


def test_arrow_helpers_equal_pyarrow_conversions():
    """The data path's numpy <-> Arrow conversions (which skip pyarrow's pandas import) give pyarrow's own
    results, and refuse what they cannot represent."""
    import pyarrow as pa

    from itune.data.shards import arrow_to_numpy, numpy_to_arrow, strings_to_arrow

    for dtype in (np.int8, np.int32, np.int64, np.uint32, np.float64):
        a = np.arange(-3, 7).astype(dtype)[::2]  # a strided view: copied to contiguous memory first
        assert numpy_to_arrow(a).equals(pa.array(a))
        assert numpy_to_arrow(a).type == pa.from_numpy_dtype(np.dtype(dtype))
    assert numpy_to_arrow(np.zeros(0, np.int32)).equals(pa.array(np.zeros(0, np.int32)))
    big_endian = np.array([1, 256, -2], dtype=">i4")
    assert numpy_to_arrow(big_endian).to_pylist() == [1, 256, -2]
    with pytest.raises(ValueError, match="1-D numeric"):
        numpy_to_arrow(np.zeros(3, bool))
    with pytest.raises(ValueError, match="1-D numeric"):
        numpy_to_arrow(np.zeros((2, 2), np.int32))
    words = ["", "a", "héllo", "日本語", "x" * 1000, "😀"]
    assert strings_to_arrow(words).equals(pa.array(words, pa.string()))
    assert strings_to_arrow([]).equals(pa.array([], pa.string()))
    with pytest.raises(UnicodeEncodeError):
        strings_to_arrow(["ok", "\ud800"])
    col = pa.chunked_array([pa.array([1, 2, 3], pa.int64()), pa.array([4, 5], pa.int64())])
    assert arrow_to_numpy(col).tolist() == [1, 2, 3, 4, 5] and arrow_to_numpy(col).dtype == np.int64
    sliced = pa.array(np.arange(10, dtype=np.int32)).slice(3, 4)
    assert arrow_to_numpy(sliced).tolist() == [3, 4, 5, 6]
    with pytest.raises(ValueError, match="without nulls"):
        arrow_to_numpy(pa.array([1, None, 3]))
    with pytest.raises(ValueError, match="without nulls"):
        arrow_to_numpy(pa.array(["a"]))


def test_preparation_does_not_import_pandas(tmp_path):
    """pyarrow's first pa.array / to_numpy call imports pandas (0.2 to 0.3 s of CPU per process) when it is
    installed, as it is here (datasets depends on it); preparation, merge and verify never make one."""
    import subprocess
    import sys

    f = _jsonl(tmp_path / "pc.jsonl", [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(300)])
    code = ("import sys\n"
            "from data_tools.cli import main\n"
            f"rc = main(['prepare', '--input', {str(f)!r}, '--tokenizer', {str(MISTRAL)!r}, '--seq-len', '64', "
            f"'--num-proc', '2', '--max-rows-per-shard', '40', '--out', {str(tmp_path / 'o')!r}])\n"
            f"rc |= main(['verify', {str(tmp_path / 'o')!r}])\n"
            "print('rc', rc, 'pandas', 'pandas' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "rc 0 pandas False", out.stdout + out.stderr
    assert len(read_manifest(tmp_path / "o")["splits"]["train"]["shards"]) > 1  # several shard writers ran


def test_workers_get_chunks_not_the_dataset(tmp_path):
    """Bounded memory (pitfalls: datasets num_proc workers receive the whole table; in-memory packing does not
    scale): at most 2 x num_proc chunks are read ahead of the results, whatever the input size."""
    from itune.data import pipeline

    f = _jsonl(tmp_path / "many.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)])
    plan = pipeline.PipelinePlan(
        sources=[pipeline.SourceSpec(str(f), "many", "prompt_completion", "completion")], source_sha256=["x"], tokenizer=str(MISTRAL), tokenizer_info={},
        seq_len=64, fields={}, train_on="all", overflow="drop", on_error="skip", max_bad_fraction=None,
        task_field=None, heldout_tasks=[], max_eval_instances_per_task=1, max_per_task=None, seed=0, pack=True,
        max_rows_per_shard=10, template_fingerprint="x", chunk_records=2)
    pulled = []

    def jobs():
        for job in pipeline.iter_chunks(plan):
            pulled.append(job[0])
            yield job

    ahead = []
    for k, res in enumerate(pipeline._ordered_results(jobs(), 2, plan)):
        assert res["chunk"] == k  # results in job order
        ahead.append(len(pulled) - k)
    assert k == 19 and max(ahead) == 4 and len(pulled) == 20


def test_examples_are_shuffled_before_packing(tmp_path):
    """Equal-length examples are not packed in file order (pitfalls: shuffling only after packing)."""
    f = _jsonl(tmp_path / "same.jsonl", [{"prompt": f"question {i:03d}", "completion": "yes"} for i in range(60)])
    rows = {}
    for seed in (0, 1):
        prepare_sources(_opts(tmp_path / f"s{seed}", [f], seq_len=64, seed=seed))
        t = open_split(tmp_path / f"s{seed}", "train")
        rows[seed] = sorted(tuple(sorted(x)) for x in t["example_ids"].to_pylist())
        lens = set(sum(t["example_lengths"].to_pylist(), []))
        assert len(lens) == 1  # every example has the same length: only the shuffle decides the rows
    in_file_order = [tuple(f"same.jsonl:{i + 1}" for i in range(r, r + len(rows[0][0])))
                     for r in range(0, 60, len(rows[0][0]))]
    assert rows[0] != rows[1] and sorted(rows[0]) != sorted(in_file_order)


def test_inspect_marks_trained_tokens_and_prints_task_statistics(tmp_path, capsys):
    f = _jsonl(tmp_path / "t.jsonl", [{"prompt": "Say hi", "completion": "hi", "task": "greet"},
                                      {"prompt": "Say yes", "completion": "yes", "task": "agree"},
                                      {"prompt": "Say no", "completion": "no", "task": "agree"},
                                      {"prompt": "Say ok", "completion": "ok", "task": "two\twords\n"}])
    prepare_sources(_opts(tmp_path / "o", [f], seq_len=64, task_field="task", pack=False))
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "o"), "--rows", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    shown = sorted(line for line in out if line.startswith("<s>"))
    # the first piece carries the metaspace prefix; the response and its EOS are trained
    assert shown == ["<s> Say hi[[ hi]][[</s>]]", "<s> Say no[[ no]][[</s>]]", "<s> Say ok[[ ok]][[</s>]]",
                     "<s> Say yes[[ yes]][[</s>]]"]
    # a name with a tab or newline is shown escaped, so the table keeps one line per task
    assert out[-4:] == ["== train: task, examples, trained tokens", "agree\t2\t4", "greet\t1\t2",
                        "'two\\twords'\t1\t2"]


def test_example_mixture_file_is_valid():
    from tests.conftest import ROOT

    path = ROOT / "configs" / "mixture_example.yaml"
    entries, cap = load_mixture(path)
    assert cap == 1000 and [e["weight"] for e in entries] == [0.5, 2]
    assert all(e["path"].is_file() for e in entries)
    assert path.read_text().splitlines()[0].startswith("# itune-data prepare --mixture configs/mixture_example.yaml")


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64])
@pytest.mark.parametrize("cap", [None, 0, 1, 4, 7, 100])
def test_jsonl_blocks_cut_records_not_lines_and_keep_line_numbers(tmp_path, size, cap):
    """The reading process hands workers blocks of raw lines: each block holds `size` records (non-blank lines),
    blank lines keep their numbers, and a cap counts records, exactly as reading line by line would."""
    import itertools

    from itune.data.sources import jsonl_blocks

    f = tmp_path / "blanks.jsonl"
    f.write_bytes(b"\xef\xbb\xbf{\"a\": 1}\n\n  \n{\"a\": 2}\n{\"a\": 3}\n\t\n{\"a\": 4}\n{\"a\": 5}\n{\"a\": 6}\n\n"
                  b"{\"a\": 7}\n   ")
    plain = [(f"{f}:{n}", (raw, n == 1), "raw") for n, raw in enumerate(f.read_bytes().splitlines(True), 1)
             if raw.strip()]  # line by line, blank lines skipped
    want = list(itertools.islice(plain, cap))
    blocks = list(jsonl_blocks(f, size, cap))
    got = [item for b in blocks for item in b.items()]
    assert got == want and len(want) == min(7, 100 if cap is None else cap)
    assert [len(b.items()) for b in blocks] == [min(size, len(want) - i) for i in range(0, len(want), size)]
    assert [loc.rsplit(":", 1)[1] for loc, _, _ in got] == ["1", "4", "5", "7", "8", "9", "11"][:len(got)]


_TEST_PROCESS = os.getpid()
_REAL = {}


def _killed_in_a_child(*args):
    """Stands in for a worker function: in a worker process, the process is killed (as by the out-of-memory
    killer); in the test's own process (the merge writes some shards itself), the real function runs."""
    import signal

    if os.getpid() == _TEST_PROCESS:
        return _REAL["fn"](*args)
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("stage", ["tokenize", "merge"])
def test_a_killed_worker_stops_the_run_with_a_clear_error(tmp_path, bad_file, monkeypatch, stage):
    """A worker process that dies (SIGKILL) makes prepare or merge fail with WorkerError naming the likely cause,
    instead of waiting forever for its result."""
    import signal

    from itune.data import pipeline
    from itune.errors import WorkerError

    out = tmp_path / "o"
    if stage == "merge":
        prepare_sources(_opts(out, [SHAREGPT_DUMMY, bad_file], max_rows_per_shard=17, keep_slices=True))
    name = "_write_shard" if stage == "merge" else "process_chunk"
    _REAL["fn"] = getattr(pipeline, name)
    monkeypatch.setattr(pipeline, name, _killed_in_a_child)
    def hang(*_):
        raise TimeoutError("still waiting for a dead worker after 120 s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(120)  # a hang fails this test, not the whole run
    try:
        with pytest.raises(WorkerError, match="process died before returning its result .*out-of-memory"):
            if stage == "merge":
                merge_slices(out, num_proc=2)
            else:
                prepare_sources(_opts(out, [SHAREGPT_DUMMY, bad_file], num_proc=2))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_merge_cli_refuses_a_num_proc_below_one(tmp_path, capsys):
    """`itune-data merge --num-proc 0` is refused before anything is touched; the slices merge afterwards."""
    out = tmp_path / "o"
    for i in range(2):
        prepare_sources(_opts(out, [SHAREGPT_DUMMY], shard_index=i, num_shards=2))
    before = sorted(p.name for p in (out / "slices").iterdir())
    assert main(["merge", str(out), "--num-proc", "0"]) == 2
    assert "error: --num-proc 0: must be >= 1" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "slices").iterdir()) == before and not (out / "manifest.json").exists()
    assert main(["merge", str(out), "--num-proc", "2"]) == 0 and verify(out) == []


def test_mixture_weight_above_the_bound_is_refused_before_any_work(tmp_path, monkeypatch):
    """A weight is a per-example repeat count: 1e9 or 1e300 used to end in MemoryError / OverflowError after all the
    tokenizing. Above 1000 it is refused up front; the merge also refuses a selection too large to index."""
    import re

    from itune.data import pipeline

    f = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": "a"} for i in range(5)])
    for w in (1e9, 1e300, 1000.5):
        with pytest.raises(ConfigError, match=re.escape(f"d.jsonl: weight {w!r} is above 1000; a weight is how many")):
            prepare_sources(_opts(tmp_path / "o", [{"path": f, "weight": w}]))
        assert not (tmp_path / "o").exists()
    m = prepare_sources(_opts(tmp_path / "o", [{"path": f, "weight": 1000}]))
    assert m["splits"]["train"]["examples"] == 5000
    monkeypatch.setattr(pipeline, "MAX_SELECTED", 4999)
    with pytest.raises(ConfigError, match=r"d.jsonl: weight 1000 x 5 examples = 5000 examples, more than 4999"):
        prepare_sources(_opts(tmp_path / "o2", [{"path": f, "weight": 1000}]))
