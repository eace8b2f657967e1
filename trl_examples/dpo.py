"""Preference optimisation (DPO) with NeuroAda through TRL's ``DPOTrainer``.

The preference pairs are constructed, not human judgements: for each commonsense training
question the correct option (``"B. bookstore"``) is *chosen* and one wrong option, drawn with a
fixed seed, is *rejected* (``neuroada_plugin.commonsense.dpo_rows``). The reference policy is the
same model with the NeuroAda adapter disabled, so no second copy of the model is loaded and the
first step's loss is exactly ln 2.

```bash
python trl_examples/dpo.py                      # defaults: CommonsenseQA, 24 steps, 200 held-out questions
python trl_examples/dpo.py --beta 0.2 --learning_rate 1e-3 --sources piqa,csqa --max_steps 200
```
"""

from __future__ import annotations

import time

from datasets import Dataset
from trl import DPOConfig, DPOTrainer, TrlParser

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

# Sized for a few minutes on 2 CPU cores. NeuroAda's rates sit ~10x above LoRA's.
DEFAULTS = dict(
    output_dir="outputs/dpo-neuroada",
    learning_rate=5e-3,
    beta=0.1,
    lr_scheduler_type="linear",
    max_steps=24,
    per_device_train_batch_size=8,
    max_length=256,
    gradient_checkpointing=False,
    bf16=False,  # the weights' dtype is chosen by --dtype; theta stays float32
    logging_steps=4,
    save_strategy="no",
    report_to="none",
    seed=0,
)


def main(data_args: CommonsenseArguments, adapter_args: NeuroAdaArguments, training_args: DPOConfig) -> None:
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(data_args)
    train, heldout = commonsense_splits(data_args)
    print(f"train: {len(train)} constructed preference pairs from {data_args.sources}; held-out: {len(heldout)}")
    before = evaluate(model, tokenizer, heldout, data_args, "before")

    trainer = DPOTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_list(
            commonsense.dpo_rows(train, prompt_format(data_args), seed=data_args.split_seed)
        ),
        processing_class=tokenizer,
        peft_config=neuroada_config(adapter_args),
    )
    trainer.model.print_trainable_parameters()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)

    after = evaluate(trainer.model, tokenizer, heldout, data_args, "after")
    print_summary("DPO + NeuroAda", trainer.model, before, after, time.perf_counter() - start, training_args.output_dir)
    trainer.end()


if __name__ == "__main__":
    parser = TrlParser((CommonsenseArguments, NeuroAdaArguments, DPOConfig))
    parser.set_defaults(**DEFAULTS)
    main(*parser.parse_args_and_config())
