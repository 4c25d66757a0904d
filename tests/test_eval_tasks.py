"""``eval tasks`` pieces on tiny models: the LoraHub search, choice scoring, answer cutting, task checks."""

from __future__ import annotations

import pytest
import torch
from test_shift_parts import tiny_shift_setup

from dynalora.data.bigbench import parse_task
from dynalora.eval.tasks import (
    METHODS,
    TaskEvalConfig,
    TaskRunner,
    check_tasks,
    choose_choices,
    continuation_logprobs,
    description_text,
    exact_match,
    examples_text,
    extract_answer,
    lorahub_search,
    sample_examples,
    set_all_rows,
)
from dynalora.data.splits import split_of
from dynalora.hyper.router import TokenRouter, TokenRouterConfig
from dynalora.hyper.shift_net import ShiftHypernetwork
from dynalora.models import ByteTokenizer
from dynalora.runtime import Engine, EngineConfig, TriggerConfig
from dynalora.system.assemble import EngineSpec, System


def test_lorahub_search_lowers_a_quadratic_seeded_within_budget_and_bounds():
    target = torch.tensor([0.8, -0.5, 0.3, 0.0, 1.2, -1.0, 0.1, 0.4])
    calls = []

    def objective(w):
        calls.append(w.clone())
        return float(((w - target) ** 2).sum())

    result = lorahub_search(objective, dim=8, budget=40, bound=1.5, seed=0)
    assert len(result.values) == 40 and len(calls) == 41  # the budget, then the recommendation's value
    assert result.values[0] == pytest.approx(float((target ** 2).sum()))  # starts at zero (the base model)
    assert result.value < 0.5 * result.values[0]
    assert result.value == pytest.approx(float(((torch.tensor(result.weights) - target) ** 2).sum()))
    assert all(c.abs().max() <= 1.5 for c in calls)
    again = lorahub_search(lambda w: float(((w - target) ** 2).sum()), dim=8, budget=40, bound=1.5, seed=0)
    assert again.weights == result.weights and again.values == result.values  # seeded: exactly reproducible


def _mc_task():
    return parse_task({"description": "pick the animal", "preferred_score": "multiple_choice_grade",
                       "metrics": ["multiple_choice_grade"], "examples": [
                           {"input": "a pet", "target_scores": {"cat": 1, "car": 0, "sky": 0}},
                           {"input": "it barks", "target_scores": {"dog": 1, "log": 0}},
                           {"input": "x", "target_scores": {"bee": 0.5, "tree": 0, "be": 1}}]}, "toy_mc")


def test_choice_scoring_equals_a_manual_sum_of_log_probs_and_picks_the_best():
    _net, dyn = tiny_shift_setup()  # state rows: 2, so a batch of 2 rows, each under the same blend
    set_all_rows(dyn.state, [0.7, -0.3, 0.5])
    tokenizer, task = ByteTokenizer(), _mc_task()
    manual_picks = []
    for example in task.examples:
        prompt = list(task.format_prompt(example).encode())
        manual = []
        for choice in example.choices:
            answer = list((" " + choice).encode())
            with torch.no_grad():
                log_probs = torch.log_softmax(dyn(input_ids=torch.tensor([prompt + answer])).logits[0], -1)
            manual.append(sum(float(log_probs[len(prompt) + i - 1, t]) for i, t in enumerate(answer)))
        pairs = [(prompt, list((" " + c).encode())) for c in example.choices]
        sums, counts = continuation_logprobs(dyn, pairs, pad_id=0, batch_size=2)
        assert torch.allclose(sums, torch.tensor(manual), atol=1e-4)
        assert counts.tolist() == [len(" " + c) for c in example.choices]
        manual_picks.append(max(range(len(manual)), key=manual.__getitem__))
    assert choose_choices(dyn, tokenizer, task, task.examples, pad_id=0, batch_size=2) == manual_picks


def test_exact_match_answers_are_cut_at_newline_stop_string_and_regex():
    assert extract_answer(" the cat\nQ: next") == "the cat"
    assert extract_answer("!01!02!1970! and more", stop_string=" and") == "!01!02!1970!"
    assert extract_answer("It is Nitrogen, I think", output_regex="(?i)hydrogen|nitrogen") == "Nitrogen"
    assert extract_answer("no element here", output_regex="(?i)hydrogen|nitrogen") == ""
    assert extract_answer("\nlate answer") == ""
    assert exact_match("Nitrogen", ["nitrogen"]) == (False, True)
    assert exact_match("4", ["four", " 4 "]) == (True, True)


def test_unknown_and_library_tasks_are_refused_by_name():
    known = ["word_sorting", "word_unscrambling", "linguistic_mappings:plural_json", "object_counting"]
    held_out = ["word_sorting", "object_counting"]
    with pytest.raises(ValueError, match="no BIG-Bench task 'word_sortin'.*word_sorting"):
        check_tasks(["word_sortin"], known, held_out)
    with pytest.raises(ValueError, match="'linguistic_mappings:plural_json' is not held out.*trained on it.*"
                                         "--allow-library-tasks"):
        check_tasks(["linguistic_mappings:plural_json"], known, held_out,
                    library_sources=["bigbench:linguistic_mappings:plural_json"])
    check_tasks(["word_unscrambling"], known, held_out, allow_library_tasks=True)
    check_tasks(held_out, known, held_out)
    with pytest.raises(ValueError, match="--methods"):
        TaskEvalConfig(methods=["base", "lorahub_fast"])


