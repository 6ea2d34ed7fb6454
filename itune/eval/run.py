"""Held-out evaluation: prepared eval instances -> generation -> official SuperNI scores and reports.

Model sources: an exported Hugging Face checkpoint (no DeepSpeed needed, one process or several), or a training
run directory holding DeepSpeed checkpoints (run under the ``deepspeed`` launcher: the model is rebuilt under
ZeRO-3 and generation uses ``synced_gpus``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from itune.comm import init_distributed
from itune.data import shards
from itune.data.tokenizer import TextTokenizer
from itune.eval import report
from itune.eval.extra_metrics import extra_metrics
from itune.eval.generate import generate_all
from itune.eval.metrics import score_superni
from itune.errors import ConfigError, ManifestError


def load_eval_records(data_dir: str | Path, split: str = "test", max_instances: int | None = None) -> list[dict]:
    """Reads the prepared eval instances of ``split`` (prompt ids rendered by the training renderer).

    Args:
        max_instances: keep the first N per task (None: all prepared, at most 100 per task by default).

    Raises:
        ManifestError: the split has no eval file or its checksum differs from the manifest.
    """
    m = shards.read_manifest(data_dir)
    info = m["splits"].get(split)
    if not info or "eval_file" not in info:
        raise ManifestError(f"{data_dir}: split {split!r} has no evaluation instances (have "
                            f"{[s for s, i in m['splits'].items() if 'eval_file' in i]})")
    path = Path(data_dir) / info["eval_file"]
    if shards.sha256_file(path) != info["eval_sha256"]:
        raise ManifestError(f"{path}: checksum differs from the manifest; prepare the data again")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if max_instances is not None:
        per_task: dict[str, int] = {}
        kept = []
        for r in records:
            per_task[r["task_id"]] = per_task.get(r["task_id"], 0) + 1
            if per_task[r["task_id"]] <= max_instances:
                kept.append(r)
        records = kept
    return records


def contamination_check(data_dir: str | Path, split: str) -> None:
    """Refuses to report a held-out task that also appears in a training split of the same manifest."""
    m = shards.read_manifest(data_dir)
    tasks = set(m["splits"][split]["tasks"])
    for other, info in m["splits"].items():
        if other != split and other == "train":
            both = sorted(tasks & set(info["tasks"]))
            if both:
                raise ManifestError(f"{data_dir}: held-out tasks {both} also appear in the training split; "
                                    "their scores would not be held-out scores")


def evaluate(model, data_dir: str | Path, out_dir: str | Path, *, split: str = "test", batch_size: int = 8,
             max_new_tokens: int = 64, min_new_tokens: int = 0,
             max_instances: int | None = None, synced_gpus: bool = False,
             model_name: str = "", step: int | None = None, do_sample: bool = False, temperature: float = 1.0,
             seed: int = 0,
             training: dict | None = None, ngram_threshold: float = 0.5, xlingual_tokenizer: str | None = None) -> dict:
    """Generates for every eval instance and scores with the official SuperNI protocol.

    Writes (rank 0): ``predictions.jsonl`` and ``references.jsonl`` (official formats), ``official_results.json``
    (the official script's output format), ``results.json`` (official keys + model, step, manifest hash) and
    ``results.md``.

    Predictions are the decoded generated tokens with special tokens removed and surrounding whitespace stripped;
    no other post-processing.

    Contamination guard: held-out tasks that the model was trained on (``training``: the export's
    ``itune_training.json``) are refused, and the fraction of instances whose 13-gram overlap with the training
    rows exceeds ``ngram_threshold`` is reported under ``contamination``.

    Returns:
        The ``results.json`` content.
    """
    contamination_check(data_dir, split)
    m = shards.read_manifest(data_dir)
    tok = TextTokenizer.load(m["tokenizer"]["path"])
    records = load_eval_records(data_dir, split, max_instances)
    contamination = _contamination(records, m, split, tok, training, ngram_threshold, data_dir)
    t0 = time.time()
    gen = generate_all(model, [r["prompt_ids"] for r in records], eos_id=m["tokenizer"]["eos_id"],
                       pad_id=m["tokenizer"]["pad_id"], max_new_tokens=max_new_tokens,
                       min_new_tokens=min_new_tokens, batch_size=batch_size,
                       synced_gpus=synced_gpus, do_sample=do_sample, temperature=temperature, seed=seed)
    seconds = time.time() - t0
    predictions = {r["id"]: tok.decode(g).strip() for r, g in zip(records, gen)}
    scores = score_superni(predictions, records, xlingual_tokenizer=xlingual_tokenizer)
    results = {"model": model_name, "step": step, "split": split, "manifest_hash": shards.manifest_hash(data_dir),
               "num_instances": len(records), "missing_predictions": scores.num_missing_predictions,
               "generation": {"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens, "batch_size": batch_size, "greedy": not do_sample,
                              **({"temperature": temperature, "seed": seed} if do_sample else {}),
                              "seconds": round(seconds, 2)},
               "contamination": contamination, "results": dict(scores),
               "extra_metrics": extra_metrics(predictions, records)}  # chrF / BLEU: not official SuperNI keys
    rank = tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0
    if rank == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report.write_official_files(out, [{**r, "prediction": predictions[r["id"]]} for r in records])
        report.write_results(out / "official_results.json", dict(scores))
        shards.atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
        shards.atomic_write_text(out / "results.md", report.markdown_table(dict(scores), records))
    return results


def _contamination(records, manifest, split, tok, training, threshold, data_dir) -> dict:
    from itune.eval import contamination as c

    if training is None:
        return {"skipped": "the model has no itune_training.json (not exported by an itune training run)"}
    c.check_heldout_tasks(manifest["splits"][split]["tasks"], training["train_tasks"], str(data_dir))
    if training["tokenizer_fingerprint"] != manifest["tokenizer"]["fingerprint"]:
        return {"skipped": "the training data used another tokenizer: token n-grams are not comparable"}
    if not (Path(training["data_path"]) / shards.MANIFEST).is_file():
        return {"skipped": f"training data {training['data_path']} is not available here"}
    grams = c.train_ngrams(training["data_path"], training.get("train_split", "train"))
    refs = [tok.encode_with_offsets(" " + r["references"][0].strip())[0] for r in records]
    return c.overlap_report(records, refs, grams, threshold)


def load_results(path: str | Path) -> dict:
    """Official results dict from a ``results.json`` or an ``official_results.json``.

    Raises:
        ConfigError: the file is not JSON, or holds no official scores (no ``exact_match`` / ``rougeL`` key).
    """
    fix = "--compare takes two results.json files written by itune-eval"
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a results file ({type(e).__name__}: {e}); {fix}") from None
    d = d.get("results") if isinstance(d, dict) and isinstance(d.get("results"), dict) else d
    if not isinstance(d, dict) or not any(k.startswith(("exact_match", "rougeL")) for k in d):
        raise ConfigError(f"{path}: holds no official scores (no exact_match / rougeL keys); {fix}")
    return d


def check_tokenizer(model_dir: str | Path, data_dir: str | Path) -> None:
    """Refuses a model whose tokenizer differs from the one the eval data was prepared with.

    Raises:
        ManifestError: naming both tokenizers and the fix.
    """
    m = shards.read_manifest(data_dir)
    p = Path(model_dir)
    if not (p / "tokenizer.json").is_file():
        return  # a checkpoint without tokenizer files: nothing to compare (vocabulary size is checked below)
    fp = TextTokenizer.load(p).fingerprint
    if fp != m["tokenizer"]["fingerprint"]:
        raise ManifestError(f"{p}: its tokenizer (fingerprint {fp}) is not the one {data_dir} was prepared with "
                            f"({m['tokenizer']['path']}, fingerprint {m['tokenizer']['fingerprint']}); prepare the "
                            f"eval data with the model's tokenizer: itune-data prepare ... --tokenizer {p}")


def model_from_export(path: str | Path, data_dir: str | Path | None = None):
    """An exported checkpoint (or a LoRA adapter directory, ``export/adapter``, merged onto the base checkpoint its
    ``adapter_config.json`` names) as a plain fp32 module on CPU (bf16 on CUDA); checked against ``data_dir``'s
    tokenizer when given.

    Raises:
        ConfigError: not a model directory, or a truncated or missing safetensors file (one line per file).
        ManifestError: tokenizer or vocabulary mismatch.
    """
    from itune.checkpoint import load_export, safetensors_problems

    p = Path(path)
    adapter = p
    if (p / "adapter_config.json").is_file():  # a LoRA adapter (export/adapter): checked on its base checkpoint
        base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise ConfigError(f"{p / 'adapter_config.json'}: base_model_name_or_path {base!r} is not a local model "
                              "directory; set it to the base checkpoint, or evaluate the merged export")
        p = Path(base)
    if not (p / "config.json").is_file():
        raise ConfigError(f"{p}: not a Hugging Face model directory (no config.json)")
    problems = safetensors_problems(p)
    if problems:
        raise ConfigError("\n".join(problems))
    if data_dir is not None:
        check_tokenizer(p, data_dir)
        vocab = json.loads((p / "config.json").read_text()).get("vocab_size")
        need = shards.read_manifest(data_dir)["tokenizer"]["vocab_size"]
        if vocab is not None and vocab < need:
            raise ManifestError(f"{p}: vocabulary of {vocab} ids, but {data_dir} uses {need}; prepare the eval data "
                                "with the model's tokenizer")
    cuda = torch.cuda.is_available()
    model = load_export(adapter, dtype=torch.bfloat16 if cuda else torch.float32)
    return model.cuda() if cuda else model


def _recorded_training(run_dir: Path, tag: str, state: dict) -> dict | None:
    """What the run's checkpoint ``tag`` trained on (``itune_training.json`` fields): from its ``itune_state.json``
    (``training``), else from an export of the same data beside it (``checkpoints/TAG/hf``, ``export``); None
    for a run that recorded neither."""
    if isinstance(state.get("training"), dict):
        return state["training"]
    for d in (run_dir / "checkpoints" / tag / "hf", run_dir / "export"):
        p = d / "itune_training.json"
        if p.is_file():
            rec = json.loads(p.read_text())
            if rec.get("manifest_hash") == state.get("manifest_hash"):
                return {**rec, "step": state["global_step"]}
    return None


def run_data(run_dir: str | Path, tag: str, state: dict, eval_data: str | Path | None = None) -> tuple[dict, dict]:
    """The manifest whose tokenizer the run's model is rebuilt with, and the run's training record.

    The run's ``data.path`` as written in its config (relative paths are resolved from the current directory),
    else the absolute path the run recorded. When neither holds the data, an explicit ``eval_data`` prepared with
    the tokenizer the run recorded (its fingerprint) is used instead.

    Raises:
        ConfigError: the training data is not found and no ``eval_data`` is given (or the run recorded no
            tokenizer to check it against); names the path and says to pass ``--data``.
        ManifestError: ``eval_data`` was prepared with another tokenizer than the run's.
    """
    from itune.config import RELATIVE_PATHS

    run_dir = Path(run_dir)
    given = state["config"]["data"]["path"]
    recorded = _recorded_training(run_dir, tag, state)
    candidates = [Path(given)] + [Path(p) for p in ((state.get("paths") or {}).get("data.path"),
                                                    (recorded or {}).get("data_path")) if p]
    train_dir = next((d for d in candidates if (d / shards.MANIFEST).is_file()), None)
    if train_dir is not None:
        m = shards.read_manifest(train_dir)
        if eval_data is not None and shards.read_manifest(eval_data)["tokenizer"]["fingerprint"] != m["tokenizer"][
                "fingerprint"]:
            raise ManifestError(f"{eval_data} was prepared with another tokenizer than the run's training data "
                                f"{train_dir}; prepare it with {m['tokenizer']['path']}")
        training = {"step": state["global_step"], "data_path": str(train_dir.resolve()),
                    "train_split": state["config"]["data"]["train_split"], "manifest_hash": state["manifest_hash"],
                    "tokenizer_fingerprint": m["tokenizer"]["fingerprint"],
                    "train_tasks": m["splits"][state["config"]["data"]["train_split"]]["tasks"]}
        return m, training
    note = "" if Path(given).is_absolute() else f" ({RELATIVE_PATHS.format(cwd=Path.cwd())})"
    elsewhere = [str(d) for d in dict.fromkeys(candidates[1:]) if d != Path(given)]
    missing = (f"{run_dir}: the run's data.path {given} not found{note}"
               + (f", nor at {' or '.join(elsewhere)} where the run recorded it" if elsewhere else ""))
    if eval_data is None:
        raise ConfigError(f"{missing}; pass --data DIR, data prepared with the run's tokenizer")
    if recorded is None:
        raise ConfigError(f"{missing}, and the run records no tokenizer fingerprint to check --data {eval_data} "
                          "against; run from the directory the training was launched from")
    m = shards.read_manifest(eval_data)
    if m["tokenizer"]["fingerprint"] != recorded["tokenizer_fingerprint"]:
        raise ManifestError(f"{eval_data}: prepared with tokenizer {m['tokenizer']['path']} (fingerprint "
                            f"{m['tokenizer']['fingerprint']}), but the run {run_dir} trained with fingerprint "
                            f"{recorded['tokenizer_fingerprint']}; prepare it with the run's tokenizer")
    return m, {**recorded, "step": state["global_step"]}


def engine_from_run(run_dir: str | Path, eval_data: str | Path | None = None):
    """Rebuilds the ZeRO-3 model of a training run and loads its latest DeepSpeed checkpoint (weights only).

    The tokenizer ids and vocabulary come from the run's training data, or from ``eval_data`` when that data is
    not here (:func:`run_data`); ``ds_config`` and ``model.pretrained`` are read as the run's config writes them
    (relative paths from the current directory), else at the absolute paths the run recorded.

    Must run under a distributed launcher (or as a single process); returns ``(module, step, training_record)``.
    """
    from itune import checkpoint, dist
    from itune.config import BatchPlan, config_from_dict, path_not_found
    from itune.model import (attention, build_ds_config, build_model, embedding_rows, model_config, resize_embeddings,
                             use_bf16)

    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = checkpoint.latest_tag(ckpt_dir)
    if tag is None:
        raise ConfigError(f"{ckpt_dir}: no checkpoint (no 'latest' file)")
    state = json.loads((ckpt_dir / tag / "itune_state.json").read_text())
    cfg = config_from_dict(state["config"])
    m, training = run_data(run_dir, tag, state, eval_data)
    paths = state.get("paths") or {}

    def recorded(key: str, given: str) -> str:  # the path as written if it exists, else the one the run recorded
        if Path(given).exists():
            return given
        if paths.get(key) and Path(paths[key]).exists():
            return paths[key]
        raise ConfigError(f"{run_dir}: the run's {path_not_found(key, given)}")

    cfg.ds_config = recorded("ds_config", cfg.ds_config)
    if cfg.model.pretrained:
        cfg.model.pretrained = recorded("model.pretrained", cfg.model.pretrained)
    env = dist.resolve()
    dist.export_for_torch(env)
    cuda = init_distributed()
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    plan = BatchPlan(1, m["seq_len"], 1, 1, tdist.get_world_size(), 1, None)
    hf_config = model_config(cfg, m["tokenizer"]["vocab_size"])
    for k in ("bos_id", "eos_id", "pad_id"):
        setattr(hf_config, k.replace("_id", "_token_id"), m["tokenizer"][k])
    hf_config.use_cache = True
    bf16 = use_bf16(cfg.model, cuda)
    ds_config = build_ds_config(cfg.ds_config, plan, cfg.optim, hf_config.hidden_size, bf16)
    dschf = HfDeepSpeedConfig(ds_config)
    model = build_model(cfg, hf_config, bf16, attention(cfg, hf_config, cuda)[0])
    # the embedding rows the run trained with (grown for a tokenizer with added tokens); the checkpoint fills them
    resize_embeddings(model, embedding_rows(hf_config.vocab_size, m["tokenizer"]["vocab_size"], cfg.model), ds_config)
    model.gradient_checkpointing_disable()
    model.config.use_cache = True
    # ZeRO-3 restores partitioned weights through its optimizer wrapper; an optimizer with lr 0 is never stepped
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_only=True, load_optimizer_states=False,
                           load_lr_scheduler_states=False)
    engine.module._itune_keepalive = dschf
    return engine.module, state["global_step"], training
