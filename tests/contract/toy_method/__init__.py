"""A toy second method, registered only by the tests: proof that adding a method touches nothing shared.

``ToyRank`` adds a dense rank-1 update ``dW = a b^T`` (``a`` zero-initialised, ``b`` seeded
random) to each targeted linear layer. It is a folder of its own (config, layer, tuner,
merge rule) plus the one registration below; the test contract, the streaming merge, the CLI
and the Axolotl plugin pick it up from the registry. ``toyplain`` (``no_rule.py``) is the same toy
under another name without a merge rule.
"""

from neuroada_plugin.registry import MethodSpec, register

SPEC = register(
    MethodSpec(
        name="toyrank",
        config="toy_method.config:ToyRankConfig",
        tuner="toy_method.model:ToyRankModel",
        checkpoint_rule="toy_method.checkpoint:toyrank_checkpoint_rule",
        summary="Test-only toy: a dense rank-1 update per linear layer.",
        needs_float_weights=True,
        reads_weights_when_created=False,
        exact_merge=True,
    )
)

NO_RULE_SPEC = register(
    MethodSpec(
        name="toyplain",
        config="toy_method.no_rule:ToyPlainConfig",
        tuner="toy_method.no_rule:ToyPlainModel",
        summary="Test-only toy without a streaming merge rule.",
        needs_float_weights=True,
        reads_weights_when_created=False,
        exact_merge=True,
    )
)
