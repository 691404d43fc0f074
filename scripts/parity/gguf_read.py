"""Reads a GGUF LoRA adapter with llama.cpp's gguf-py and checks it against the PEFT
safetensors adapter it came from, as convert_lora_to_gguf.py would have written it.
Prints one JSON line: metadata, tensor names, shapes and the largest difference."""
import json
import sys

import numpy as np
from gguf import GGUFReader
from safetensors.numpy import load_file

gguf_path, adapter_dir, heads, kv_heads, permuted = sys.argv[1:6]
heads, kv_heads, permuted = int(heads), int(kv_heads), permuted == "1"

reader = GGUFReader(gguf_path)
metadata = {}
for name, field in reader.fields.items():
    if name.startswith("GGUF."):
        continue
    value = field.contents()
    metadata[name] = value.item() if hasattr(value, "item") else value

modules = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}


def permute(weights, n_head):
    # convert_hf_to_gguf.py's LlamaModel.permute, applied to lora_b's rows.
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


expected = {}
for key, value in load_file(f"{adapter_dir}/adapter_model.safetensors").items():
    rest = key.removeprefix("base_model.model.model.layers.")
    layer, rest = rest.split(".", 1)
    part = "lora_a" if ".lora_A." in rest else "lora_b"
    module = modules[rest.split(".lora_")[0]]
    if permuted and part == "lora_b" and module in ("attn_q", "attn_k"):
        value = permute(value, heads if module == "attn_q" else kv_heads)
    expected[f"blk.{layer}.{module}.weight.{part}"] = value

tensors = {}
worst = 0.0
for tensor in reader.tensors:
    data = np.asarray(tensor.data)
    if tensor.tensor_type.name == "BF16":
        data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    data = data.astype(np.float32).reshape(expected[tensor.name].shape)
    worst = max(worst, float(np.max(np.abs(data - expected[tensor.name]))))
    tensors[tensor.name] = {"shape": [int(d) for d in tensor.shape], "type": tensor.tensor_type.name}

print(json.dumps({"metadata": metadata, "tensors": tensors, "expected": sorted(expected),
                  "max_abs_difference": worst}))
