"""GPU-only model options checked on CPU: their selection and refusal logic (model.activation_offload,
model.quantization for QLoRA)."""

import torch


def test_activation_offload_is_refused_without_cuda():
    from itune.config import RunConfig
    from itune.model import check_model_config

    cfg = RunConfig()
    cfg.model.activation_offload = True
    assert any(x.startswith("model.activation_offload: moves activations from GPU to CPU memory, and this machine "
                            "has no CUDA device") for x in check_model_config(cfg)) is (not torch.cuda.is_available())


def test_qlora_selection_on_cpu():
    from itune.config import load_config
    from itune.model import bnb_config, quantization_problems

    cfg = load_config("configs/superni_tiny.yaml", ["model.quantization.bits=4"])
    got = quantization_problems(cfg, cuda=False)
    assert got == ["model.quantization: a 4-bit base cannot be trained; set model.lora (QLoRA trains adapters on it)",
                   "model.quantization: quantizes a model.pretrained checkpoint; none is set",
                   "model.quantization: 4-bit weights need CUDA (bitsandbytes kernels), and this machine has no CUDA "
                   "device; remove model.quantization to train LoRA on the unquantized base"]
    cfg = load_config("configs/superni_tiny.yaml", ["model.quantization.bits=8", "model.lora.r=8",
                                                    "model.quantization.quant_type=int8"])
    assert quantization_problems(cfg, cuda=False)[:2] == [
        "model.quantization.bits: 8: only 4-bit (QLoRA) is supported",
        "model.quantization.quant_type: 'int8': choose nf4 or fp4"]
    c = bnb_config(load_config("configs/superni_tiny.yaml", ["model.quantization.bits=4"]).model.quantization,
                   torch.bfloat16).to_dict()
    assert (c["load_in_4bit"], c["bnb_4bit_quant_type"], c["bnb_4bit_use_double_quant"], c["bnb_4bit_quant_storage"],
            c["bnb_4bit_compute_dtype"]) == (True, "nf4", True, "bfloat16", "bfloat16")
