"""Kept only so that ``sys.path.insert(0, 'examples'); from common.offline_models import smollm2_checkpoint``
(the README's quick start) keeps working. The shared helpers live in the top-level :mod:`harness` package."""
