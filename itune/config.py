"""Run configuration: one typed schema (nested dataclasses), YAML files plus ``a.b=c`` overrides.

Every problem in a config is collected and raised together as one :class:`~itune.errors.ConfigError`.
Defaults live here, once. This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from itune.errors import ConfigError
from itune.tracking import report_to_problems
from itune.yamlio import safe_load_unique


#: the model built from scratch when neither ``model.pretrained`` nor ``model.architecture`` says otherwise
DEFAULT_ARCHITECTURE = {
    "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "initializer_range": 0.02,
}


@dataclass
class LoraSettings:
    """LoRA adapters (PEFT's ``LoraConfig``, Hu et al. 2021): the base model stays frozen (and partitioned under
    ZeRO-3); only the adapters (and ``modules_to_save``) are trained and held by the optimizer.

    Attributes:
        r: rank of each adapter.
        alpha: scaling numerator (the update is ``alpha / r x B A``).
        dropout: dropout on the adapters' input.
        target_modules: module names to adapt; empty: every linear layer of the decoder blocks (PEFT's
            ``all-linear``, which leaves ``lm_head`` out).
        modules_to_save: modules trained in full beside the adapters (e.g. ``[embed_tokens, lm_head]`` when new
            tokens were added).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list = field(default_factory=list)
    modules_to_save: list = field(default_factory=list)


@dataclass
class QuantizationSettings:
    """QLoRA (Dettmers et al. 2023): the frozen base loaded in 4 bits by bitsandbytes on CUDA, LoRA adapters
    trained in the compute dtype.

    Attributes:
        bits: 4 (NF4 / FP4 storage of the base weights).
        quant_type: ``nf4`` or ``fp4``.
        double_quant: quantize the quantization constants too (saves ~0.4 bit per weight).
    """

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True


@dataclass
class ModelConfig:
    """The model to train.

    Attributes:
        pretrained: a Hugging Face checkpoint directory (loaded with safetensors under ``deepspeed.zero.Init``);
            its ``config.json`` defines the model. None builds a Llama-style model from ``architecture`` with random
            weights.
        architecture: ``LlamaConfig`` fields of a model built from scratch, merged over
            :data:`DEFAULT_ARCHITECTURE` (``vocab_size`` defaults to the tokenizer's); refused together with
            ``pretrained``. Empty when ``pretrained`` is set.
        attn_implementation: ``auto`` (default: flash-attention 3 or 2 on CUDA when installed and supported by the
            family, else ``sdpa`` when the model supports it, else ``eager``; see
            :func:`itune.families.choose_attn_implementation`), ``sdpa``, ``eager``, ``flash_attention_2`` or
            ``flash_attention_3`` (CUDA + the flash-attn package). Packed-row isolation is probed on the loaded
            model whatever the choice.
        gradient_checkpointing: recompute activations in backward (non-reentrant).
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``bf16`` or ``fp32``.
        trust_remote_code: allow model code from the checkpoint directory (off by default).
        resize_token_embeddings: when the data's tokenizer has more tokens than the model's embedding
            (``vocab_size`` of the model config), grow the input embedding and an untied ``lm_head`` to the
            tokenizer size before training, new rows set to the mean of the old rows; false refuses such a run.
        pad_vocab_size_to_multiple_of: round a resized embedding up to a multiple of this many rows (1 = exactly
            the tokenizer size, as transformers' ``pad_to_multiple_of=None``; 64 suits tensor cores).
        zero3_leaf_modules: register the family's MoE blocks as ZeRO-3 leaf modules
            (``deepspeed.utils.set_z3_leaf_modules``: a block's parameters are gathered at once, not per expert);
            no effect on dense models or below ZeRO stage 3.
        tiled_mlp: compute each decoder MLP over sequence tiles (DeepSpeed's ``TiledMLP``: ``ceil(seq / hidden)``
            tiles, recomputed in backward), so its ``[seq, intermediate]`` activations never exist whole; for
            gated MLPs (``gate_proj``/``up_proj``/``down_proj``), refused on a model without one.
        lora: train LoRA adapters instead of every weight (:class:`LoraSettings`; ``model.lora.r=16`` on the
            command line turns it on); None: full fine-tuning.
        quantization: load the base of a LoRA run in 4 bits (:class:`QuantizationSettings`; CUDA and
            bitsandbytes only, refused elsewhere before training); None: the base in the run's dtype.
        activation_offload: keep the tensors saved for backward (with gradient checkpointing: each layer's input)
            in pinned CPU memory (``torch.autograd.graph.save_on_cpu``); CUDA only, refused on CPU.
    """

    pretrained: str | None = None
    architecture: dict = field(default_factory=lambda: dict(DEFAULT_ARCHITECTURE))
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = True
    dtype: str = "auto"
    trust_remote_code: bool = False
    resize_token_embeddings: bool = True
    pad_vocab_size_to_multiple_of: int = 1
    zero3_leaf_modules: bool = True
    tiled_mlp: bool = False
    activation_offload: bool = False
    lora: LoraSettings | None = None
    quantization: QuantizationSettings | None = None


