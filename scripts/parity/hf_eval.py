"""Reference figures from Hugging Face transformers (+ peft) for `trainer eval`.

    python hf_eval.py MODEL_DIR DATA.jsonl [ADAPTER_DIR]

Prints JSON with `loss_all_tokens` and `tokens_all` computed the way `trainer eval`
defines them: each conversation rendered by the model's chat template without a
generation prompt and tokenized as `apply_chat_template` does; position t predicts
token t + 1; token-weighted mean cross-entropy over every predicted token, in float32.
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    model_dir, data_path = sys.argv[1], sys.argv[2]
    adapter_dir = sys.argv[3] if len(sys.argv) > 3 else None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    total, count = 0.0, 0
    with open(data_path, encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            messages = json.loads(line)["messages"]
            ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
            if hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            ids = torch.tensor([list(ids)])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1].float()
            targets = ids[0, 1:]
            losses = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
            total += losses.item()
            count += targets.numel()
    print(json.dumps({"loss_all_tokens": total / count, "tokens_all": count}))


if __name__ == "__main__":
    main()
