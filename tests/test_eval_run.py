"""Evaluation refuses a model whose tokenizer is not the one the eval data was prepared with."""

import shutil

import pytest

from itune.data.prepare import PrepareOptions, prepare_superni
from itune.data.tokenizer import train_sentencepiece
from itune.errors import ManifestError
from itune.eval.run import check_tokenizer
from tests.conftest import MISTRAL, SUPERNI


def test_tokenizer_mismatch_is_refused(tmp_path):
    data = tmp_path / "data"
    prepare_superni(PrepareOptions(SUPERNI, MISTRAL, data, seq_len=1024))
    same = tmp_path / "model_same"
    shutil.copytree(MISTRAL, same)
    check_tokenizer(same, data)  # the same tokenizer files: accepted
    other = train_sentencepiece([f"the cat sat on the mat {i}" for i in range(200)], tmp_path / "model_other",
                                vocab_size=400)
    with pytest.raises(ManifestError, match="is not the one .* was prepared with"):
        check_tokenizer(other, data)


def _tiny_model():
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_generation_batched_equals_unbatched_and_sampling_is_seeded():
    from itune.eval.generate import generate_all

    model = _tiny_model()
    prompts = [[1, 5, 6, 7], [1, 9], [1, 10, 11, 12, 13, 14, 15], [1, 3, 3]]
    one = generate_all(model, prompts, eos_id=2, pad_id=2, max_new_tokens=6, batch_size=1)
    four = generate_all(model, prompts, eos_id=2, pad_id=2, max_new_tokens=6, batch_size=4)
    assert one == four and all(len(g) >= 1 for g in one)
    s1 = generate_all(model, prompts, eos_id=2, pad_id=2, max_new_tokens=6, do_sample=True, temperature=1.5, seed=3)
    s2 = generate_all(model, prompts, eos_id=2, pad_id=2, max_new_tokens=6, do_sample=True, temperature=1.5, seed=3)
    assert s1 == s2 and s1 != one


def test_out_of_range_generation_options_are_refused_together_before_loading(superni_data, tmp_path, capsys):
    from itune.eval.cli import main

    rc = main(["--data", str(superni_data(512)), "--model", str(tmp_path / "no-model"), "--split", "nope",
               "--batch-size", "0", "--max-new-tokens", "-5", "--max-instances", "0", "--sample",
               "--temperature", "0", "--ngram-threshold", "2", "--xlingual-tokenizer", str(tmp_path / "nowhere")])
    assert rc == 2
    assert capsys.readouterr().err == (
        "error: invalid evaluation options:\n"
        "  - --batch-size: must be >= 1, got 0\n"
        "  - --max-new-tokens: must be >= 1, got -5\n"
        "  - --max-instances: must be >= 1, got 0\n"
        "  - --temperature: must be > 0 with --sample, got 0.0\n"
        "  - --ngram-threshold: a fraction in [0, 1], got 2.0\n"
        f"  - --xlingual-tokenizer: {tmp_path / 'nowhere'} not found; give a tokenizer directory or leave the option "
        "out\n"
        f"  - --split 'nope': {superni_data(512)} has splits ['test', 'train']\n")
    rc = main(["--data", str(superni_data(512)), "--model", str(tmp_path / "no-model"), "--min-new-tokens", "50",
               "--max-new-tokens", "4"])
    assert rc == 2 and "--min-new-tokens 50 exceeds --max-new-tokens 4" in capsys.readouterr().err


@pytest.mark.parametrize("content,problem", [
    ("notjson", "not a results file (JSONDecodeError: Expecting value: line 1 column 1 (char 0))"),
    ("[1, 2]", "holds no official scores (no exact_match / rougeL keys)"),
    ('{"a": 1}', "holds no official scores (no exact_match / rougeL keys)"),
])
def test_compare_refuses_a_file_that_is_not_results(tmp_path, capsys, content, problem):
    from itune.eval.cli import main

    good = tmp_path / "results.json"
    good.write_text('{"results": {"exact_match": 1.0, "rougeL": 2.0}}')
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert main(["--compare", str(good), str(bad)]) == 2
    assert capsys.readouterr().err == (f"error: {bad}: {problem}; --compare takes two results.json files written "
                                       "by itune-eval\n")
