"""The peer of `trainer bench`: Hugging Face transformers + peft LoRA training throughput at
a model's shape, with random weights and random tokens, timed the same way (forward with
loss, backward, then clipping and AdamW; the device synchronised after each; the first step
not timed). Prints one JSON line with the same fields.

    python scripts/peft_bench.py --architecture llama --hidden-size 2048 --layers 16 \
        --heads 32 --kv-heads 8 --intermediate-size 8192 --vocab-size 128256 \
        --seq 1024 --batch 8 --rank 16 --steps 10 --device cuda --dtype bf16
"""

import argparse
import json
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--architecture", choices=["llama", "qwen2"], default="llama")
    for name in ["hidden-size", "layers", "heads", "kv-heads", "intermediate-size", "vocab-size"]:
        parser.add_argument(f"--{name}", type=int, required=True)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["bf16", "f32"])
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[
        args.dtype or ("bf16" if args.device == "cuda" else "f32")
    ]
    config_class = Qwen2Config if args.architecture == "qwen2" else LlamaConfig
    config = config_class(
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
        max_position_embeddings=max(args.seq, 2048),
        tie_word_embeddings=True,
        rope_theta=500000.0,
    )
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype, attn_implementation="sdpa")
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.lora_dropout, target_modules=TARGETS)
    model = get_peft_model(model, lora)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    tokens = torch.randint(0, args.vocab_size, (args.batch, args.seq + 1), device=args.device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    model.train()

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    forward = backward = update = 0.0
    for step in range(args.steps + 1):
        started = time.perf_counter()
        with torch.autocast(args.device, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1)
        )
        sync()
        forward_done = time.perf_counter()
        loss.backward()
        sync()
        backward_done = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step > 0:
            forward += forward_done - started
            backward += backward_done - forward_done
            update += time.perf_counter() - backward_done
    steps = args.steps
    seconds = (forward + backward + update) / steps
    if args.device == "cuda":
        peak = torch.cuda.max_memory_reserved()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "peer": "transformers+peft",
        "device": args.device,
        "dtype": args.dtype or ("bf16" if args.device == "cuda" else "f32"),
        "seq": args.seq,
        "batch": args.batch,
        "rank": args.rank,
        "steps": steps,
        "tokens_per_second": args.batch * args.seq / seconds,
        "forward_ms": forward / steps * 1e3,
        "backward_ms": backward / steps * 1e3,
        "optimizer_ms": update / steps * 1e3,
        "peak_memory_bytes": peak,
        "lora_parameters": sum(p.numel() for p in trainable),
    }))


if __name__ == "__main__":
    main()
