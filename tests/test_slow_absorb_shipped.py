"""The shipped compressor (checkpoints/absorb) and the distill writer on SmolLM2 with test-seed documents
neither saw (slow)."""

from __future__ import annotations


import pytest
import torch

from dynalora.data.absorb import split_seeds
from dynalora.data.facts import facts_document
from dynalora.models import load_base_model
from dynalora.runtime.absorb import load_absorber
from dynalora.runtime.chat import answer_tokens, chat_prompt, end_of_turn_id
from dynalora.shipped import shipped
from dynalora.runtime.chat import answer_log_probs

pytestmark = pytest.mark.slow
SHIPPED = shipped("absorb")
TEST_OFFSET = 200
"""Test-split seeds of these documents: not the evaluation's (0–7) nor the demo's (100)."""


def gold_nll(absorber, tokenizer, questions) -> float:
    """Mean NLL per answer token (end of turn included) of the gold answers, every row under its current LoRA."""
    end = end_of_turn_id(tokenizer)
    answers = [answer_tokens(tokenizer, q["answer"], end) for q in questions]
    sequences = [chat_prompt(tokenizer, q["question"]) + a for q, a in zip(questions, answers)]
    with torch.no_grad():
        log_probs = answer_log_probs(absorber.dyn, sequences, [len(a) for a in answers], tokenizer.pad_token_id
                                     or 0, "cpu")  # (sum(answers), V)
    targets = torch.tensor([t for a in answers for t in a])
    return -log_probs.gather(1, targets[:, None]).mean().item()


@pytest.mark.parametrize("writer", ["compressor", "distill"])
def test_memory_of_the_right_document_lowers_answer_nll_more_than_another_documents(writer):
    base = load_base_model()
    absorber = load_absorber(base.model, SHIPPED, max_batch=12, writer=writer, tokenizer=base.tokenizer)
    state, tokenizer = absorber.dyn.state, base.tokenizer
    documents = [facts_document(split_seeds("test")[TEST_OFFSET + i], words=150) for i in range(2)]
    memories = []
    for document in documents:
        reports = absorber.absorb_text(0, tokenizer(document["context"], add_special_tokens=False)["input_ids"])
        assert reports and all(r.memory_rank <= absorber.dyn.state.config.memory_rank for r in reports)
        memories.append(state.row_factors(0, "memory"))
        state.reset()
    scores = {"none": [], "right": [], "wrong": []}
    for index, document in enumerate(documents):
        questions = document["questions"][:12]
        scores["none"].append(gold_nll(absorber, tokenizer, questions))
        for name, memory in (("right", memories[index]), ("wrong", memories[1 - index])):
            for row in range(len(questions)):
                state.update(row, memory=memory)
            scores[name].append(gold_nll(absorber, tokenizer, questions))
            state.reset()
    mean = {name: sum(values) / len(values) for name, values in scores.items()}
    assert mean["right"] < mean["none"] - 1.0, mean
    assert mean["right"] < mean["wrong"], mean
