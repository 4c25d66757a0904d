"""Background absorb in the engine: generation goes on while a chunk is written; the new memory arrives
whole at a step boundary; a failed write leaves the old memory and the tokens."""

from __future__ import annotations

import threading

import torch

from dynalora.lora import DynamicLoraModel, InjectConfig, LoraBank, StateConfig, module_shapes_of
from dynalora.lora.lowrank import merge_at_rank
from dynalora.models import ByteTokenizer, tiny_model
from dynalora.runtime import Engine, EngineConfig, SamplingConfig, TokenEvent
from dynalora.runtime.absorb import AbsorbConfig, Absorber
from dynalora.runtime.memory_writers import DistillConfig, DistillWriter


class GatedWriter:
    """Writes fixed factors, but only once the test opens the gate (or raises, when told to)."""

    def __init__(self, dyn, fail: bool = False):
        self.modules_list = [m for m in dyn.state.modules if "layers.1" in m]
        generator = torch.Generator().manual_seed(1)
        shapes = dyn.bank.module_shapes
        self.factors = {m: (torch.randn(2, shapes[m][0], generator=generator),
                            torch.randn(shapes[m][1], 2, generator=generator)) for m in self.modules_list}
        self.gate, self.fail, self.calls, self.handed = threading.Event(), fail, 0, []

    def write(self, dyn, token_ids, memory=None, replay=(), following=()):
        self.calls += 1
        self.handed.append((list(token_ids), list(following)))
        assert self.gate.wait(timeout=30)
        if self.fail:
            raise RuntimeError("writer broke")
        return self.factors


def make_engine(writer_factory):
    torch.manual_seed(0)
    model = tiny_model("llama")
    dyn = DynamicLoraModel.attach(model, LoraBank(module_shapes_of(model)), InjectConfig(
        target_modules=["o_proj", "down_proj"], state=StateConfig(max_batch=1, generated_rank=0, memory_rank=4)))
    writer = writer_factory(dyn)
    absorber = Absorber(dyn, writer, AbsorbConfig(window=32, sink_tokens=2, chunk_tokens=8))
    engine = Engine(dyn, ByteTokenizer(), None, config=EngineConfig(background_absorb=True), absorber=absorber)
    engine.eos_ids = set()
    return dyn, writer, engine


def memory_of(dyn):
    return {m: (a.clone(), b.clone()) for m, (a, b) in dyn.state.row_factors(0, "memory").items()}


def test_generation_goes_on_under_the_old_memory_until_the_write_lands_whole():
    dyn, writer, engine = make_engine(GatedWriter)
    prompt = list(range(40, 70))  # 30 tokens: the window of 32 is passed at the third new token
    kinds, seen_while_writing = [], []
    for event in engine.stream([prompt], max_new_tokens=30, sampling=SamplingConfig()):
        kinds.append(event.kind)
        if isinstance(event, TokenEvent) and "absorb_start" in kinds and "absorb" not in kinds:
            seen_while_writing.append(memory_of(dyn))
            if len(seen_while_writing) == 14:  # 14 tokens decoded while the write was in flight: past the window
                writer.gate.set()
                engine.worker.jobs[0].future.result(timeout=30)  # done: the next step boundary merges it
    assert kinds.count("absorb_start") >= 1 and kinds.count("absorb") >= 1
    chunk, following = writer.handed[0]  # the first write: 8 tokens after the 2-token sink, then the window's rest
    assert chunk == prompt[2:10] and following[:20] == prompt[10:] and len(following) > len(prompt[10:])
    assert len(seen_while_writing) >= 14 and all(m == {} for m in seen_while_writing)  # the old (empty) memory
    lora = [k for k in kinds if k.startswith("absorb")]
    assert lora[:2] == ["absorb_start", "absorb"]  # a write is reported finished before the next one starts
    assert all(a != b for a, b in zip(lora, lora[1:]) if a == "absorb_start")  # never two starts in a row
    expected, _ = merge_at_rank({}, writer.factors, 4)
    engine.worker.close()
    # after the first merge the memory holds the writer's factors (later ones merge more on top)
    if kinds.count("absorb") == 1:
        for m, (a, b) in memory_of(dyn).items():
            torch.testing.assert_close(b @ a, expected[m][1] @ expected[m][0])
    assert dyn.state.row_factors(0, "memory")


def test_a_failed_write_leaves_the_old_memory_and_keeps_the_tokens():
    dyn, writer, engine = make_engine(lambda d: GatedWriter(d, fail=True))
    writer.gate.set()
    prompt = list(range(40, 70))
    result = engine.generate([prompt], max_new_tokens=12, sampling=SamplingConfig())
    engine.worker.close()
    failed = result.lora_events("absorb_failed")
    assert len(failed) == 1 and "writer broke" in failed[0].detail and writer.calls == 1
    assert not result.lora_events("absorb") and dyn.state.row_factors(0, "memory") == {}
    assert len(result.token_ids[0]) == 12 and sum(engine.evicted_tokens.values()) == 0


def test_a_distill_write_on_another_thread_and_decoding_do_not_disturb_each_other():
    """LoRA overrides and capture hooks are per thread: forwards of the engine's thread during a write see the
    plain state, and the write equals the same write done inline."""
    config = DistillConfig(steps=4, lr=0.03, rank=2, memory_rank=4, max_probes=1)
    dyn, writer, engine = make_engine(lambda d: DistillWriter(d, ByteTokenizer(), config))
    prompt = list(b"Zorba Quint lives in Mellowby and bakes rye bread.")
    ids, chunk = torch.tensor([prompt]), prompt[2:18]
    with torch.no_grad():
        reference = dyn(input_ids=ids).logits
    inline = writer.fit(dyn, chunk, {})
    written, writing, overlapped = {}, threading.Event(), threading.Event()
    upper_logits = writer.upper.logits

    def held_logits(*args, **kwargs):  # called inside the writer's (thread-local) LoRA override
        if threading.current_thread() is not threading.main_thread() and not overlapped.is_set():
            writing.set()
            assert overlapped.wait(timeout=30)
        return upper_logits(*args, **kwargs)

    writer.upper.logits = held_logits
    thread = threading.Thread(target=lambda: written.update(writer.fit(dyn, chunk, {})))
    thread.start()
    assert writing.wait(timeout=30)
    with torch.no_grad():
        outputs = [dyn(input_ids=ids).logits]  # the write is held inside its override: this forward overlaps it
    overlapped.set()
    while thread.is_alive():
        with torch.no_grad():
            outputs.append(dyn(input_ids=ids).logits)
    thread.join()
    engine.close()
    assert all(torch.equal(out, reference) for out in outputs)
    assert set(written) == set(inline)
    for m in inline:
        torch.testing.assert_close((written[m][1] @ written[m][0]).detach(), (inline[m][1] @ inline[m][0]).detach(),
                                   rtol=1e-5, atol=1e-6)
