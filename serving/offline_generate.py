"""Greedy generation with vLLM's offline ``LLM`` engine; prints/writes JSON (token ids, text, timing).

    .venv-vllm/bin/python serving/offline_generate.py --model MERGED --prompt "Hello" --max-tokens 32
    .venv-vllm/bin/python serving/offline_generate.py --model BASE --lora ADAPTER_DIR ...   # LoRA adapters only

Used by the integration test (token-for-token comparison with transformers) and by
benchmarks/merge_serving.py (tokens/s). Prompts may be text or token ids (``--prompt-ids``
with a JSON list of lists), so comparisons do not depend on tokenization. vLLM starts worker
processes with spawn, hence the ``__main__`` guard.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Runs in .venv-vllm, where this project is not installed: serving.serve (standard library only) is
# imported from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", action="append", default=[], help="Text prompt (repeatable).")
    parser.add_argument("--prompt-ids", default=None, help="JSON list of token-id lists, or a path to such a file.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--ignore-eos", action="store_true", help="Always generate --max-tokens (benchmarks).")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--lora", default=None, help="Serve this LoRA adapter on top of --model (enable_lora).")
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=0, help="Untimed warm-up generate() calls.")
    parser.add_argument(
        "--bench",
        default=None,
        help="Throughput mode: comma-separated batch sizes, e.g. '1,16'. For each, the first prompt is repeated that "
        "many times and generated with ignore_eos; tokens/s are reported under 'bench'.",
    )
    parser.add_argument("--bench-repeats", type=int, default=1, help="Timed repeats per batch size (best is reported).")
    parser.add_argument("--output", default=None, help="Write the JSON here (default: stdout).")
    args = parser.parse_args(argv)

    from serving.serve import vllm_environment

    for key, value in vllm_environment(sys.executable).items():
        os.environ.setdefault(key, value)

    from vllm import LLM, SamplingParams

    prompts: list = [{"prompt": text} for text in args.prompt]
    if args.prompt_ids:
        raw = Path(args.prompt_ids).read_text() if Path(args.prompt_ids).is_file() else args.prompt_ids
        prompts += [{"prompt_token_ids": ids} for ids in json.loads(raw)]
    if not prompts:
        parser.error("give --prompt or --prompt-ids")

    engine_args = dict(model=args.model, dtype=args.dtype, enforce_eager=args.enforce_eager, seed=0)
    if args.max_model_len:
        engine_args["max_model_len"] = args.max_model_len
    lora_request = None
    if args.lora:
        from vllm.lora.request import LoRARequest

        engine_args.update(enable_lora=True, max_lora_rank=args.max_lora_rank, max_loras=1)
        lora_request = LoRARequest("adapter", 1, args.lora)
    started = time.perf_counter()
    llm = LLM(**engine_args)
    load_seconds = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    for _ in range(args.warmup):
        llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
    started = time.perf_counter()
    results = llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
    seconds = time.perf_counter() - started
    outputs = [{"token_ids": list(r.outputs[0].token_ids), "text": r.outputs[0].text} for r in results]
    bench = []
    if args.bench:
        fixed = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        llm.generate(
            prompts[:1], SamplingParams(temperature=0.0, max_tokens=8), lora_request=lora_request, use_tqdm=False
        )
        for batch in (int(b) for b in args.bench.split(",")):
            rates = []
            for _ in range(args.bench_repeats):
                started = time.perf_counter()
                runs = llm.generate(prompts[:1] * batch, fixed, lora_request=lora_request, use_tqdm=False)
                elapsed = time.perf_counter() - started
                tokens = sum(len(r.outputs[0].token_ids) for r in runs)
                rates.append(tokens / elapsed)
            # The best repeat is the least disturbed by other load on a shared machine.
            bench.append(
                {"batch": batch, "tokens": tokens, "tokens_per_second": max(rates), "all_tokens_per_second": rates}
            )
    generated = sum(len(o["token_ids"]) for o in outputs)
    report = {
        "model": args.model,
        "lora": args.lora,
        "outputs": outputs,
        "load_seconds": load_seconds,
        "generate_seconds": seconds,
        "generated_tokens": generated,
        "tokens_per_second": generated / seconds if seconds else None,
        "bench": bench,
    }
    text = json.dumps(report)
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
