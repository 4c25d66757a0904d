"""Absorb on a tiny Llama: fixed-rank memory merges, the compressor, and eviction in the engine."""

from __future__ import annotations

import pytest
import torch

from dynalora.hyper.compressor import Compressor, CompressorConfig, layer_inputs
from dynalora.lora import DynamicLoraModel, InjectConfig, LoraBank, StateConfig, module_shapes_of
from dynalora.lora.lowrank import merge_at_rank
from dynalora.models import tiny_model
from dynalora.runtime import Engine, SamplingConfig
from dynalora.training import RunConfig
from dynalora.runtime.absorb import AbsorbConfig, Absorber

TARGETS = ["o_proj", "down_proj"]


def make_absorber(window=24, sink=2, chunk=8, memory_rank=4, rank=2, seed=0, family="llama"):
    torch.manual_seed(seed)
    model = tiny_model(family)
    shapes = module_shapes_of(model)
    dyn = DynamicLoraModel.attach(model, LoraBank(shapes), InjectConfig(
        target_modules=TARGETS, state=StateConfig(max_batch=2, generated_rank=0, memory_rank=memory_rank)))
    modules = {m: list(shapes[m]) for m in dyn.state.modules}
    compressor = Compressor(CompressorConfig(hidden_size=model.config.hidden_size, module_shapes=modules, rank=rank,
                                             width=32, heads=2))
    with torch.no_grad():  # a trained compressor writes nonzero B; a fresh one writes the identity
        for head in compressor.head_b.values():
            head.weight.normal_(std=0.5)
    return dyn, compressor, Absorber(dyn, compressor, AbsorbConfig(window=window, sink_tokens=sink, chunk_tokens=chunk))


def dense(factors):
    return {m: b @ a for m, (a, b) in factors.items()}


def test_merge_at_rank_is_exact_below_the_rank_and_optimal_above():
    g = torch.Generator().manual_seed(0)
    old = {"m": (torch.randn(2, 10, generator=g, dtype=torch.float64),
                 torch.randn(7, 2, generator=g, dtype=torch.float64))}
    new = {"m": (torch.randn(2, 10, generator=g, dtype=torch.float64),
                 torch.randn(7, 2, generator=g, dtype=torch.float64))}
    merged, error = merge_at_rank(old, new, rank=4, decay=0.5)
    assert error == 0.0
    torch.testing.assert_close(dense(merged)["m"], 0.5 * dense(old)["m"] + dense(new)["m"])
    merged, error = merge_at_rank(old, new, rank=3)
    full = dense(old)["m"] + dense(new)["m"]
    singular = torch.linalg.svdvals(full)
    assert merged["m"][0].shape == (3, 10)
    best = float(singular[3:].pow(2).sum().sqrt() / singular.pow(2).sum().sqrt())  # Eckart–Young
    assert error == pytest.approx(best, rel=1e-9)
    assert float(torch.linalg.norm(full - dense(merged)["m"]) / torch.linalg.norm(full)) == pytest.approx(best)