@dataclass
class DataConfig:
    """Prepared data (output of ``itune-data prepare``).

    Attributes:
        path: directory holding ``manifest.json`` and the shards.
        train_split: split trained on.
        eval_split: held-out split (loss during training, generation after).
        verify_checksums: re-hash the shards of both splits against the manifest before training (spread over
            the ranks); a changed or missing shard stops the run with its name.
    """

    path: str = ""
    train_split: str = "train"
    eval_split: str = "test"
    verify_checksums: bool = True


@dataclass
class OptimConfig:
    """AdamW (decoupled weight decay, none for norms and biases) with warmup then decay.

    Attributes:
        lr: peak learning rate.
        min_lr_ratio: final lr = lr x min_lr_ratio (cosine/linear).
        schedule: ``cosine``, ``linear`` or ``constant`` after warmup.
        warmup_steps: optimizer steps of linear warmup from 0.
        grad_clip: max global gradient norm (0 disables).
    """

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    """Batch and length of training. Units: rows (packed rows of ``seq_len`` tokens), per rank where stated.

    Attributes:
        micro_batch_size: rows per rank per forward/backward.
        gradient_accumulation_steps: micro-batches per optimizer step.
        epochs: passes over the training rows.
        max_steps: stop after this many optimizer steps (None = epochs x steps per epoch).
        seed: model init and data order seed.
        log_every: optimizer steps between console/TensorBoard lines.
        eval_every: optimizer steps between held-out loss evaluations (0 = only at the end).
        peak_flops_per_s: peak FLOP/s of one accelerator, for the MFU estimate (e.g. 989e12: dense bf16 of an
            H100/H200 SXM); 0 disables MFU.
        collective_timeout_s: timeout of a collective before the process group fails (a dead peer).
        progress_bar: tqdm bar with ETA on rank 0.
        generate_every: optimizer steps between held-out generation + official scores (0 = never during
            training); results in ``output_dir/eval/step{N}/`` and TensorBoard.
        generate_max_instances: instances per held-out task for those evaluations.
        generate_max_new_tokens: generation length for those evaluations.
        skip_nonfinite_steps: optimizer steps whose loss or gradient norm is not finite (on any rank) that may be
            skipped over the whole run, resumes included: such a step leaves weights, optimizer state and the lr
            schedule unchanged and the next step reads the next rows. One more stops the run with
            ``FloatingPointError``; 0 stops at the first.
        orphan_timeout_s: seconds a rank may go on after its launcher is gone (the ``deepspeed`` command or
            ``torchrun`` killed by a signal it does not pass on, or by SIGKILL) before it exits; it normally
            checkpoints at the next step boundary and exits well before (0: no limit).
        tiled_loss: compute the cross-entropy over tiles of ``loss_tile_tokens`` positions from the final hidden
            states, never the full-sequence logits ([rows, seq_len, vocab] fp32: 2.1 GB per row at 16k tokens and a
            32k vocabulary); the same loss and gradients (:func:`itune.loss.tiled_sum_cross_entropy`). Proven on the
            loaded model at start; a model it does not fit falls back to the full logits, saying so.
        loss_tile_tokens: trained positions per tile of the tiled loss (one tile's fp32 logits live at once).
        liger_loss: the tiled loss through Liger's fused linear cross-entropy (CUDA and the liger-kernel package;
            refused before the model is built otherwise): proven on the loaded model at start like the tiled loss,
            falling back to itune's kernel, saying so, where it disagrees.
        sequence_parallel_size: ranks that share each row, each running ``seq_len / N`` of its positions
            (Ulysses sequence parallelism, :mod:`itune.sequence_parallel`); must divide the world size, seq_len and
            the attention heads. The data-parallel size is ``world_size / N``.
        report_to: trackers that receive every logged scalar, the run config and the data summary, from rank 0:
            any of ``tensorboard`` (``output_dir/tensorboard``), ``wandb``, ``mlflow`` (:mod:`itune.tracking`);
            ``[]`` for ``metrics.jsonl`` only.
        run_name: the run's name in W&B and MLflow (default: the name of ``output_dir``).
    """

    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0
    peak_flops_per_s: float = 0.0
    collective_timeout_s: int = 1800
    progress_bar: bool = True
    generate_every: int = 0
    generate_max_instances: int = 5
    generate_max_new_tokens: int = 32
    skip_nonfinite_steps: int = 0
    orphan_timeout_s: float = 300.0
    tiled_loss: bool = True
    loss_tile_tokens: int = 1024
    liger_loss: bool = False
    sequence_parallel_size: int = 1
    report_to: list | str = field(default_factory=lambda: ["tensorboard"])
    run_name: str | None = None


