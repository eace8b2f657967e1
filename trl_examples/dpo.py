"""Preference optimisation (DPO) with NeuroAda through TRL's ``DPOTrainer``.

The preference pairs are constructed, not human judgements: for each commonsense training
question the correct answer is *chosen* and one wrong option, drawn with a
fixed seed, is *rejected* (``neuroada_plugin.commonsense.dpo_rows``). The reference policy is the
same model with the NeuroAda adapter disabled, so no second copy of the model is loaded and the
first step's loss is exactly ln 2.

```bash
python trl_examples/dpo.py                      # defaults: PIQA, 24 steps, 200 held-out questions
python trl_examples/dpo.py --beta 0.2 --learning_rate 1e-3 --sources piqa,csqa --max_steps 200
```
"""

from __future__ import annotations

from functools import partial

from trl import DPOConfig, DPOTrainer, TrlParser

import neuroada_plugin  # noqa: F401  (registers NeuroAda with PEFT)
from neuroada_plugin import commonsense
from neuroada_plugin.trl_support import CommonsenseArguments, NeuroAdaArguments, run_example

# Sized for a few minutes on 2 CPU cores. NeuroAda's rates sit ~10x above LoRA's, and DPO's gradient
# carries a factor beta (0.1): at 5e-3 the loss stayed at ln 2 (0.690 after 24 steps), hence 5e-2.
DEFAULTS = dict(
    output_dir="outputs/dpo-neuroada",
    learning_rate=5e-2,
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
    pairs = partial(commonsense.dpo_rows, seed=data_args.split_seed)
    run_example("DPO + NeuroAda", DPOTrainer, data_args, adapter_args, training_args, pairs)


if __name__ == "__main__":
    parser = TrlParser((CommonsenseArguments, NeuroAdaArguments, DPOConfig))
    parser.set_defaults(**DEFAULTS)
    main(*parser.parse_args_and_config())
