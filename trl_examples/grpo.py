"""Reinforcement learning (GRPO) with NeuroAda through TRL's ``GRPOTrainer``.

The reward is verifiable: 1 when the sampled answer names the correct option (a leading letter
such as ``"B. bookstore"``, or exactly one option's text), else 0
(``neuroada_plugin.commonsense.option_reward``). With ``beta > 0`` the KL reference is the same
model with the NeuroAda adapter disabled; no second copy is loaded.

```bash
python trl_examples/grpo.py                     # defaults: PIQA, 16 steps of 4 prompts x 4 samples
python trl_examples/grpo.py --beta 0.0 --num_generations 8 --max_steps 300 --sources piqa,csqa,obqa
```
"""

from __future__ import annotations

from trl import GRPOConfig, GRPOTrainer, TrlParser

import neuroada_plugin  # noqa: F401  (registers NeuroAda with PEFT)
from neuroada_plugin import commonsense
from neuroada_plugin.trl_support import CommonsenseArguments, NeuroAdaArguments, run_example

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
    run_example(
        "GRPO + NeuroAda",
        GRPOTrainer,
        data_args,
        adapter_args,
        training_args,
        commonsense.grpo_rows,
        reward_funcs=commonsense.option_reward,
    )


if __name__ == "__main__":
    parser = TrlParser((CommonsenseArguments, NeuroAdaArguments, GRPOConfig))
    parser.set_defaults(**DEFAULTS)
    main(*parser.parse_args_and_config())
