"""Reinforcement learning (GRPO) with NeuroAda through TRL's ``GRPOTrainer``.

The reward is verifiable: 1 when the sampled answer names the correct option (a leading letter
such as ``"B. bookstore"``, or exactly one option's text), else 0
(``neuroada_plugin.commonsense.option_reward``). With ``beta > 0`` the KL reference is the same
model with the NeuroAda adapter disabled; no second copy is loaded.

```bash
python trl_examples/grpo.py                     # defaults: CommonsenseQA, 16 steps of 4 prompts x 4 samples
python trl_examples/grpo.py --beta 0.0 --num_generations 8 --max_steps 300 --sources piqa,csqa,obqa
```
"""

from __future__ import annotations

import time

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer, TrlParser

import neuroada_plugin  # noqa: F401  (registers NeuroAda with PEFT)
from neuroada_plugin import commonsense
from neuroada_plugin.trl_support import (
    CommonsenseArguments,
    NeuroAdaArguments,
    commonsense_splits,
    evaluate,
    load_model_and_tokenizer,
    neuroada_config,
    print_summary,
    prompt_format,
)

# Sized for a few minutes on 2 CPU cores: short answers ("B. bookstore" + end of turn) need few tokens.
DEFAULTS = dict(
    output_dir="outputs/grpo-neuroada",
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
    bf16=False,  # the weights' dtype is chosen by --dtype; theta stays float32
    logging_steps=2,
    save_strategy="no",
    report_to="none",
    seed=0,
)


def main(data_args: CommonsenseArguments, adapter_args: NeuroAdaArguments, training_args: GRPOConfig) -> None:
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(data_args)
    train, heldout = commonsense_splits(data_args)
    print(f"train: {len(train)} prompts from {data_args.sources}; held-out: {len(heldout)}")
    before = evaluate(model, tokenizer, heldout, data_args, "before")

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=commonsense.option_reward,
        args=training_args,
        train_dataset=Dataset.from_list(commonsense.grpo_rows(train, prompt_format(data_args))),
        processing_class=tokenizer,
        peft_config=neuroada_config(adapter_args),
    )
    trainer.model.print_trainable_parameters()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)

    after = evaluate(trainer.model, tokenizer, heldout, data_args, "after")
    print_summary(
        "GRPO + NeuroAda", trainer.model, before, after, time.perf_counter() - start, training_args.output_dir
    )
    trainer.end()


if __name__ == "__main__":
    parser = TrlParser((CommonsenseArguments, NeuroAdaArguments, GRPOConfig))
    parser.set_defaults(**DEFAULTS)
    main(*parser.parse_args_and_config())
