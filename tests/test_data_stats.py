"""itune-data stats: exact length / fill / trained-token statistics of a split, and the PNG they are drawn into."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.cli import main
from itune.data import shards
from itune.data.shards import open_split, read_manifest
from itune.data.stats import length_stats, write_stats_png
from tests.conftest import MISTRAL
from tests.test_sources import _jsonl

X = -100
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def _hand_built(tmp_path) -> Path:
    """seq_len 8, three rows: [a(5) b(2) pad], [c(4) pad x4], [d(8)]; trained tokens a 2, b 1, c 3, d 8."""
    rows = [
        ([("a", 5, 2), ("b", 2, 1)]),
        ([("c", 4, 3)]),
        ([("d", 8, 8)]),
    ]
    cols = {k: [] for k in shards.SCHEMA.names}
    for row in rows:
        ids, labels, pos = [], [], []
        for _, n, trained in row:
            ids += list(range(10, 10 + n))
            labels += [X] * (n - trained) + list(range(10 + n - trained, 10 + n))
            pos += list(range(n))
        pad = 8 - len(ids)
        cols["input_ids"].append(ids + [0] * pad)
        cols["labels"].append(labels + [X] * pad)
        cols["position_ids"].append(pos + list(range(pad)))
        cols["example_lengths"].append([n for _, n, _ in row])
        cols["example_ids"].append([i for i, _, _ in row])
    out = tmp_path / "hand"
    out.mkdir()
    sh = shards.write_shards(out, "train", cols, max_rows_per_shard=2)
    shards.write_manifest(out, {"format_version": shards.FORMAT_VERSION, "seq_len": 8,
                                "splits": {"train": {"rows": 3, "shards": sh}}})
    return out


def test_exact_values_hand_built(tmp_path):
    d = _hand_built(tmp_path)
    s = length_stats(d, "train", bins=4, fill_bins=4)
    assert s == {
        "data_dir": str(d), "split": "train", "seq_len": 8,
        "examples": 4, "rows": 3, "tokens": 19, "trainable_tokens": 14, "padding_tokens": 5,
        "packing_efficiency": round(19 / 24, 6),
        "example_length": {"mean": 19 / 4, "median": 4.5, "min": 2, "max": 8},
        # lengths 5, 2, 4, 8 in [0,2) [2,4) [4,6) [6,8]: the last bin is closed, so 8 counts
        "length_histogram": {"edges": [0, 2, 4, 6, 8], "counts": [0, 1, 2, 1]},
        # fills 7/8, 4/8, 8/8
        "fill_histogram": {"edges": [0.0, 0.25, 0.5, 0.75, 1.0], "counts": [0, 0, 1, 2]},
        # trained 2, 1, 3, 8: padding (-100) is never counted and no example borrows its neighbour's tokens
        "trainable_histogram": {"edges": [0, 2, 4, 6, 8], "counts": [1, 2, 0, 1]},
    }
    # seq_len not divisible by bins: width ceil(8 / 3) = 3, last edge 9 >= seq_len
    s3 = length_stats(d, "train", bins=3)
    assert s3["length_histogram"] == {"edges": [0, 3, 6, 9], "counts": [1, 2, 1]}


def _records():
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    return [{"prompt": f"Q{i}: " + " ".join(words[: 1 + (i * 5) % 12]) + "?\nA:",
             "completion": " " + " ".join(words[: 1 + (i * 7) % 9])} for i in range(17)]


@pytest.fixture
def prepared(tmp_path):
    src = _jsonl(tmp_path / "pc.jsonl", _records())
    out = tmp_path / "data"
    assert main(["prepare", "--input", str(src), "--format", "prompt_completion", "--tokenizer", str(MISTRAL),
                 "--seq-len", "64", "--out", str(out)]) == 0
    return out


def _histogram(values, edges):
    counts = [0] * (len(edges) - 1)
    for v in values:
        for i in range(len(counts)):
            if edges[i] <= v < edges[i + 1] or (i == len(counts) - 1 and v == edges[-1]):
                counts[i] += 1
                break
    return counts


def test_matches_arrow_table_and_manifest(prepared):
    m = read_manifest(prepared)
    info = m["splits"]["train"]
    t = open_split(prepared, "train")
    lengths, row_tokens, trained = [], [], []
    for r in range(t.num_rows):
        ls, labels = t["example_lengths"][r].as_py(), t["labels"][r].as_py()
        pos = 0
        for n in ls:
            trained.append(sum(x != X for x in labels[pos:pos + n]))
            pos += n
        lengths += ls
        row_tokens.append(sum(ls))
    s = length_stats(prepared, "train")
    assert s["seq_len"] == 64 and s["rows"] == t.num_rows == info["rows"]
    assert s["examples"] == len(lengths) == info["counts"]["written"] == 17
    assert s["tokens"] == sum(lengths) == info["tokens"]
    assert s["trainable_tokens"] == sum(trained) == info["trainable_tokens"]
    assert s["padding_tokens"] == info["padding_tokens"]
    assert s["packing_efficiency"] == info["packing_efficiency"]
    assert s["example_length"]["max"] == max(lengths) == info["max_example_tokens"]
    assert s["example_length"]["min"] == min(lengths)
    assert s["example_length"]["mean"] == sum(lengths) / len(lengths)
    mid = sorted(lengths)
    assert s["example_length"]["median"] == mid[8]  # 17 examples
    # more than one example per row, else the fill and per-row sums test nothing
    assert t.num_rows < len(lengths)
    edges = s["length_histogram"]["edges"]
    assert edges == list(range(0, 66, 2))
    assert s["length_histogram"]["counts"] == _histogram(lengths, edges)
    assert s["trainable_histogram"]["counts"] == _histogram(trained, edges)
    assert sum(s["length_histogram"]["counts"]) == sum(s["trainable_histogram"]["counts"]) == s["examples"]
    fill = s["fill_histogram"]
    assert fill["edges"] == [i / 20 for i in range(21)]
    assert fill["counts"] == _histogram([n / 64 for n in row_tokens], fill["edges"])
    assert sum(fill["counts"]) == s["rows"]


def _read_png(path):
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 0 and im.height > 0
        return im.size


def test_cli_writes_png_and_summary(prepared, tmp_path, capsys):
    assert main(["stats", str(prepared)]) == 0
    out = capsys.readouterr().out
    s = length_stats(prepared, "train")
    png = prepared / "stats-train.png"
    assert f"train: 17 examples in {s['rows']} rows of 64 tokens; {s['tokens']} tokens " in out
    assert f"packing efficiency {s['packing_efficiency']:.4f}" in out
    assert f"wrote {png}" in out
    w, h = _read_png(png)
    assert (w, h) == (1500, 420)
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] == (420, 1500)
    assert not [p for p in prepared.iterdir() if p.name.endswith(".tmp")]
    # --out into a directory that does not exist yet; overwriting an existing file
    other = tmp_path / "plots" / "s.png"
    assert main(["stats", str(prepared), "--split", "train", "--out", str(other)]) == 0
    assert main(["stats", str(prepared), "--out", str(other)]) == 0
    _read_png(other)
    assert [p.name for p in other.parent.iterdir()] == ["s.png"]


def test_write_stats_png_empty_split(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    shards.write_manifest(out, {"format_version": shards.FORMAT_VERSION, "seq_len": 16,
                                "splits": {"train": {"rows": 0, "shards": []}}})
    s = length_stats(out, "train", bins=4, fill_bins=2)
    assert (s["examples"], s["rows"], s["tokens"], s["packing_efficiency"]) == (0, 0, 0, 0.0)
    assert s["length_histogram"] == {"edges": [0, 4, 8, 12, 16], "counts": [0, 0, 0, 0]}
    assert s["fill_histogram"]["counts"] == [0, 0]
    _read_png(write_stats_png(s, tmp_path / "e.png"))


def test_cli_errors(tmp_path, prepared, capsys):
    missing = tmp_path / "nowhere"
    assert main(["stats", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{missing / 'manifest.json'}: not found" in err
    assert not missing.exists()
    assert main(["stats", str(prepared), "--split", "test"]) == 2
    assert "no split 'test' in manifest (have ['train'])" in capsys.readouterr().err
    assert not (prepared / "stats-test.png").exists()


def test_import_is_light():
    code = ("import sys, itune.data.stats; bad = [m for m in ('matplotlib', 'torch', 'deepspeed') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
