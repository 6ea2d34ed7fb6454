"""A manifest carries its own integrity record, and its tokenizer fields must agree with the tokenizer files:
an edited manifest (eos_id, pad_id, vocab_size, seq_len) is refused in one line by every reader (verify, the
trainer's preflight) before any work, instead of training silently with wrong values."""

import json

import pytest

from data_tools.cli import main as data_main
from itune.config import load_config
from itune.data import shards
from itune.errors import ManifestError
from itune.train import preflight
from tests.conftest import MISTRAL, run_cmd


@pytest.fixture
def prepared(tmp_path):
    src = tmp_path / "three.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Say {w}.", "completion": f" {w}"}) + "\n"
                           for w in ("one", "two", "three")))
    out = tmp_path / "data"
    run_cmd(["itune-data", "prepare", "--input", str(src), "--tokenizer", str(MISTRAL), "--seq-len", "32",
             "--out", str(out)])
    return out


def _edit(out, **tokenizer_fields):
    m = json.loads((out / "manifest.json").read_text())
    m["tokenizer"].update(tokenizer_fields)
    return m


@pytest.mark.parametrize("edit", [{"eos_id": 5}, {"pad_id": 0}, {"vocab_size": 32000}, {"seq_len": 64}])
def test_a_hand_edited_manifest_is_refused_everywhere(prepared, edit, capsys):
    m = json.loads((prepared / "manifest.json").read_text())
    assert m["format_version"] == 2 and m["integrity"]["sha256"] == shards.manifest_integrity(m)
    for k, v in edit.items():
        (m if k == "seq_len" else m["tokenizer"])[k] = v
    (prepared / "manifest.json").write_text(json.dumps(m, indent=2))
    with pytest.raises(ManifestError) as e:
        shards.read_manifest(prepared)
    assert str(e.value).startswith(f"{prepared / 'manifest.json'}: edited after preparation (its integrity sha256 ")
    assert str(e.value).endswith("a changed tokenizer id, vocab_size or seq_len would train with wrong values: "
                                 "prepare the data again")
    assert data_main(["verify", str(prepared)]) == 2
    assert "edited after preparation" in capsys.readouterr().err
    with pytest.raises(ManifestError, match="edited after preparation"):
        preflight(load_config(None, [f"data.path={prepared}", f"output_dir={prepared.parent / 'run'}"]))


def test_tokenizer_fields_must_agree_with_the_tokenizer_files(prepared, capsys):
    assert shards.verify(prepared) == []
    shards.write_manifest(prepared, _edit(prepared, eos_id=5, pad_id=7))  # consistent record, wrong values
    expected = [f"tokenizer.eos_id: the manifest says 5, the tokenizer files in {MISTRAL} give 2",
                f"tokenizer.pad_id: the manifest says 7, the tokenizer files in {MISTRAL} give 2"]
    assert shards.tokenizer_problems(shards.read_manifest(prepared)) == expected
    assert shards.verify(prepared)[:2] == expected
    with pytest.raises(ManifestError) as e:
        preflight(load_config(None, [f"data.path={prepared}", f"output_dir={prepared.parent / 'run'}"]))
    assert str(e.value) == (f"{prepared / 'manifest.json'}: {'; '.join(expected)}; the tokenizer changed after "
                            "preparation: prepare the data again")


def test_a_manifest_of_the_previous_format_is_refused(prepared):
    m = json.loads((prepared / "manifest.json").read_text())
    del m["integrity"]
    m["format_version"] = 1
    (prepared / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="format_version 1, this itune reads 2; prepare the data again"):
        shards.read_manifest(prepared)
