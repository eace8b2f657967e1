"""Serving merged checkpoints with vLLM: server launcher, client, offline generation (see README.md).

These helpers use only the standard library, so they run under any interpreter; vLLM itself
runs in the interpreter given by ``--python`` (by default ``.venv-vllm/bin/python`` when it
exists, else the current one).
"""