def test_fresh_compressor_writes_the_identity_and_ignores_padding():
    dyn, compressor, _ = make_absorber()
    with torch.no_grad():
        for head in compressor.head_b.values():
            head.weight.zero_()
    ids = torch.randint(0, 200, (1, 8))
    with torch.no_grad():
        factors = compressor(layer_inputs(dyn.model, ids, compressor.source_layers))
    assert all(float(b.abs().max()) == 0.0 for _, b in factors.values())
    assert set(factors) == set(dyn.state.modules)
    a, b = factors[dyn.state.modules[0]]
    assert a.shape[:2] == (1, 2) and b.shape[0] == 1 and b.shape[2] == 2
    # padding: the same chunk with 3 masked positions after it gives the same factors
    _, fresh, _ = make_absorber()
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[True] * 8 + [False] * 3])
    hidden_padded = {k: v for k, v in layer_inputs(dyn.model, padded, fresh.source_layers).items()}
    alone, with_pad = fresh(layer_inputs(dyn.model, ids, fresh.source_layers)), fresh(hidden_padded, mask)
    for module in alone:
        torch.testing.assert_close(alone[module][0], with_pad[module][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone[module][1], with_pad[module][1], atol=1e-5, rtol=1e-5)


def test_absorbing_keeps_the_memory_rank_and_size_fixed():
    dyn, _, absorber = make_absorber(memory_rank=4, rank=2)
    before = {k: v.numel() for k, v in dyn.state.tensors().items()}
    reports = absorber.absorb_text(0, torch.randint(0, 200, (40,)).tolist())  # 5 chunks of 8
    assert [r.tokens for r in reports] == [8] * 5
    assert [r.memory_rank for r in reports] == [2, 4, 4, 4, 4]
    assert reports[0].rel_error == 0.0 and reports[-1].rel_error > 0.0
    assert {k: v.numel() for k, v in dyn.state.tensors().items()} == before
    memory = dyn.state.row_factors(0, "memory")
    assert memory and all(a.shape[0] == 4 for a, _ in memory.values())
    assert not dyn.state.row_factors(1, "memory")  # other rows untouched


def test_absorb_changes_logits_only_of_its_row():
    dyn, _, absorber = make_absorber()
    ids = torch.randint(0, 200, (2, 6))
    with torch.no_grad():
        base = dyn(input_ids=ids).logits
        absorber.absorb(1, torch.randint(0, 200, (8,)).tolist())
        after = dyn(input_ids=ids).logits
    torch.testing.assert_close(after[0], base[0])
    assert not torch.allclose(after[1], base[1])


@torch.no_grad()
def reference_generation(dyn, absorber, prompt, steps):
    """Greedy, no KV cache: every step is a fresh forward of the kept tokens (positions from 0)."""
    dyn.state.reset()
    row, _ = absorber.evict(0, list(prompt))
    out = []
    for _ in range(steps):
        token = int(dyn(input_ids=torch.tensor([row])).logits[0, -1].argmax())
        out.append(token)
        row.append(token)
        row, _ = absorber.evict(0, row)
    return out


@pytest.mark.parametrize("prompt_length", [10, 40])  # inside the window, and longer than it
def test_engine_eviction_equals_a_fresh_forward_of_the_kept_tokens(prompt_length):
    dyn, _, absorber = make_absorber(window=24, sink=2, chunk=8)
    prompt = torch.randint(3, 200, (prompt_length,)).tolist()
    expected = reference_generation(dyn, absorber, prompt, steps=40)
    dyn.state.reset()
    engine = Engine(dyn, None, None, absorber=absorber)
    engine.eos_ids = set()
    result = engine.generate([prompt], max_new_tokens=40, sampling=SamplingConfig())
    assert result.token_ids[0] == expected
    absorbs = result.lora_events("absorb")
    assert len(absorbs) == (prompt_length + 40 - 24 + 7) // 8  # one per 8 tokens past the window
    assert all(e.position <= 24 for e in absorbs)


def test_compressor_save_load_round_trip(tmp_path):
    _, compressor, _ = make_absorber()
    compressor.save_pretrained(tmp_path / "c", dtype=torch.float32)
    loaded = Compressor.from_pretrained(tmp_path / "c")
    hidden = {layer: torch.randn(1, 5, compressor.config.hidden_size) for layer in compressor.source_layers}
    for module, (a, b) in compressor.eval()(hidden).items():
        torch.testing.assert_close(loaded(hidden)[module][0], a)
        torch.testing.assert_close(loaded(hidden)[module][1], b)
    with pytest.raises(FileNotFoundError, match="compressor"):
        Compressor.from_pretrained(tmp_path / "missing")


def test_absorber_refuses_a_state_without_memory():
    model = tiny_model("llama")
    dyn = DynamicLoraModel.attach(model, LoraBank(module_shapes_of(model)),
                                  InjectConfig(state=StateConfig(memory_rank=0)))
    shapes = module_shapes_of(model)
    compressor = Compressor(CompressorConfig(model.config.hidden_size, {m: list(shapes[m]) for m in dyn.state.modules}))
    with pytest.raises(ValueError, match="memory_rank"):
        Absorber(dyn, compressor)
    with pytest.raises(ValueError, match="window"):
        AbsorbConfig(window=10, sink_tokens=4, chunk_tokens=8)


def test_chat_session_never_absorbs_the_same_tokens_twice():
    from dynalora.models import ByteTokenizer
    from dynalora.runtime.session import ChatSession

    dyn, _, absorber = make_absorber(window=48, sink=2, chunk=8)
    tokenizer = ByteTokenizer()
    engine = Engine(dyn, tokenizer, None, absorber=absorber)
    engine.eos_ids = set()
    session = ChatSession(engine)
    absorbed = []
    for text in ("a first message that is long enough to overflow the window " * 2, "and a second one"):
        events = list(session.ask(text, max_new_tokens=6))
        absorbed.append(sum(int(e.detail.split()[1]) for e in events if getattr(e, "kind", "") == "absorb"))
    assert absorbed[0] > 0 and session.absorbed_tokens == sum(absorbed)
    full = tokenizer.apply_chat_template(session.messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
    kept = session.prompt_ids()
    assert kept == full[:2] + full[2 + session.absorbed_tokens:]  # absorbed tokens never come back


@pytest.mark.parametrize("kind,weights", [("gradient", "gradient_compressor.safetensors"),
                                          ("perceiver", "compressor.safetensors")])
def test_train_absorb_recipe_runs_on_a_tiny_model(tmp_path, kind, weights):
    import json

    from dynalora.train.absorb import AbsorbTrainConfig, train_absorb

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"context": f"Zorb{i} lives in Quell{i}. Zorb{i} is a baker.",
                                        "questions": [{"question": f"Where does Zorb{i} live?",
                                                       "answer": f"Quell{i}"}]})
                            + "\n" for i in range(6)))
    config = dict(data=[docs], validation=docs, out_dir=tmp_path / "out", model="tiny:llama", rank=2, width=32,
                  chunk_tokens=16, max_chunks=4, batch_size=2, validation_examples=4, teacher_top_k=4,
                  locality_fraction=0.3, threads=1, compressor=kind, bottleneck=8)
    result = train_absorb(AbsorbTrainConfig(steps=3, run=RunConfig(device="cpu", checkpoint_every=2), **config))
    assert result["steps_done"] == 3 and set(result["validation"]) == {"memory", "no_memory", "wrong_memory"}
    assert (tmp_path / "out" / weights).is_file() and not (tmp_path / "out" / "resume").exists()
    assert all(map(lambda h: all(v == v for v in h.values()), result["history"]))  # no NaN
    if kind == "gradient":  # a fresh perceiver writes the identity: its locality KL is exactly 0
        config.update(out_dir=tmp_path / "kl", locality_fraction=0.6)
        with_kl = train_absorb(AbsorbTrainConfig(steps=2, locality_weight=1.0, **config))
        assert any(h["locality_kl"] > 0 for h in with_kl["history"]) and with_kl["steps_done"] == 2


