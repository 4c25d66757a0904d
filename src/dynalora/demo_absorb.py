"""The demo's absorb part: a document is folded into the memory LoRA and evicted, then questioned.

The document is an invented-facts one from the **test** seeds (never trained on; not one of the eight
that ``dynalora eval absorb`` scores). Each question is asked twice with only the question in the
window: by the base model, and with the memory LoRA a writer (``distill`` by default, or the shipped
compressor) wrote from the evicted text.
"""

from __future__ import annotations

from pathlib import Path

from dynalora.demo import BOLD, DIM, RESET

DEMO_DOCUMENT_OFFSET = 100
"""Test-split seed offset of the demo's document (the absorb evaluation uses offsets 0–7)."""


def run_absorb_demo(compressor_dir: Path, model: str | None = None, questions: int = 6, writer: str = "compressor",
                    steps: int | None = None, step_sizes: Path | None = None, device: str = "cpu",
                    dtype: str = "float32") -> dict:
    from dynalora.data.absorb import split_seeds
    from dynalora.data.facts import facts_document
    from dynalora.eval.absorb import Answerer
    from dynalora.eval.answers import exact_match
    from dynalora.runtime.chat import chat_prompt
    from dynalora.runtime.memory_writers import DistillConfig
    from dynalora.system.assemble import EngineSpec, System

    distill = DistillConfig(steps=DistillConfig.steps if steps is None else steps,
                            step_sizes=str(step_sizes) if step_sizes is not None else None)
    system = System.from_checkpoints(EngineSpec(
        model=model, device=device, dtype=dtype, hypernetwork="none", triggers=[], window=512,
        compressor=compressor_dir, absorber=writer, distill=distill, max_batch=questions))
    absorber, tokenizer = system.absorber, system.base.tokenizer
    state = absorber.dyn.state
    document = facts_document(split_seeds("test")[DEMO_DOCUMENT_OFFSET], words=150)
    asked = document["questions"][:questions]
    ids = tokenizer(document["context"], add_special_tokens=False)["input_ids"]
    rank = absorber.dyn.state.config.memory_rank
    print(f"\n{BOLD}Absorb{RESET}: a document of {len(ids)} tokens (test seed) is read in chunks of "
          f"{absorber.config.chunk_tokens} into a rank-{rank} memory LoRA and evicted:")
    print(f"{DIM}{document['context']}{RESET}\n")
    answerer = Answerer(absorber.dyn, tokenizer, max_new_tokens=16)
    prompts = [chat_prompt(tokenizer, q["question"]) for q in asked]
    without = answerer.answer(prompts)
    reports = absorber.absorb_text(0, ids)
    memory = state.row_factors(0, "memory")
    for row in range(1, len(asked)):
        state.update(row, memory=memory)
    with_memory = answerer.answer(prompts)
    seconds = sum(r.seconds for r in reports)
    print(f"absorbed in {len(reports)} chunks, {seconds:.2f} s; now only the question is in the window:")
    hits = {"base": 0, "memory": 0}
    for qa, plain, remembered in zip(asked, without, with_memory):
        right = exact_match(remembered, qa["answer"])
        hits["base"] += int(exact_match(plain, qa["answer"]))
        hits["memory"] += int(right)
        mark = "✓" if right else "✗"
        print(f"{BOLD}> {qa['question']}{RESET}  (answer: {qa['answer']})\n"
              f"  base: {plain[:60]!r}\n  with the memory {mark}: {remembered[:60]!r}")
    print(f"\nright from the evicted text: {hits['memory']}/{len(asked)} with the memory, {hits['base']}/{len(asked)} "
          f"without ({writer} writer; results/eval_absorb{'_distill' if writer != 'compressor' else ''}.json has "
          "the measured rates over eight test documents)")
    system.close()
    return {"document_tokens": len(ids), "questions": len(asked), "correct": hits, "absorb_seconds": seconds}