@dataclass
class CheckpointConfig:
    """Checkpoints and export.

    Attributes:
        every_steps: save a DeepSpeed checkpoint every N optimizer steps (0 = only at the end).
        keep_last: checkpoints kept (older ones deleted after a successful save).
        resume: resume from ``output_dir/checkpoints/latest`` when present.
        export: write a Hugging Face export (safetensors) at the end, to ``output_dir/export``.
        export_initial: also export the weights before the first step, to ``output_dir/export_step0`` (a
            baseline for evaluation).
        export_checkpoints: also export (and verify) every intermediate checkpoint, to
            ``output_dir/checkpoints/global_stepN/hf``.
    """

    every_steps: int = 0
    keep_last: int = 2
    resume: bool = True
    export: bool = True
    export_initial: bool = False
    export_checkpoints: bool = False


@dataclass
class RunConfig:
    """A whole training run."""

    output_dir: str = "runs/default"
    ds_config: str = "ds_configs/zero3.json"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def _coerce(value, typ, where, errors):
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        for a in args[1:]:  # a union of plain types (list | str): a value of any of them is kept as given
            plain = typing.get_origin(a) or a
            if plain in (int, float, str, bool, dict, list) and isinstance(value, plain) and \
                    not (plain is int and isinstance(value, bool)):
                return value
        return _coerce(value, args[0], where, errors)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {value!r}")
            return typ()
        return _build(typ, value, where, errors)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads 1e-9 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    expected = {int: int, float: float, str: str, bool: bool, dict: dict, list: list}.get(origin or typ)
    if expected is not None and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
        errors.append(f"{where}: expected {expected.__name__}, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str, errors: list):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            errors.append(f"{prefix}{'.' if prefix else ''}{k}: unknown key (known: {sorted(names)})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], f"{prefix}{'.' if prefix else ''}{f.name}", errors)
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a mapping")
    node[keys[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Loads a YAML run config and applies ``key.sub=value`` overrides (values parsed as YAML).

    Raises:
        ConfigError: a key written twice in one mapping of the file (file, dotted key and both lines named; an
            override is not a duplicate), else listing every unknown key, wrong type and invalid value found.
    """
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            tree = safe_load_unique(p.read_text(encoding="utf-8"), p) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason}); save the run config as UTF-8") \
                from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
            raise ConfigError(f"{p}:{where}: not valid YAML ({what}); fix the file") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: a run config is a YAML mapping")
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key.sub=value")
        k, v = ov.split("=", 1)
        if not v.strip():  # e.g. an unset shell variable: `train.max_steps=$STEPS`
            raise ConfigError(f"override {ov!r}: empty value; give one, or write {k.strip()}=null to unset it")
        try:
            value = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {ov!r}: not a YAML value ({str(e).splitlines()[0]})") from None
        _set_path(tree, k.strip(), value)
    errors: list[str] = []
    model = tree.get("model") if isinstance(tree.get("model"), dict) else None
    if model is not None and model.get("pretrained") is not None:
        # the checkpoint's config.json defines the model: an architecture beside it would be ignored
        if model.get("architecture") not in (None, {}):
            errors.append(f"model.architecture and model.pretrained are both set: the checkpoint's config.json "
                          f"defines the model ({model['pretrained']}), so model.architecture would be ignored; "
                          "remove model.architecture (or override model.architecture=null)")
        model["architecture"] = {}
    elif model is not None and model.get("architecture", {}) is None:
        model["architecture"] = dict(DEFAULT_ARCHITECTURE)
    # architecture dicts merge with the defaults instead of replacing them
    arch = model.get("architecture") if model is not None else None
    if isinstance(arch, dict) and model.get("pretrained") is None:
        model["architecture"] = {**DEFAULT_ARCHITECTURE, **arch}
    cfg = _build(RunConfig, tree, "", errors)
    errors.extend(validate(cfg))
    if errors:
        where = " + ".join(([str(path)] if path else []) + (["overrides"] if overrides else []))
        raise ConfigError("invalid run config" + (f" ({where})" if where else "") + ":\n  - " + "\n  - ".join(errors))
    return cfg


def _number(v):
    """``v`` when it is a real number (not a bool), else None (a wrong type is reported by the schema check)."""
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


#: (key, lowest allowed, whether the lowest is excluded, highest allowed or None): finite numbers in range.
_RANGES = (
    ("train.micro_batch_size", 1, False, None), ("train.gradient_accumulation_steps", 1, False, None),
    ("train.epochs", 1, False, None), ("train.max_steps", 1, False, None), ("train.seed", 0, False, 2**63 - 1),
    ("train.log_every", 1, False, None), ("train.eval_every", 0, False, None),
    ("train.peak_flops_per_s", 0, False, None), ("train.collective_timeout_s", 1, False, 7 * 24 * 3600),
    ("train.generate_every", 0, False, None), ("train.generate_max_instances", 1, False, None),
    ("train.generate_max_new_tokens", 1, False, None), ("train.skip_nonfinite_steps", 0, False, None),
    ("train.orphan_timeout_s", 0, False, None), ("train.loss_tile_tokens", 1, False, None),
    ("train.sequence_parallel_size", 1, False, None),
    ("optim.lr", 0, True, None), ("optim.min_lr_ratio", 0, False, 1), ("optim.warmup_steps", 0, False, None),
    ("optim.weight_decay", 0, False, None), ("optim.eps", 0, True, None), ("optim.grad_clip", 0, False, None),
    ("model.pad_vocab_size_to_multiple_of", 1, False, None),
    ("checkpoint.every_steps", 0, False, None), ("checkpoint.keep_last", 1, False, None),
)
#: architecture sizes that must be whole numbers >= 1 when given
_ARCH_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "vocab_size")


#: values of ``model.attn_implementation``
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3")


def validate(cfg: RunConfig) -> list[str]:
    """Returns every problem with value ranges and combinations (empty when valid). Values of a wrong type are
    skipped here: the schema check (:func:`load_config`) reports them."""
    e = []
    if not cfg.data.path:
        e.append("data.path: required (a directory prepared by `itune-data prepare`)")
    if isinstance(cfg.model.pretrained, str) and not cfg.model.pretrained.strip():
        e.append("model.pretrained: empty; give a Hugging Face checkpoint directory, or null to build the model "
                 "from model.architecture")
    for key, lo, lo_open, hi in _RANGES:
        section, name = key.split(".")
        v = _number(getattr(getattr(cfg, section), name))
        if v is None:
            continue
        if not math.isfinite(v) or (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
            rng = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
            e.append(f"{key}: must be {rng}" + ("" if math.isfinite(v) else " and finite") + f", got {v}")
    betas = cfg.optim.betas
    if isinstance(betas, list) and (len(betas) != 2 or any(_number(b) is None or not 0 <= b < 1 for b in betas)):
        e.append(f"optim.betas: must be two numbers in [0, 1), e.g. [0.9, 0.95], got {betas}")
    if isinstance(cfg.model.architecture, dict):
        for name in _ARCH_SIZES:
            v = cfg.model.architecture.get(name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                e.append(f"model.architecture.{name}: must be a whole number >= 1, got {v!r}")
    if cfg.optim.schedule not in ("cosine", "linear", "constant"):
        e.append(f"optim.schedule: {cfg.optim.schedule!r} is not one of cosine, linear, constant")
    if cfg.model.dtype not in ("auto", "bf16", "fp32"):
        e.append(f"model.dtype: {cfg.model.dtype!r} is not one of auto, bf16, fp32")
    e.extend(report_to_problems(cfg.train.report_to))
    if cfg.model.attn_implementation not in ATTN_IMPLEMENTATIONS:
        e.append(f"model.attn_implementation: {cfg.model.attn_implementation!r} is not one of "
                 f"{', '.join(ATTN_IMPLEMENTATIONS)}")
    return e


def to_dict(cfg: RunConfig) -> dict:
    """The config as plain data (saved in checkpoints)."""
    return dataclasses.asdict(cfg)


def config_from_dict(tree: dict) -> RunConfig:
    """Inverse of :func:`to_dict`.

    Raises:
        ConfigError: unknown keys or wrong types.
    """
    errors: list[str] = []
    cfg = _build(RunConfig, tree, "", errors)
    if errors:
        raise ConfigError("invalid saved run config:\n  - " + "\n  - ".join(errors))
    return cfg


@dataclass(frozen=True)
class BatchPlan:
    """Batch arithmetic of a run (the one place it is computed).

    global rows per optimizer step = micro_batch_size x gradient_accumulation_steps x world_size, where
    ``world_size`` is the data-parallel size (ranks / ``sequence_parallel_size``: the ranks of an SP group share
    rows);
    tokens per optimizer step = global rows x seq_len; steps per epoch = ceil(rows / global rows) (the last
    step of an epoch is partial: missing rows are all-padding rows that carry no loss, so no row is dropped).
    """

    rows: int
    seq_len: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    epochs: int
    max_steps: int | None
    sequence_parallel_size: int = 1

    @property
    def global_rows_per_step(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_rows_per_step * self.seq_len

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.rows / self.global_rows_per_step))

    @property
    def total_steps(self) -> int:
        full = self.steps_per_epoch * self.epochs
        return full if self.max_steps is None else min(full, self.max_steps)

    def describe(self) -> str:
        sp = self.sequence_parallel_size
        who = f"{self.world_size} ranks" if sp == 1 else f"{self.world_size} sequence-parallel groups of {sp} ranks"
        per = (f"{self.micro_batch_size * self.seq_len} tokens per rank per forward" if sp == 1 else
               f"{self.micro_batch_size * self.seq_len} tokens per SP group and "
               f"{self.micro_batch_size * self.seq_len // sp} per rank per forward")
        return (f"batch: {self.micro_batch_size} rows/micro-batch/{'rank' if sp == 1 else 'SP group'} x "
                f"{self.gradient_accumulation_steps} accumulation x {who} = {self.global_rows_per_step} rows "
                f"= {self.tokens_per_step} tokens per optimizer step (seq_len {self.seq_len}; {per}); "
                f"{self.rows} rows -> {self.steps_per_epoch} steps/epoch x {self.epochs} epochs "
                f"-> {self.total_steps} optimizer steps")


#: how a relative path in a run config is read (ds_config, data.path, model.pretrained, output_dir)
RELATIVE_PATHS = "relative paths are resolved from the current directory {cwd}"


def path_not_found(key: str, path: str | Path) -> str:
    """The message for a run-config path that does not exist, e.g. ``ds_config: ds_configs/zero3.json not found
    (relative paths are resolved from the current directory /x/y; run from the repository root or give an absolute
    path)``; an absolute path is named alone."""
    p = Path(path)
    if p.is_absolute():
        return f"{key}: {p} not found"
    return (f"{key}: {p} not found ({RELATIVE_PATHS.format(cwd=Path.cwd())}; run from the repository root or give "
            "an absolute path)")