def test_locality_kl_is_zero_for_an_empty_memory_and_trains_a_nonzero_one_towards_none():
    from dynalora.train.absorb import AbsorbExample, locality_kl

    dyn, _, _ = make_absorber()
    g = torch.Generator().manual_seed(1)
    examples = [AbsorbExample([[5, 6]], torch.randint(3, 200, (n,), generator=g).tolist(),
                              [], 3, locality=True) for n in (12, 9)]
    shapes = {m: dyn.state.bank.module_shapes[m] for m in dyn.state.modules}  # (in, out)
    zero = {m: (torch.zeros(2, i, 4), torch.zeros(2, 4, o)) for m, (i, o) in shapes.items()}
    assert float(locality_kl(dyn, examples, zero, 0, "cpu", span=4)) == pytest.approx(0.0, abs=1e-6)
    factors = {m: (torch.randn(2, i, 4, generator=g).requires_grad_(),
                   torch.randn(2, 4, o, generator=g).requires_grad_()) for m, (i, o) in shapes.items()}
    kl = locality_kl(dyn, examples, factors, 0, "cpu", span=4)
    assert float(kl) > 1e-3
    kl.backward()
    assert all(b_t.grad.abs().sum() > 0 for _, b_t in factors.values())


def test_gradient_lora_baseline_lowers_the_document_loss():
    from dynalora.eval.absorb import _fine_tune

    dyn, _, _ = make_absorber(memory_rank=2)
    ids = torch.randint(3, 200, (24,)).tolist()

    @torch.no_grad()
    def nll() -> float:
        logits = dyn(input_ids=torch.tensor([ids])).logits[0, :-1]
        return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])))

    before = nll()
    runs = list(_fine_tune(dyn, ids, rank=2, modules=dyn.state.modules, steps=[1, 20], lr=1e-2, seed=0))
    assert [steps for steps, _, _ in runs] == [1, 20] and runs[0][1] <= runs[1][1]  # cumulative seconds
    assert nll() == before  # training runs through the functional path: the state is untouched
    dyn.state.update(0, memory=runs[-1][2])
    assert nll() < before - 0.1


