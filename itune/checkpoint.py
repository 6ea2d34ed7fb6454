"""DeepSpeed checkpoints with loader state, and the verified Hugging Face export.

Layout of ``output_dir/checkpoints``: ``global_stepN/`` per checkpoint (DeepSpeed's per-rank files plus
``itune_state.json``) and DeepSpeed's ``latest`` file, rewritten only after every rank finished writing, so a crash
mid-save leaves the previous checkpoint as ``latest``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as tdist

from itune.fileio import atomic_write_text

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")


def latest_tag(ckpt_dir: Path) -> str | None:
    p = Path(ckpt_dir) / "latest"
    return p.read_text().strip() if p.is_file() else None


def save(engine, ckpt_dir: Path, step: int, state: dict, keep_last: int, rank: int) -> str:
    """Saves ``global_step{step}`` on every rank; rank 0 then writes ``itune_state.json`` and prunes old tags.

    Args:
        state: JSON-serialisable trainer state (global step, loader position, config, manifest hash, versions).
    """
    tag = f"global_step{step}"
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"itune": state, "rng": rng}, save_latest=False)
    tdist.barrier()
    if rank == 0:
        atomic_write_text(Path(ckpt_dir) / tag / "itune_state.json", json.dumps(state, indent=2))
        atomic_write_text(Path(ckpt_dir) / "latest", tag)  # last: latest names only complete checkpoints
        steps = sorted(int(m.group(1)) for p in Path(ckpt_dir).iterdir()
                       if p.is_dir() and (m := re.fullmatch(r"global_step(\d+)", p.name)))
        for old in steps[:-keep_last]:
            for d in (f"global_step{old}", f"global_step{old}_universal"):
                shutil.rmtree(Path(ckpt_dir) / d, ignore_errors=True)
    tdist.barrier()
    return tag


def load(engine, ckpt_dir: Path, tag: str) -> None:
    """Loads checkpoint ``tag`` into the engine: weights, optimizer and scheduler states.

    Raises:
        RuntimeError: DeepSpeed could not load it (the message names the directory).
    """
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"{Path(ckpt_dir) / tag}: DeepSpeed could not load this checkpoint")
    rng = (client or {}).get("rng")
    if rng:  # per-rank RNG streams continue where they stopped (not restored from universal checkpoints)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def to_universal(ckpt_dir: Path, tag: str, rank: int) -> str:
    """Converts ``tag`` to DeepSpeed's universal checkpoint format (``<tag>_universal``), once, on rank 0, with
    ``deepspeed.checkpoint.ds_to_universal``; the engine must be configured with
    ``"checkpoint": {"load_universal": true}`` to load it on another number of ranks (DeepSpeed PR #5475)."""
    import subprocess
    import sys

    out = Path(ckpt_dir) / f"{tag}_universal"
    if rank == 0 and not out.is_dir():
        tmp = Path(ckpt_dir) / f".{tag}_universal.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        p = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                            str(Path(ckpt_dir) / tag), "--output_folder", str(tmp), "--num_extract_workers", "1",
                            "--num_merge_workers", "1"], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"converting {Path(ckpt_dir) / tag} to a universal checkpoint failed:\n"
                               f"{p.stderr[-3000:]}")
        os.replace(tmp, out)
    tdist.barrier()
    return out.name


def gathered_state_dict(engine) -> dict | None:
    """Full (unpartitioned) state dict on rank 0, None elsewhere. Every rank must call it (ZeRO-3 gathers)."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    sd = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    return sd if tdist.get_rank() == 0 else None


def drop_tied_aliases(model, state_dict: dict) -> dict:
    """The state dict without the second names of tied weights (``lm_head.weight`` when it is
    ``model.embed_tokens.weight``): safetensors refuses tensors that share memory, and transformers re-ties them
    on load from ``tie_word_embeddings``, as its own ``save_pretrained`` does. A key is dropped only when its tensor
    shares storage with a kept key and the module lists it under no parameter or buffer name of its own
    (``named_parameters`` names a tied parameter once)."""
    own = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    kept: dict = {}
    seen: dict = {}
    for k in sorted(state_dict, key=lambda k: k not in own):  # canonical names first
        v = state_dict[k]
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if ptr is not None and ptr in seen and k not in own:
            continue
        if ptr is not None:
            seen.setdefault(ptr, k)
        kept[k] = v
    return {k: kept[k] for k in state_dict if k in kept}


def hub_layout(model, state_dict: dict) -> dict:
    """``state_dict`` in the layout of the family's published checkpoints, as ``save_pretrained`` writes it
    (``save_original_format``): transformers loads some families into fused modules (Mixtral's per-expert
    ``block_sparse_moe.experts.N.w1/w2/w3`` become ``mlp.experts.gate_up_proj`` / ``down_proj``) and reverts that
    on save (``transformers.core_model_loading.revert_weight_conversion``), so the export also loads in tools that
    read the published layout. Unchanged for a family without such a conversion."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, state_dict)


