"""The distill writer's step rule and its meta-learning, on tiny models: the hand-written Adam is torch's Adam;
a schedule round-trips and names what is wrong with it; the teacher's shared-prefix cache changes nothing;
the first-order step-size gradient of the last step equals a finite difference; the recipe trains, saves a
schedule the writer loads, and the writer then writes with it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dynalora.models import ByteTokenizer
from dynalora.runtime.absorb_probes import chunk_probes
from dynalora.runtime.chat import chat_prompt
from dynalora.runtime.distill_steps import Adam, StepSizes
from dynalora.runtime.memory_writers import DistillConfig, answer_positions
from dynalora.runtime.padding import length_buckets, pad_rows
from tests.test_memory_writers import TEXT, make_distill


def test_adam_with_one_step_size_is_torch_adam():
    torch.manual_seed(0)
    ours, theirs = [torch.randn(3, 4, requires_grad=True) for _ in range(2)], []
    theirs = [t.detach().clone().requires_grad_() for t in ours]
    target = torch.randn(3, 4)
    optimizer, reference = Adam(ours), torch.optim.Adam(theirs, lr=0.05)
    for _ in range(5):
        for group in (ours, theirs):
            for t in group:
                t.grad = None
            sum(((t - target) ** 3).sum() for t in group).backward()
        directions = optimizer.step(ours, [0.05, 0.05])
        reference.step()
        assert all(d.shape == t.shape for d, t in zip(directions, ours))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_step_sizes_round_trip_and_name_what_is_wrong(tmp_path):
    sizes = StepSizes.constant(["m.0", "m.1"], steps=3, lr=0.02)
    assert sizes.at(0).shape == (2, 2) and torch.allclose(sizes.at(0), torch.full((2, 2), 0.02))
    with torch.no_grad():
        sizes.log_lr[2, 1, 0] = math.log(0.5)
    assert sizes.at(7)[1, 0] == pytest.approx(0.5)  # past the schedule: its last step
    sizes.start = {"m.1": torch.randn(2, 5)}
    sizes.save(tmp_path, record={"note": 1})
    loaded = StepSizes.load(tmp_path)
    assert loaded.modules == ["m.0", "m.1"] and torch.equal(loaded.log_lr, sizes.log_lr)
    assert torch.equal(loaded.start["m.1"], sizes.start["m.1"].half())
    assert json.loads((tmp_path / "train_absorb_steps.json").read_text()) == {"note": 1}
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match=r"expected \(steps, 2, 2\)"):
        StepSizes(["m.0", "m.1"], torch.zeros(3, 2))
    with pytest.raises(ValueError, match="no step sizes for \\['m.9'\\]"):
        sizes.for_modules(["m.0", "m.9"])
    with pytest.raises(FileNotFoundError, match="absorb-steps"):
        StepSizes.load(tmp_path / "none")


def test_length_buckets_bound_the_padding():
    lengths = [54, 138, 58, 84, 101, 55]
    buckets = length_buckets(lengths)
    assert sorted(i for b in buckets for i in b) == list(range(6))
    for bucket in buckets:
        assert max(lengths[i] for i in bucket) <= 1.5 * min(lengths[i] for i in bucket)
    assert len(buckets) == 3


def test_teacher_reads_the_shared_prefix_once_and_matches_the_full_rows():
    dyn, writer, _ = make_distill(DistillConfig(steps=0, rank=2, top_k=5))
    tokenizer = ByteTokenizer()
    rows, lengths = [], []
    for question, answer in chunk_probes(TEXT, max_probes=3, cloze=2):
        answer_ids = list(answer.encode())
        rows.append(chat_prompt(tokenizer, question, TEXT) + answer_ids)
        lengths.append(len(answer_ids))
    top = writer._teacher_top(dyn, rows, lengths, {}, torch.device("cpu"))
    with torch.no_grad():
        ids = pad_rows(rows, 0, "cpu")[0]
        reference = dyn(input_ids=ids).logits[answer_positions(ids, rows, lengths)].float().log_softmax(-1)
    torch.testing.assert_close(top.values, reference.topk(5, dim=-1).values, rtol=1e-4, atol=1e-5)


def test_the_last_steps_size_gradient_equals_a_finite_difference():
    """θ_K = θ_{K-1} − lr·d_{K-1} and d_{K-1} does not depend on lr_{K-1}: the first-order meta-gradient of the
    last step is exact, so it must match the change in the scored loss when that one step size moves."""
    from dynalora.train.absorb_steps import MetaGradients, question_texts

    config = DistillConfig(steps=3, lr=0.03, rank=2, max_probes=1, cloze=1)
    dyn, writer, _ = make_distill(config)
    tokenizer, ids = ByteTokenizer(), list(TEXT.encode())[:32]
    questions = question_texts(writer, dyn, tokenizer, [{"question": "Where does Zorba live?",
                                                         "answer": "Mellowby"}], torch.device("cpu"))
    meta = MetaGradients(writer, dyn, questions, [3], steps=3)
    writer.fit(dyn, ids, after_step=meta)
    module, eps = 1, 1e-3  # the down_proj's B factor at the last step

    def loss_with(delta: float) -> float:
        writer.step_sizes = StepSizes.constant(writer.modules_list, 3, config.lr)
        with torch.no_grad():
            writer.step_sizes.log_lr[2, module, 1] += math.log1p(delta / config.lr)
        params = writer.fit(dyn, ids)
        with torch.no_grad():
            return float(writer.loss(dyn, questions, {}, params))

    finite = (loss_with(eps) - loss_with(-eps)) / (2 * eps)
    assert meta.lr_grad[2, module, 1].item() == pytest.approx(finite, rel=2e-2, abs=1e-6)
    assert meta.lr_grad[2, module, 1].abs() > 1e-4  # the check is not vacuous
    assert torch.equal(meta.lr_grad[0, :, 0], torch.zeros(len(writer.modules_list)))  # B = 0: A's first step is 0


def test_absorb_steps_recipe_saves_a_schedule_the_writer_uses(tmp_path):
    from dynalora.runtime.absorb import load_absorber
    from dynalora.models import tiny_model
    from dynalora.train.absorb_steps import AbsorbStepsTrainConfig, train_absorb_steps
    from dynalora.training import RunConfig

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"context": f"Zorb{i} lives in Quell{i}. Zorb{i} is a baker.",
                                        "questions": [{"question": f"Where does Zorb{i} live?",
                                                       "answer": f"Quell{i}"}]}) + "\n" for i in range(3)))
    distill = DistillConfig(steps=2, rank=2, memory_rank=2, max_probes=1, cloze=1)
    record = train_absorb_steps(AbsorbStepsTrainConfig(data=docs, out_dir=tmp_path / "steps", model="tiny:llama",
                                                       distill=distill, score_steps=[1, 2], threads=1,
                                                       run=RunConfig(checkpoint_every=2), window=64))
    assert len(record["documents"]) == 3 and all(set(d["nll_after"]) == {1, 2} for d in record["documents"])
    assert all(set(d["locality_nll_after"]) == {1, 2} and d["locality_nll_before"] > 0 for d in record["documents"])
    assert (tmp_path / "steps" / "step_sizes.png").is_file()
    sizes = StepSizes.load(tmp_path / "steps")
    assert sizes.steps == 2 and not torch.allclose(sizes.log_lr, torch.full_like(sizes.log_lr, math.log(0.02)))
    assert set(sizes.start) == set(sizes.modules)
    absorber = load_absorber(tiny_model("llama"), writer="distill", tokenizer=ByteTokenizer(), window=64,
                             distill=DistillConfig(steps=2, rank=2, memory_rank=2, max_probes=1, cloze=1,
                                                   step_sizes=str(tmp_path / "steps")))
    assert torch.equal(absorber.writer.step_sizes.log_lr, sizes.log_lr)
    factors = absorber.writer.write(absorber.dyn, list(b"Zorb9 lives in Quell9."))
    assert any(b.abs().sum() > 0 for _, b in factors.values())
    with pytest.raises(ValueError, match="step_sizes"):
        AbsorbStepsTrainConfig(data=docs, distill=DistillConfig(step_sizes=str(tmp_path / "steps")))