def test_document_batches_keep_a_documents_questions_together():
    from dynalora.train.absorb import AbsorbExample, document_batches

    examples = [AbsorbExample([[1]], [1], [1], 1, document=d) for d in (0, 0, 0, 1, 1, 2, 2, 2, 2)]
    batches = document_batches(examples, batch_size=3, steps=3, seed=0)
    assert len(batches) == 3 and sorted(i for b in batches for i in b) == list(range(9))  # one epoch
    documents = [examples[i].document for b in batches for i in b]
    changes = sum(a != b for a, b in zip(documents, documents[1:]))
    assert changes == 2  # three documents, each a contiguous run


def test_eval_absorb_end_to_end_and_a_zero_memory_weight_answers_as_no_context(tmp_path):
    """Every method on a tiny model; with ``memory_weight=0`` the absorbed memory is switched off when answering,
    so ``dynalora`` must answer exactly as ``no_context`` does (and, with weight 1, it must not)."""
    import json

    from dynalora.eval.absorb import AbsorbEvalConfig, eval_absorb
    from dynalora.train.absorb import AbsorbTrainConfig, train_absorb

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"context": f"Zorb{i} lives in Quell{i}. Zorb{i} is a baker.",
                                        "questions": [{"question": f"Where does Zorb{i} live?", "answer": f"Quell{i}"},
                                                      {"question": f"What is Zorb{i}?", "answer": "a baker"}]})
                            + "\n" for i in range(2)))
    train_absorb(AbsorbTrainConfig(data=[docs], out_dir=tmp_path / "absorb", model="tiny:llama", rank=2,
                                   chunk_tokens=16, max_chunks=8, steps=0, threads=1, bottleneck=8,
                                   init_step=0.5))
    common = dict(data=docs, compressor_dir=tmp_path / "absorb", model="tiny:llama", window=64, max_new_tokens=6,
                  threads=1)
    full = eval_absorb(AbsorbEvalConfig(gradient_steps=[1, 2], **common), out=tmp_path / "eval.json")
    assert set(full["methods"]) == {"full_context", "no_context", "dynalora", "summary", "gradient_lora@1",
                                    "gradient_lora@2"}
    assert full["questions"] == 4 and full["adapter_bytes"] > 0 and full["kv_bytes_evicted"] > 0
    assert json.loads((tmp_path / "eval.json").read_text())["memory_weight"] == 1.0
    answers = lambda result, name: [e[name] for e in result["examples"]]  # noqa: E731
    assert answers(full, "dynalora") != answers(full, "no_context")  # the memory acts at weight 1
    off = eval_absorb(AbsorbEvalConfig(methods=["no_context", "dynalora"], memory_weight=0.0, **common))
    assert answers(off, "dynalora") == answers(off, "no_context")


def test_eval_absorb_with_the_distill_writer_scores_each_step_count_and_a_sequence(tmp_path):
    import json

    from dynalora.eval.absorb import AbsorbEvalConfig, eval_absorb
    from dynalora.runtime.memory_writers import DistillConfig

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"context": f"Zorb{i} lives in Quell{i}. Zorb{i} is a baker.",
                                        "questions": [{"question": f"Where does Zorb{i} live?", "answer": f"Quell{i}"}],
                                        "split": "validation"}) + "\n" for i in range(3)))
    result = eval_absorb(AbsorbEvalConfig(
        data=docs, model="tiny:llama", window=64, max_new_tokens=4, threads=1, absorber="distill",
        distill=DistillConfig(rank=2, memory_rank=4, max_probes=1, cloze=1), steps=[0, 2], chunk_tokens=24,
        methods=["no_context", "dynalora"], locality=3, sequence=3), out=tmp_path / "eval.json")
    assert set(result["methods"]) == {"no_context", "dynalora@0", "dynalora@2"}
    for name in ("dynalora@0", "dynalora@2"):
        method = result["methods"][name]
        assert method["cost_chunk_prefills"] > 0 and method["absorb_seconds_per_chunk"] > 0
    # zero steps write B = 0: the memory is the identity, so answers are exactly those without it
    assert [e["dynalora@0"] for e in result["examples"]] == [e["no_context"] for e in result["examples"]]
    assert result["locality"]["by_method"]["dynalora@0"]["exact_match_drop_points"] == 0
    sequence = result["sequence"]
    assert sequence["method"] == "dynalora@2" and sorted(sequence["by_age"]) == [0, 1, 2]
    assert len(set(sequence["state_bytes_by_document"])) == 1  # the memory never grows
    assert result["memory_modules"] == 2 and result["distill"]["rank"] == 2