def test_every_method_runs_on_a_tiny_system():
    net, dyn = tiny_shift_setup()
    tokenizer = ByteTokenizer()
    base = type("Base", (), {"model": dyn.model, "tokenizer": tokenizer})()
    system = System(EngineSpec(hypernetwork="shift"), base, dyn.bank, [], dyn,
                     ShiftHypernetwork(net, use_factors=False), TriggerConfig(), EngineConfig(), {}, 256)
    capture = system.capture
    capture.window = net.config.pool_window  # as eval tasks sets it
    capture.enabled = False
    engine = Engine(dyn, tokenizer, None, TriggerConfig(), EngineConfig(sample_triggers=False))
    config = TaskEvalConfig(lorahub_steps=7, batch_size=2, max_new_tokens=3)
    exact = parse_task({"description": "", "task_prefix": "Copy it. Then stop.", "preferred_score": "exact_str_match",
                        "examples": [{"input": w, "target": w} for w in ("ab", "cd", "ef", "gh")]}, "toy_copy")
    assert description_text(exact) == "Copy it."
    assert examples_text(exact, exact.examples[:2]) == "Copy it. Then stop.\nQ: ab\nA: ab\n\nQ: cd\nA: cd"
    router = TokenRouter(TokenRouterConfig(feature_size=dyn.model.config.hidden_size, bank_labels=dyn.state.labels,
                                           feature_layer=0, width=8))
    torch.nn.init.normal_(router.net[-1].weight, std=2.0)  # a router that moves the blend
    runner = TaskRunner(system, config, engine, router)
    for task, queries in ((exact, exact.examples[2:]), (_mc_task(), _mc_task().examples)):
        methods = runner.run(task, task.examples[:2], queries)
        assert list(methods) == list(METHODS)
        assert all(0 <= m["accuracy"] <= 1 for m in methods.values())
        assert methods["base"]["adapt_seconds"] == 0 and methods["base"]["blend"] == [0.0, 0.0, 0.0]
        assert methods["lorahub"]["evaluations"] == 7
        assert methods["lorahub"]["objective_best"] <= methods["lorahub"]["objective_start"]
        assert methods["best_adapter"]["picked"] in dyn.bank.labels
        with torch.no_grad():
            capture.enabled = True
            capture.reset()
            dyn.state.reset()
            dyn(input_ids=torch.tensor([list(description_text(task).encode())]))
            out = net(capture.pooled(0)[None])
            capture.enabled = False
        expected = (out["gate"][0] * out["blend"][0]).tolist()  # gated against a zero current blend
        assert methods["dynalora_description"]["blend"] == pytest.approx(expected, abs=1e-4)
        # the routed method: the examples' blend as the router's prior, scored with the router attached
        routed, plain = methods["dynalora_examples_routed"], methods["dynalora_examples"]
        assert routed["blend"] == plain["blend"] and routed["support_nll"] != plain["support_nll"]
        assert dyn.state.router is None  # detached again
    assert not dyn.state.blend_weights.any()  # the runner leaves the state at zero


def test_paired_bootstrap_separates_real_differences_from_noise():
    from dynalora.eval.tasks import bootstrap_intervals

    ones, zeros = [1.0] * 30, [0.0] * 30
    mixed = [1.0, 0.0] * 15  # 0.5, and 0.53 below: three queries apart out of 30
    close = [1.0, 0.0] * 14 + [1.0, 1.0]
    grades = {"base": {"t1": zeros, "t2": mixed}, "dynalora_examples": {"t1": ones, "t2": close},
              "uniform_merge": {"t1": ones, "t2": mixed}}
    out = bootstrap_intervals(grades, seed=0, resamples=500)
    far = out["differences"]["dynalora_examples - base"]
    assert far["real"] and far["mean"] == pytest.approx((1 + 1 / 30) / 2, abs=1e-4) and far["interval"][0] > 0.3
    near = out["differences"]["dynalora_examples - uniform_merge"]
    assert not near["real"] and near["interval"][0] <= 0 <= near["interval"][1]
    assert out["methods"]["base"][0] < 0.25 < out["methods"]["base"][1]  # its mean over the two tasks is 0.25
    assert "base - uniform_merge" not in out["differences"]  # only dynalora methods are compared


def test_queries_come_from_the_query_splits_never_from_train():
    examples = [{"input": f"question {i}", "target": str(i)} for i in range(400)]
    task = parse_task({"description": "", "preferred_score": "exact_str_match", "examples": examples}, "toy")
    (support, _), (test_only, test_pool) = sample_examples(task, 5, 1000, 0)
    _, (both, both_pool) = sample_examples(task, 5, 1000, 0, ("validation", "test"))
    splits = {e.input: split_of(e.input) for e in task.examples}
    assert {splits[e.input] for e in support} == {"train"}
    assert {splits[e.input] for e in test_only} == {"test"} and len(test_only) == test_pool
    assert {splits[e.input] for e in both} == {"validation", "test"} and both_pool > test_pool
    assert sample_examples(task, 5, 10, 0)[1] == sample_examples(task, 5, 10, 0, ("test",))[1]
    with pytest.raises(ValueError, match="--query-splits.*train holds the support examples"):
        TaskEvalConfig(query_splits=["train", "test"])
