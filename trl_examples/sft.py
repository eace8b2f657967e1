"""Supervised fine-tuning with NeuroAda through TRL's ``SFTTrainer``.

Trains SmolLM2-135M-Instruct (offline) to answer commonsense multiple-choice questions
("question + lettered options -> ``B. bookstore``" in the model's chat template, loss on the
answer only) and reports held-out log-likelihood accuracy before and after.

```bash
# Defaults: CommonsenseQA, 256 training questions, 32 steps, 200 held-out questions (~3 min on 2 CPU cores).
python trl_examples/sft.py

# Any model, data mix, adapter size or trainer setting is a flag:
python trl_examples/sft.py --sources piqa,csqa,obqa --train_size 0 --max_steps 500 --neuroada_top_k 20 \
    --learning_rate 1e-3 --model_name_or_path path/to/model --output_dir outputs/sft-mix
```

The adapter is a normal PEFT adapter: ``PeftModel.from_pretrained(base, output_dir)``.
"""

from __future__ import annotations

import time

from datasets import Dataset
from trl import SFTConfig, SFTTrainer, TrlParser

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

# Defaults sized for a few minutes on 2 CPU cores. NeuroAda trains one value per output neuron
# (k=1): its learning rates sit about 10x above LoRA's (the paper uses ~1e-3..1e-2 where LoRA uses 1e-4).
DEFAULTS = dict(
    output_dir="outputs/sft-neuroada",
    learning_rate=5e-3,
    lr_scheduler_type="linear",
    warmup_steps=0,
    max_steps=32,
    per_device_train_batch_size=8,
    max_length=256,
    gradient_checkpointing=False,
    bf16=False,  # the weights' dtype is chosen by --dtype; theta stays float32
    logging_steps=4,
    save_strategy="no",
    report_to="none",
    seed=0,
)


def main(data_args: CommonsenseArguments, adapter_args: NeuroAdaArguments, training_args: SFTConfig) -> None:
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(data_args)
    train, heldout = commonsense_splits(data_args)
    print(f"train: {len(train)} questions from {data_args.sources}; held-out: {len(heldout)} (never trained on)")
    before = evaluate(model, tokenizer, heldout, data_args, "before")

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_list(commonsense.sft_rows(train, prompt_format(data_args))),
        processing_class=tokenizer,
        peft_config=neuroada_config(adapter_args),
    )
    trainer.model.print_trainable_parameters()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)

    after = evaluate(trainer.model, tokenizer, heldout, data_args, "after")
    print_summary("SFT + NeuroAda", trainer.model, before, after, time.perf_counter() - start, training_args.output_dir)
    trainer.end()


if __name__ == "__main__":
    parser = TrlParser((CommonsenseArguments, NeuroAdaArguments, SFTConfig))
    parser.set_defaults(**DEFAULTS)
    main(*parser.parse_args_and_config())
