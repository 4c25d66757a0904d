"""Memory writers on tiny models: the upper-layer runner is exact, the distill writer learns the chunk,
writes only its upper modules, starts from the identity, leaves the base weights alone, and keeps the
memory at its fixed rank."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynalora.lora import DynamicLoraModel, InjectConfig, LoraBank, StateConfig, module_shapes_of
from dynalora.models import ByteTokenizer, tiny_model
from dynalora.runtime.absorb import AbsorbConfig, Absorber, load_absorber
from dynalora.runtime.absorb_probes import chunk_probes, mentioned_names, names_in
from dynalora.runtime.memory_writers import DistillConfig, DistillWriter
from dynalora.runtime.upper_layers import UpperLayers

TEXT = "Zorba Quint lives in Mellowby. Zorba Quint bakes rye bread. Mellowby has 4,310 people."


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_upper_layers_reproduce_the_full_forward_exactly(family):
    torch.manual_seed(0)
    model = tiny_model(family).eval()
    ids = torch.randint(0, 256, (2, 11))
    full = model(input_ids=ids).logits  # (2, 11, V)
    upper = UpperLayers(model, first_layer=1)
    inputs = upper.capture(ids)
    assert torch.equal(upper.logits(inputs), full)
    select = torch.zeros(2, 11, dtype=torch.bool)
    select[0, 3], select[1, 7:] = True, True
    # fewer rows, other BLAS blocking: equal to rounding
    torch.testing.assert_close(upper.logits(inputs, select), full[select], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="first_layer=9"):
        UpperLayers(model, first_layer=9)


def test_probes_ask_about_the_names_a_chunk_mentions():
    assert names_in("Zorba Quint lives in Mellowby.") == ["Zorba Quint", "Mellowby"]
    assert names_in("The town has 4,310 people.") == ["4,310"]  # "The" only starts the sentence
    assert mentioned_names("Who is Zorba Quint's baker? It is in Mellowby.") == {"Zorba Quint", "Mellowby"}
    probes = chunk_probes(TEXT, max_probes=8)
    assert probes[0] == ("What does the text say about Zorba Quint?",
                         "Zorba Quint lives in Mellowby. Zorba Quint bakes rye bread.")
    names = ("Zorba Quint", "Mellowby", "4,310")
    assert {q for q, _ in probes} == {f"What does the text say about {n}?" for n in names}
    restated = chunk_probes(TEXT, max_probes=2, restate=True)
    assert len(restated) == 2 and restated[-1][0] == "What was the text about?"
    assert set(restated[-1][1].rstrip(".").split(". ")) == set(TEXT.rstrip(".").split(". "))
    assert chunk_probes("   ") == []
    cloze = chunk_probes(TEXT, max_probes=0, cloze=4)
    # "Mellowby has 4,310 people." relates nothing it can tell apart: a lone first word is not taken for a name
    assert cloze == [("Complete this sentence from the text: Zorba Quint lives in ...", "Mellowby")]


def make_distill(config: DistillConfig, memory_rank: int = 4):
    torch.manual_seed(0)
    model = tiny_model("llama")
    dyn = DynamicLoraModel.attach(model, LoraBank(module_shapes_of(model)), InjectConfig(
        target_modules=["o_proj", "down_proj"], state=StateConfig(max_batch=2, generated_rank=0,
                                                                 memory_rank=memory_rank)))
    writer = DistillWriter(dyn, ByteTokenizer(), config)
    return dyn, writer, Absorber(dyn, writer, AbsorbConfig(window=64, sink_tokens=2, chunk_tokens=32))


def chunk_nll(dyn, ids: list[int], row: int) -> float:
    with torch.no_grad(), dyn.state.use_rows(row):
        logits = dyn(input_ids=torch.tensor([ids])).logits[0, :-1]
    return float(F.cross_entropy(logits, torch.tensor(ids[1:])))


def test_distill_writes_upper_modules_only_and_zero_steps_is_the_identity():
    dyn, writer, absorber = make_distill(DistillConfig(steps=0, rank=2))
    assert writer.upper.first_layer == 1  # the upper half of the tiny model's 2 layers
    assert writer.modules_list == ["model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    ids = list(TEXT.encode())[:32]
    factors = writer.write(dyn, ids)
    assert set(factors) == set(writer.modules_list)
    assert all(a.shape[0] == 2 and b.shape[1] == 2 and not b.any() for a, b in factors.values())
    before = dyn(input_ids=torch.tensor([ids])).logits
    absorber.absorb(0, ids)
    assert torch.equal(dyn(input_ids=torch.tensor([ids])).logits, before)  # B = 0: the memory adds nothing


def test_distill_steps_teach_the_chunk_without_touching_the_base_weights():
    dyn, writer, absorber = make_distill(DistillConfig(steps=12, lr=0.03, rank=2, max_probes=2))
    weights = {k: v.clone() for k, v in dyn.model.state_dict().items()}
    ids = list(TEXT.encode())[:32]
    before = chunk_nll(dyn, ids, 0)
    absorber.absorb(0, ids)
    assert chunk_nll(dyn, ids, 0) < before - 0.1  # the row's memory now predicts the evicted chunk
    assert chunk_nll(dyn, ids, 1) == pytest.approx(before)  # another row is untouched
    assert all(p.grad is None for p in dyn.model.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in dyn.model.state_dict().items())


def test_distill_keeps_the_memory_at_its_fixed_rank_and_buffers_in_place():
    dyn, writer, absorber = make_distill(DistillConfig(steps=2, rank=3), memory_rank=4)
    pointers = lambda: [t.data_ptr() for s in dyn.state.slots.values() for t in (s.row_a_t, s.row_b_t)]  # noqa: E731
    before = pointers()
    ids = list(TEXT.encode())
    reports = absorber.absorb_text(0, ids)
    assert len(reports) == 3 and [r.memory_rank for r in reports] == [3, 4, 4]
    assert reports[-1].rel_error > 0  # the third chunk was folded in by the rank cut
    assert pointers() == before


def test_locality_term_pulls_a_memory_back_towards_the_base_model():
    """With only the locality KL, steps from a perturbed start lower the KL to the base model on its own answers."""
    dyn, writer, _ = make_distill(DistillConfig(steps=0, rank=2, chunk_weight=0, probe_weight=0, locality_weight=1))
    texts = writer._locality_texts(dyn, torch.device("cpu"))
    params = writer.start_factors(dyn, [1, 2, 3], torch.device("cpu"))
    with torch.no_grad():
        for _, b in params.values():
            b.normal_(std=0.5)
    with torch.no_grad():
        start = float(writer.loss(dyn, texts, {}, params))
        assert float(writer.loss(dyn, texts, {}, {})) == pytest.approx(0, abs=1e-5)  # no memory: the base itself
    optimizer = torch.optim.Adam([t for pair in params.values() for t in pair], lr=0.05)
    for _ in range(10):
        loss = writer.loss(dyn, texts, {}, params)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert float(writer.loss(dyn, texts, {}, params)) < 0.5 * start


def test_load_absorber_names_what_a_writer_needs():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="writer='gist'"):
        load_absorber(model, writer="gist")
    with pytest.raises(ValueError, match="needs compressor_dir"):
        load_absorber(model, writer="compressor+distill", tokenizer=ByteTokenizer())
    with pytest.raises(ValueError, match="needs the tokenizer"):
        load_absorber(model, writer="distill")
    absorber = load_absorber(model, writer="distill", tokenizer=ByteTokenizer(),
                             distill=DistillConfig(rank=3, memory_rank=3), window=100, chunk_tokens=16)
    assert absorber.dyn.state.config.memory_rank == 3 and absorber.config.chunk_tokens == 16
    with pytest.raises(ValueError, match="first_layer"):
        DistillConfig(first_layer=1.0)


def test_engine_eviction_with_the_distill_writer_equals_a_fresh_forward():
    """The engine absorbs with the distill writer mid-generation; its tokens equal a fresh forward of the kept
    tokens under the memory the same writer leaves (the writer is deterministic)."""
    from dynalora.runtime import Engine, SamplingConfig

    dyn, writer, _ = make_distill(DistillConfig(steps=3, lr=0.03, rank=2, max_probes=1))
    absorber = Absorber(dyn, writer, AbsorbConfig(window=40, sink_tokens=2, chunk_tokens=16))
    prompt = list(TEXT.encode())[:56]
    with torch.no_grad():
        row, expected = absorber.evict(0, list(prompt))[0], []
        for _ in range(12):
            expected.append(int(dyn(input_ids=torch.tensor([row])).logits[0, -1].argmax()))
            row, _ = absorber.evict(0, row + [expected[-1]])
    assert dyn.state.row_factors(0, "memory")  # something was absorbed
    dyn.state.reset()
    engine = Engine(dyn, ByteTokenizer(), None, absorber=absorber)
    engine.eos_ids = set()
    result = engine.generate([prompt], max_new_tokens=12, sampling=SamplingConfig())
    assert result.token_ids[0] == expected
    assert len(result.lora_events("absorb")) == 2


def test_absorber_hands_the_writer_the_chunks_its_memory_holds_and_forgets_them_on_reset():
    dyn, writer, absorber = make_distill(DistillConfig(steps=1, rank=2, memory_rank=4, max_probes=1, replay_chunks=1))
    rehearsed = []
    original = writer._probe_texts

    def spy(dyn_, chunks, memory, device):
        rehearsed.extend(list(c) for c in chunks)
        return original(dyn_, chunks, memory, device)

    writer._probe_texts = spy
    chunks = [list(TEXT.encode())[i:i + 24] for i in (0, 24, 48)]
    for chunk in chunks:
        absorber.absorb(0, chunk)
    assert absorber.replay(0) == chunks and absorber.replay(1) == []
    # each absorb probes its own chunk, then rehearses the last chunk the memory already held
    assert rehearsed == [chunks[0], chunks[1], chunks[0], chunks[2], chunks[1]]
    dyn.state.reset(0)
    assert absorber.replay(0) == []


def test_relevance_gate_turns_the_memory_on_only_for_prompts_that_name_what_it_absorbed():
    from dynalora.runtime import Engine, SamplingConfig

    dyn, writer, _ = make_distill(DistillConfig(steps=2, lr=0.03, rank=2, max_probes=1))
    with pytest.raises(ValueError, match="needs the tokenizer"):
        Absorber(dyn, writer, AbsorbConfig(window=64, sink_tokens=2, chunk_tokens=32, relevance_gate=True))
    absorber = Absorber(dyn, writer, AbsorbConfig(window=64, sink_tokens=2, chunk_tokens=32, relevance_gate=True),
                        ByteTokenizer())
    absorber.absorb(0, list(TEXT.encode())[:40])
    assert absorber.relevance(0, "Where does Zorba Quint live?") == 1.0
    assert absorber.relevance(0, "Where does Arven Holt live?") == 0.0
    engine = Engine(dyn, ByteTokenizer(), None, absorber=absorber)
    engine.generate([list(b"Who is Arven Holt?")], max_new_tokens=4, sampling=SamplingConfig())
    assert float(dyn.state.memory_weights[0]) == 0.0  # unrelated: the memory was off while it answered
    engine.generate([list(b"Who is Zorba Quint?")], max_new_tokens=4, sampling=SamplingConfig())
    assert float(dyn.state.memory_weights[0]) == 1.0
    dyn.state.reset(0)
    assert absorber.relevance(0, "Where does Zorba Quint live?") == 0.0  # a reset memory absorbed nothing


def test_generated_probes_are_the_models_own_questions_and_answers_with_the_chunk_in_view():
    dyn, writer, _ = make_distill(DistillConfig(steps=0, rank=2, generated=2))
    tokenizer, calls = ByteTokenizer(), []

    def scripted(dyn_, prompts, max_new_tokens):  # what the base model would say: a question, then an answer
        calls.append([tokenizer.decode(p) for p in prompts])
        if len(calls) == 1:
            return [list(b"Where does Zorba Quint live?\nAnd more."), list(b"no question here")]
        return [list(b"Mellowby")]

    writer._base_generate = scripted
    assert writer._generated_probes(dyn, TEXT) == [("Where does Zorba Quint live?", "Mellowby")]
    asked, answered = calls
    assert len(asked) == 2 and all(TEXT in prompt and "Answer in a few words" not in prompt for prompt in asked)
    assert "Ask one short question about Zorba Quint" in asked[0]
    assert TEXT in answered[0] and "Where does Zorba Quint live? Answer in a few words." in answered[0]


def test_the_text_after_a_chunk_is_a_probe_and_every_absorb_path_hands_it_over():
    class Recording:
        modules_list: list = []

        def __init__(self):
            self.calls = []

        def write(self, dyn, token_ids, memory=None, replay=(), following=()):
            self.calls.append((list(token_ids), list(following)))
            return {}

    dyn, writer, _ = make_distill(DistillConfig(steps=2, rank=2, max_probes=0, cloze=0, chunk_weight=0,
                                                following_tokens=16))
    recording = Recording()
    absorber = Absorber(dyn, recording, AbsorbConfig(window=20, sink_tokens=2, chunk_tokens=8))
    ids = list(range(40, 70))
    absorber.absorb_text(0, ids[:20])
    assert recording.calls == [(ids[0:8], ids[8:20]), (ids[8:16], ids[16:20]), (ids[16:20], [])]
    recording.calls.clear()
    absorber.evict(0, ids[:26])
    assert recording.calls == [(ids[2:10], ids[10:26])]
    # with only the following-text probe, the steps move the memory; without following text there is nothing to learn
    chunk, after = list(TEXT.encode())[:16], list(TEXT.encode())[16:40]
    texts = writer._following_texts(dyn, chunk, after, {}, torch.device("cpu"))  # teacher: `after` read after `chunk`
    with torch.no_grad():
        full = dyn(input_ids=torch.tensor([chunk + after])).logits[0, len(chunk):-1].float().log_softmax(-1)
    top = full.topk(texts.top_ids.shape[1], dim=-1)
    torch.testing.assert_close(texts.top_probs, top.values.exp(), rtol=1e-4, atol=1e-5)
    assert int(texts.select.sum()) == len(after) - 1 == texts.top_ids.shape[0]
    assert any(b.abs().sum() > 0 for _, b in writer.write(dyn, chunk, following=after).values())
    assert all(not b.any() for _, b in writer.write(dyn, chunk).values())