def write_export(model, state_dict: dict, hf_config, tokenizer_dir: Path, out_dir: Path) -> None:
    """Writes safetensors weights, config, generation config and tokenizer files to ``out_dir`` (rank 0 only).

    Tied weights are written once (:func:`drop_tied_aliases`); ``config.json`` keeps ``tie_word_embeddings``;
    the tensors are named and shaped as the family's published checkpoints (:func:`hub_layout`).

    Raises:
        RuntimeError: a tensor is empty or its shape differs from the model's (the ZeRO-3 "empty export" bug,
            DeepSpeed #3841).
    """
    expected = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    for name, shape in expected.items():
        t = state_dict.get(name)
        if t is None or t.numel() == 0 or tuple(t.shape) != shape:
            got = None if t is None else tuple(t.shape)
            raise RuntimeError(f"export: tensor {name} has shape {got}, expected {shape}; refusing to write")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in hub_layout(model, drop_tied_aliases(model, state_dict)).items()},
              str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    import copy

    from transformers import GenerationConfig

    cfg = copy.deepcopy(hf_config)
    cfg.use_cache = True
    cfg.save_pretrained(tmp)
    GenerationConfig.from_model_config(cfg).save_pretrained(tmp)
    for f in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / f).is_file():
            shutil.copy(Path(tokenizer_dir) / f, tmp / f)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


SAFETENSORS_INDEX = "model.safetensors.index.json"
DAMAGED = "the file is damaged or incomplete (re-download or re-save the checkpoint)"


def safetensors_problems(model_dir: str | Path) -> list[str]:
    """What would stop ``from_pretrained(..., use_safetensors=True)`` reading the weights of ``model_dir``, found
    from the files' headers alone (8-byte length + JSON header, whose tensors must end exactly at the end of the
    file): a truncated or damaged ``*.safetensors`` file, a shard named by ``model.safetensors.index.json`` that
    is missing, no safetensors weights at all. One line per problem, naming the file."""
    d = Path(model_dir)
    index = d / SAFETENSORS_INDEX
    if index.is_file():
        try:
            files = [d / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            return [f"{index}: not a safetensors index (a JSON object with a weight_map); {DAMAGED}"]
    else:
        files = sorted(d.glob("*.safetensors"))
    if not files:
        return [f"{d}: no model.safetensors or {SAFETENSORS_INDEX} (weights are read from safetensors files only)"]
    problems = []
    for f in files:
        if not f.is_file():
            problems.append(f"{f}: missing, but {index.name} names it; the checkpoint is incomplete (re-download or "
                            "re-save the checkpoint)")
        elif (why := _safetensors_damage(f)) is not None:
            problems.append(f"{f}: {why}; {DAMAGED}")
    return problems


def _safetensors_damage(f: Path) -> str | None:
    """Why the safetensors file ``f`` cannot be read (its size against its header), or None."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            return f"{size} bytes, but its header alone needs {8 + n}"
        try:
            meta = json.loads(fh.read(n))
            end = max((int(t["data_offsets"][1]) for k, t in meta.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, UnicodeDecodeError):
            return "its header is not a safetensors header"
    if 8 + n + end != size:
        return f"{size} bytes, but its header describes {8 + n + end}"
    return None


def write_lora_export(peft_model, state_dict: dict, hf_config, tokenizer_dir: Path, out_dir: Path) -> None:
    """Writes the export of a LoRA run (rank 0): the merged model in ``out_dir`` (:func:`write_export`: base +
    ``alpha / r x B A`` folded into each adapted weight by PEFT's ``merge_and_unload``, loads with
    ``from_pretrained``) and the adapter in PEFT format in ``out_dir/adapter`` (``adapter_config.json`` +
    ``adapter_model.safetensors``, loads with ``PeftModel.from_pretrained`` on the base checkpoint).

    The trained weights (``state_dict``, gathered from ZeRO-3) are loaded into a CPU copy of the run's PEFT model
    built from ``hf_config`` and the run's ``LoraConfig``.

    Raises:
        RuntimeError: the gathered state does not fit the copy (a missing or unexpected tensor), or
            :func:`write_export`'s checks.
    """
    import copy

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    lora_cfg = copy.deepcopy(peft_model.peft_config["default"])
    base_path = getattr(peft_model.config, "_name_or_path", None)
    lora_cfg.base_model_name_or_path = str(Path(base_path).resolve()) if base_path and Path(base_path).is_dir() \
        else None
    twin = get_peft_model(AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32), lora_cfg)
    missing, unexpected = twin.load_state_dict(state_dict, strict=False)
    tied = {n for n in missing if n.endswith("lm_head.weight") and getattr(hf_config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"LoRA export: the gathered weights do not fit the model (missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]})")
    out_dir = Path(out_dir)
    adapter_tmp = out_dir.with_name(out_dir.name + ".adapter.tmp")
    shutil.rmtree(adapter_tmp, ignore_errors=True)
    twin.save_pretrained(str(adapter_tmp), safe_serialization=True)
    merged = twin.merge_and_unload()
    write_export(merged, merged.state_dict(), hf_config, tokenizer_dir, out_dir)
    os.replace(adapter_tmp, out_dir / "adapter")


def load_export(path: Path, dtype=torch.float32, attn_implementation: str | None = None):
    """Loads an export with ``AutoModelForCausalLM.from_pretrained`` (safetensors only, no remote code).

    Args:
        attn_implementation: as the run trained (None: transformers' default for the model class).
    """
    from transformers import AutoModelForCausalLM

    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    path = Path(path)
    if (path / "adapter_config.json").is_file():  # a PEFT adapter: on its base checkpoint, merged
        from peft import PeftModel

        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise FileNotFoundError(f"{path / 'adapter_config.json'}: base_model_name_or_path {base!r} is not a "
                                    "local model directory; set it to the base checkpoint")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=False, **kw)
        return PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True,
                                                trust_remote_code=False, **kw)
