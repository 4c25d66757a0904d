"""``dynalora eval absorb``: answer questions about a document that is no longer in the window.

Every method answers each question with the chat template, greedy, at most ``max_new_tokens``; answers
are scored by containment exact match and token F1 (:mod:`dynalora.eval.answers`):

* ``full_context`` — the document and the question in context (upper bound);
* ``no_context`` — the question alone (lower bound);
* ``dynalora`` — the document absorbed chunk by chunk into the memory LoRA (fixed rank), then only the
  question in the window;
* ``gradient_lora`` — a LoRA of the same rank and modules fine-tuned on the document by next-token loss
  (Temp-LoRA style), scored after each of ``gradient_steps`` (cumulative) steps;
* ``summary`` — the model summarises each chunk; the summaries (within the window budget) replace the text.

``seconds_per_1k_tokens``: adaptation (absorb, fine-tuning, summarising) plus answering, per 1,000 document
tokens. ``--needle``: pass keys at 10 depths in filler of 1×/2×/4×/8× the window, streamed through a window
of ``window`` tokens (the engine absorbs what leaves it) against the same window truncated, and full context.
``--locality N``: accuracy on N self-contained unrelated questions with a document's memory applied vs without.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from dynalora.models import check_placement
from dynalora.eval.answers import score_answers
from dynalora.report import report
from dynalora.runtime.chat import chat_prompt
from dynalora.runtime.memory_writers import WRITERS, DistillConfig
from dynalora.shipped import shipped

METHODS = ("full_context", "no_context", "dynalora", "gradient_lora", "summary")
SUMMARY_INSTRUCTION = "Summarise the text above in one or two sentences. Keep every name and number."


@dataclass
class AbsorbEvalConfig:
    data: Path | None = None
    """Documents JSONL (``dynalora data absorb --split test``); not needed with ``needle``."""
    compressor_dir: Path = shipped("absorb")
    """The compressor (``dynalora train absorb``), for the writers that use it."""
    model: str | None = None
    """Base model: HF id or folder (None: the embedded SmolLM2-135M-Instruct)."""
    window: int = 512
    """Window budget in tokens (summaries must fit in it; ``needle`` streams through it)."""
    sink_tokens: int = 4
    """First tokens of the conversation never evicted (attention sinks)."""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """Methods scored: full_context, no_context, dynalora, gradient_lora, summary."""
    max_docs: int | None = None
    """Documents scored (None: all of ``data``)."""
    max_new_tokens: int = 32
    """Tokens generated per answer."""
    gradient_steps: list[int] = field(default_factory=lambda: [4, 16, 48])
    """Cumulative fine-tuning steps at which ``gradient_lora`` is scored."""
    gradient_lr: float = 3e-3
    """Learning rate of the ``gradient_lora`` baseline (fine-tuning a LoRA on the evicted text)."""
    needle: bool = False
    """Pass-key retrieval: a key in filler streamed through the window at several lengths (no ``data``)."""
    needle_multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Needle stream lengths, in windows."""
    locality: int = 0
    """Number of unrelated questions for the locality check (0: skip)."""
    memory_weight: float = 1.0
    """Scale on the absorbed memory when answering (1: as written; ``LoraState.set_memory_weight``)."""
    absorber: str = "compressor"
    """The memory writer: compressor, distill or compressor+distill (:mod:`dynalora.runtime.memory_writers`)."""
    relevance_gate: bool = False
    """Memory on only for questions that name something it absorbed (``AbsorbConfig.relevance_gate``)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """The distilling writers' settings (``distill.steps`` is replaced by each of ``steps``)."""
    sequence: int = 0
    """Long conversation: this many documents absorbed one after another into one memory, then questions
    about each (retention by age; memory bytes and absorb time per chunk). 0: skip."""
    chunk_tokens: int | None = None
    """Tokens absorbed at a time (default: the compressor's training chunk, or 3/4 of the window for ``distill``)."""
    steps: list[int] = field(default_factory=lambda: [DistillConfig.steps])
    """Distillation steps per chunk; a distilling writer is scored as ``dynalora@k`` for each k."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or auto."""
    dtype: str = "float32"
    """The base model's weights: float32, bfloat16 or float16 (scores are computed in float32)."""
    threads: int = 2
    """CPU threads torch uses."""

    def __post_init__(self):
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"AbsorbEvalConfig.methods: unknown {unknown}; choose from {list(METHODS)}")
        if not self.needle and self.data is None:
            raise ValueError("AbsorbEvalConfig.data: give a documents JSONL (or needle=True)")
        if not self.memory_weight >= 0:
            raise ValueError(f"AbsorbEvalConfig.memory_weight: {self.memory_weight} must be ≥ 0")
        if self.absorber not in WRITERS:
            raise ValueError(f"AbsorbEvalConfig.absorber={self.absorber!r}: choose one of {', '.join(WRITERS)}")
        if self.sequence and self.data is None:
            raise ValueError("AbsorbEvalConfig.sequence: give the documents with data")
        if not self.steps or min(self.steps) < 0:
            raise ValueError(f"AbsorbEvalConfig.steps={self.steps}: give step counts ≥ 0")
        check_placement(self.device, self.dtype)

    @property
    def writer_runs(self) -> list[tuple[str, DistillConfig]]:
        """``(method name, distill settings)`` per writer run: one for the compressor, one per step count."""
        if self.absorber == "compressor":
            return [("dynalora", self.distill)]
        return [(f"dynalora@{k}", replace(self.distill, steps=k)) for k in self.steps]


class Answerer:
    """Greedy chat answers under whatever LoRA the state rows hold (one engine, rows = questions)."""

    def __init__(self, dyn, tokenizer, max_new_tokens: int, absorber=None):
        from dynalora.runtime import Engine

        self.dyn, self.tokenizer, self.max_new_tokens = dyn, tokenizer, max_new_tokens
        self.engine = Engine(dyn, tokenizer, absorber=absorber)

    def answer(self, prompts: list[list[int]], memory_weights: list[float] | None = None) -> list[str]:
        """Greedy answers; ``memory_weights`` (one per prompt) scales each row's memory while it answers."""
        texts = []
        rows = self.dyn.state.max_batch
        for start in range(0, len(prompts), rows):
            for row, weight in enumerate((memory_weights or [])[start:start + rows]):
                self.dyn.state.set_memory_weight(row, weight)
            result = self.engine.generate(prompts[start:start + rows], max_new_tokens=self.max_new_tokens)
            texts += [t.strip() for t in result.texts]
        return texts


def _copy_memory(state, factors: dict, rows: int, weight: float = 1.0) -> None:
    for row in range(rows):
        state.update(row, memory=factors)
        state.set_memory_weight(row, weight)


def _fine_tune(dyn, context_ids: list[int], rank: int, modules: list[str], steps: list[int], lr: float, seed: int):
    """Yield ``(steps_done, seconds, factors)`` of a fresh rank-``rank`` LoRA trained on the document's
    next-token loss (A random, B zero, as LoRA starts), at each count in ``steps``."""
    generator = torch.Generator().manual_seed(seed)
    shapes, device = dyn.bank.module_shapes, dyn.state.device
    params = {}
    for m in modules:  # drawn on the CPU (the same start on every device), then moved
        in_features, out_features = shapes[m]
        a = torch.randn(rank, in_features, generator=generator) * in_features ** -0.5  # (r, in)
        b = torch.zeros(out_features, rank, device=device)  # (out, r)
        params[m] = (torch.nn.Parameter(a.to(device)), torch.nn.Parameter(b))
    optimizer = torch.optim.Adam([p for pair in params.values() for p in pair], lr=lr)
    ids = torch.tensor([context_ids], device=device)  # (1, T)
    done, seconds = 0, 0.0
    for target in steps:
        began = time.perf_counter()
        while done < target:
            factors = {m: (a.T[None], b.T[None]) for m, (a, b) in params.items()}  # (1, in, r), (1, r, out)
            with torch.enable_grad(), dyn.state.functional(None, factors):
                logits = dyn(input_ids=ids, use_cache=False).logits[0, :-1]  # (T-1, V)
                loss = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:])
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
        seconds += time.perf_counter() - began
        yield done, seconds, {m: (a.detach().clone(), b.detach().clone()) for m, (a, b) in params.items()}


def eval_absorb(config: AbsorbEvalConfig, out: Path | None = None) -> dict:
    from dynalora.data.absorb import needle_suite, read_absorb_docs, unrelated_questions
    from dynalora.system.assemble import EngineSpec, System

    torch.set_num_threads(config.threads)
    system = System.from_checkpoints(EngineSpec(
        model=config.model, device=config.device, dtype=config.dtype, hypernetwork="none", triggers=[],
        window=config.window, compressor=config.compressor_dir, absorber=config.absorber, distill=config.distill,
        sink_tokens=config.sink_tokens, chunk_tokens=config.chunk_tokens, relevance_gate=config.relevance_gate,
        max_batch=16))
    tokenizer, model, absorber = system.base.tokenizer, system.base.model, system.absorber
    dyn, chunk_tokens, rank = absorber.dyn, absorber.config.chunk_tokens, absorber.dyn.state.config.memory_rank
    runs = _writer_runs(config, absorber, tokenizer)
    answerer = Answerer(dyn, tokenizer, config.max_new_tokens)
    shapes = dyn.bank.module_shapes
    memory_bytes = sum((shapes[m][0] + shapes[m][1]) * rank * 2 for m in absorber.writer.modules_list)  # fp16
    kv_per_token = 2 * model.config.num_hidden_layers * getattr(model.config, "num_key_value_heads",
                                                                  model.config.num_attention_heads) * \
        (model.config.hidden_size // model.config.num_attention_heads) * 2  # fp16 K and V
    result = {"window": config.window, "chunk_tokens": chunk_tokens, "memory_rank": rank,
              "relevance_gate": config.relevance_gate,
              "memory_weight": config.memory_weight, "absorber": config.absorber,
              "memory_modules": len(absorber.writer.modules_list),
              "adapter_bytes": memory_bytes, "kv_bytes_per_token": kv_per_token,
              "compressor": None if config.absorber == "distill" else str(config.compressor_dir),
              "distill": None if config.absorber == "compressor" else asdict(config.distill)}
    if config.data is not None:
        docs = read_absorb_docs(config.data)[:config.max_docs]
        split = docs[0].get("split", "test") if docs else "test"
        unrelated = unrelated_questions(config.locality, split=split) if config.locality else []
        first_chunk = tokenizer(docs[0]["context"], add_special_tokens=False)["input_ids"][:chunk_tokens]
        result["chunk_prefill_seconds"] = chunk_prefill_seconds(dyn, first_chunk)
        result.update(_eval_documents(config, docs, dyn, runs, answerer, tokenizer, rank, unrelated,
                                      result["chunk_prefill_seconds"]))
        result["kv_bytes_evicted"] = round(result.pop("evicted_tokens_per_doc") * kv_per_token)
        result["data"] = str(config.data)
    elif config.locality:
        result["locality"] = _eval_locality(unrelated_questions(config.locality),
                                            needle_suite(config.window, (1,), 2, tokenizer), dyn, runs, answerer,
                                            tokenizer, config.memory_weight)
    if config.sequence:
        result["sequence"] = _eval_sequence(read_absorb_docs(config.data)[:config.sequence], dyn,
                                            list(runs.items())[-1], answerer, tokenizer, config.memory_weight)
    if config.needle:
        streaming = list(runs.values())[-1]
        result["needle"] = _eval_needle(config, needle_suite(config.window, tuple(config.needle_multiples), 10,
                                                             tokenizer), dyn, streaming, tokenizer, chat_prompt)
    dyn.detach()
    return report(result, format_absorb_table(result), out)


def _writer_runs(config: AbsorbEvalConfig, absorber, tokenizer) -> dict:
    """Method name → an :class:`Absorber` on the same model and state, one per writer setting."""
    from dynalora.runtime.absorb import Absorber
    from dynalora.runtime.memory_writers import DistillWriter

    if config.absorber == "compressor":
        return {"dynalora": absorber}
    start = absorber.writer.start
    return {name: Absorber(absorber.dyn, DistillWriter(absorber.dyn, tokenizer, settings, start=start), absorber.config,
                           tokenizer) for name, settings in config.writer_runs}


def _eval_sequence(docs: list[dict], dyn, run: tuple, answerer, tokenizer, memory_weight: float) -> dict:
    """Documents absorbed one after another into row 0's fixed-rank memory, then every document's questions
    under that one memory: exact match by age (0 = absorbed last) against its full and no context."""
    name, absorber = run
    state = dyn.state
    state.reset()
    seconds_by_doc, state_bytes = [], []
    for doc in tqdm(docs, desc=f"sequence ({name})"):
        reports = absorber.absorb_text(0, tokenizer(doc["context"], add_special_tokens=False)["input_ids"])
        seconds_by_doc.append(sum(r.seconds for r in reports) / len(reports))
        state_bytes.append(sum(t.numel() * t.element_size() for t in state.tensors().values()))
    def exact_match(with_context: bool) -> list[float]:
        return [score_answers(answerer.answer([chat_prompt(tokenizer, q["question"], d["context"] if with_context
                                                           else None) for q in d["questions"]]),
                              [q["answer"] for q in d["questions"]])["exact_match"] for d in docs]

    _copy_memory(state, state.row_factors(0, "memory"), state.max_batch, memory_weight)
    with_memory = exact_match(False)
    state.reset()
    bounds = {"full_context": exact_match(True), "no_context": exact_match(False)}
    by_age = {}
    for index, (em, top, bottom) in enumerate(zip(with_memory, bounds["full_context"], bounds["no_context"])):
        by_age[len(docs) - 1 - index] = {"exact_match": em, "full_context": top, "no_context": bottom,
                                         "gap_closed": (em - bottom) / (top - bottom) if top != bottom else None}
    return {"method": name, "documents": len(docs), "by_age": dict(sorted(by_age.items())),
            "absorb_seconds_per_chunk_by_document": seconds_by_doc, "state_bytes_by_document": state_bytes}


@torch.no_grad()
def chunk_prefill_seconds(dyn, chunk_ids: list[int], repeats: int = 5) -> float:
    """Median seconds of one plain forward over a chunk (no LoRA): the unit of ``cost_chunk_prefills``."""
    ids = torch.tensor([chunk_ids], device=dyn.state.device)
    times = []
    with dyn.state.functional(None, {}):
        for _ in range(repeats + 1):
            began = time.perf_counter()
            dyn.model(input_ids=ids, use_cache=False)
            times.append(time.perf_counter() - began)
    return statistics.median(times[1:])  # the first call warms up


def _eval_documents(config, docs, dyn, runs, answerer, tokenizer, rank, unrelated, prefill_seconds) -> dict:
    """Every method on every document; each writer's memory of a document is also put under the unrelated
    questions assigned to it (question ``i`` goes to document ``i mod len(docs)``) for locality."""
    state, run = dyn.state, set(config.methods)
    predictions: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    answers, context_tokens, evicted = [], 0, 0
    gradient_times: dict[int, float] = {}
    absorb_times: dict[str, list[float]] = {}
    local_prompts = [chat_prompt(tokenizer, item["questions"][0]["question"], item["context"]) for item in unrelated]
    local_answers = [item["questions"][0]["answer"] for item in unrelated]
    local_texts = [f"{item['context']} {item['questions'][0]['question']}" for item in unrelated]
    local_predictions: dict[str, list[tuple[int, str]]] = {}

    def record(name, texts, spent):
        predictions.setdefault(name, []).extend(texts)
        seconds[name] = seconds.get(name, 0.0) + spent

    for index, doc in enumerate(tqdm(docs, desc="eval absorb")):
        questions = [q["question"] for q in doc["questions"]]
        answers += [q["answer"] for q in doc["questions"]]
        ids = tokenizer(doc["context"], add_special_tokens=False)["input_ids"]
        context_tokens += len(ids)
        evicted += len(ids)
        bare = [chat_prompt(tokenizer, q) for q in questions]
        mine = list(range(index, len(unrelated), len(docs)))
        state.reset()
        if "full_context" in run:
            began = time.perf_counter()
            record("full_context", answerer.answer([chat_prompt(tokenizer, q, doc["context"]) for q in questions]),
                   time.perf_counter() - began)
        if "no_context" in run:
            began = time.perf_counter()
            record("no_context", answerer.answer(bare), time.perf_counter() - began)
        if "dynalora" in run:
            for name, absorber in runs.items():
                began = time.perf_counter()
                reports = absorber.absorb_text(0, ids)
                absorb_times.setdefault(name, []).extend(r.seconds for r in reports)
                _copy_memory(state, state.row_factors(0, "memory"), state.max_batch, config.memory_weight)
                gate = lambda texts: [config.memory_weight * absorber.relevance(0, t) for t in texts]  # noqa: E731
                record(name, answerer.answer(bare, gate(questions)), time.perf_counter() - began)
                if mine:
                    texts = answerer.answer([local_prompts[i] for i in mine],
                                            gate([local_texts[i] for i in mine]))
                    local_predictions.setdefault(name, []).extend(zip(mine, texts))
                state.reset()
        if "summary" in run:
            began = time.perf_counter()
            chunk_tokens = next(iter(runs.values())).config.chunk_tokens  # every run absorbs chunks of this size
            budget = max(16, (config.window - max(len(p) for p in bare) - 16) // max(1, -(-len(ids) // chunk_tokens)))
            chunks = [tokenizer.decode(ids[i:i + chunk_tokens]) for i in range(0, len(ids), chunk_tokens)]
            prompts = [chat_prompt(tokenizer, SUMMARY_INSTRUCTION, chunk) for chunk in chunks]
            summaries = []
            for start in range(0, len(prompts), state.max_batch):
                result = answerer.engine.generate(prompts[start:start + state.max_batch], max_new_tokens=budget)
                summaries += [t.strip() for t in result.texts]
            notes = "\n".join(summaries)
            record("summary", answerer.answer([chat_prompt(tokenizer, q, notes) for q in questions]),
                   time.perf_counter() - began)
        if "gradient_lora" in run:
            for steps, spent, factors in _fine_tune(dyn, ids, rank, state.modules, config.gradient_steps,
                                                    config.gradient_lr, seed=len(answers)):
                began = time.perf_counter()
                _copy_memory(state, factors, state.max_batch)
                record(f"gradient_lora@{steps}", answerer.answer(bare), spent + time.perf_counter() - began)
                gradient_times[steps] = gradient_times.get(steps, 0.0) + spent
            state.reset()

    methods = {name: {**score_answers(texts, answers[:len(texts)]),
                      "seconds_per_1k_tokens": 1000 * seconds[name] / max(context_tokens, 1)}
               for name, texts in predictions.items()}
    for steps, spent in gradient_times.items():
        methods[f"gradient_lora@{steps}"]["train_seconds_per_doc"] = spent / len(docs)
        methods[f"gradient_lora@{steps}"]["steps"] = steps
    for name, times in absorb_times.items():
        methods[name]["absorb_seconds_per_doc"] = sum(times) / len(docs)
        methods[name]["absorb_seconds_per_chunk"] = sum(times) / len(times)
        methods[name]["cost_chunk_prefills"] = sum(times) / len(times) / prefill_seconds
    result = {"methods": methods, "documents": len(docs), "questions": len(answers),
              "context_tokens": context_tokens, "evicted_tokens_per_doc": evicted / max(len(docs), 1),
              "examples": [{"question": q["question"], "answer": q["answer"],
                            **{name: texts[i] for name, texts in predictions.items()}}
                           for i, q in enumerate([q for d in docs for q in d["questions"]][:12])]}
    if unrelated:
        state.reset()
        without = score_answers(answerer.answer(local_prompts), local_answers)
        result["locality"] = {"questions": len(unrelated), "without_memory": without, "by_method": {}}
        for name, pairs in local_predictions.items():
            pairs.sort()
            scored = score_answers([text for _, text in pairs], [local_answers[i] for i, _ in pairs])
            drop = 100 * (without["exact_match"] - scored["exact_match"])
            result["locality"]["by_method"][name] = {"with_memory": scored, "exact_match_drop_points": drop}
            methods[name]["locality_drop_points"] = drop
    if "full_context" in methods and "no_context" in methods:
        top, bottom = methods["full_context"]["exact_match"], methods["no_context"]["exact_match"]
        result["gap_closed"] = {name: (m["exact_match"] - bottom) / (top - bottom) if top != bottom else None
                                for name, m in methods.items() if name not in ("full_context", "no_context")}
    if absorb_times and gradient_times:
        result["speed"] = {name: _speed_against_gradient(methods, name, gradient_times, sum(absorb_times[name]))
                           for name in absorb_times}
    return result


def _speed_against_gradient(methods: dict, name: str, gradient_times: dict, absorb_seconds: float) -> dict:
    """How long ``gradient_lora`` trained to reach this writer's exact match, over the writer's absorb time."""
    target = methods[name]["exact_match"]
    floor = methods.get("no_context", {}).get("exact_match")
    reached = [s for s in sorted(gradient_times) if methods[f"gradient_lora@{s}"]["exact_match"] >= target]
    note = None
    if floor is not None and target <= floor:
        reached, note = [], f"{name} is not above no_context: no accuracy to match, no speed comparison"
    elif not reached:
        note = f"gradient_lora never reached {name}'s exact match within {max(gradient_times)} steps"
    return {"absorb_seconds": absorb_seconds,
            "gradient_steps_to_match": reached[0] if reached else None,
            "gradient_seconds_to_match": gradient_times[reached[0]] if reached else None,
            "ratio": gradient_times[reached[0]] / absorb_seconds if reached else None, "note": note}


def _eval_locality(items, memory_docs, dyn, runs, answerer, tokenizer, memory_weight: float) -> dict:
    """Unrelated self-contained questions, with some other document's memory applied vs none (no ``data``)."""
    state = dyn.state
    prompts = [chat_prompt(tokenizer, item["questions"][0]["question"], item["context"]) for item in items]
    answers = [item["questions"][0]["answer"] for item in items]
    state.reset()
    without = score_answers(answerer.answer(prompts), answers)
    by_method = {}
    for name, absorber in runs.items():
        with_memory = []
        for index, prompt in enumerate(prompts):
            state.reset()
            doc = memory_docs[index % len(memory_docs)]
            absorber.absorb_text(0, tokenizer(doc["context"], add_special_tokens=False)["input_ids"])
            state.set_memory_weight(0, memory_weight)
            with_memory += answerer.answer([prompt])
        scored = score_answers(with_memory, answers)
        by_method[name] = {"with_memory": scored,
                           "exact_match_drop_points": 100 * (without["exact_match"] - scored["exact_match"])}
    state.reset()
    return {"questions": len(items), "without_memory": without, "by_method": by_method}


def _eval_needle(config, docs, dyn, absorber, tokenizer, chat_prompt) -> dict:
    """Pass-key retrieval: full context, the window truncated (sink + last tokens), and dynalora streaming
    the document through the window (what leaves it is absorbed)."""
    from dynalora.runtime import Engine

    state = dyn.state
    plain = Engine(dyn, tokenizer)
    streaming = Engine(dyn, tokenizer, absorber=absorber)
    rows = {}
    for doc in tqdm(docs, desc="needle"):
        question, answer = doc["questions"][0]["question"], doc["questions"][0]["answer"]
        prompt = chat_prompt(tokenizer, question, doc["context"])
        sink, keep = config.sink_tokens, config.window - config.sink_tokens
        truncated = prompt if len(prompt) <= config.window else prompt[:sink] + prompt[-keep:]
        outputs = {}
        for name, engine, ids in (("full_context", plain, prompt), ("truncated", plain, truncated),
                                  ("dynalora", streaming, prompt)):
            state.reset()
            state.set_memory_weight(0, config.memory_weight)  # kept through the absorbs that follow
            outputs[name] = engine.generate([ids], max_new_tokens=12).texts[0]
        for name, text in outputs.items():
            hit = score_answers([text], [answer])["exact_match"]
            rows.setdefault(name, {}).setdefault(str(doc["multiple"]), []).append(hit)
    state.reset()
    return {name: {multiple: sum(hits) / len(hits) for multiple, hits in by_multiple.items()}
            for name, by_multiple in rows.items()}


def format_absorb_table(result: dict) -> str:
    lines = []
    if "methods" in result:
        lines += [f"{result['documents']} documents, {result['questions']} questions, window {result['window']}, "
                  f"memory rank {result['memory_rank']} ({result['adapter_bytes'] / 1024:.0f} KiB), "
                  f"one chunk prefill {1000 * result.get('chunk_prefill_seconds', 0):.0f} ms",
                  f"{'method':<22}{'exact':>8}{'F1':>8}{'s/1k tok':>10}{'gap closed':>12}{'prefills':>10}"
                  f"{'locality':>10}"]
        for name, m in result["methods"].items():
            gap = result.get("gap_closed", {}).get(name)
            cost, drop = m.get("cost_chunk_prefills"), m.get("locality_drop_points")
            lines.append(f"{name:<22}{m['exact_match']:>8.3f}{m['f1']:>8.3f}{m['seconds_per_1k_tokens']:>10.2f}"
                         f"{'' if gap is None else f'{gap:.2f}':>12}{'' if cost is None else f'{cost:.1f}':>10}"
                         f"{'' if drop is None else f'{-drop:+.1f}':>10}")
        for name, speed in result.get("speed", {}).items():
            lines.append(f"speed {name}: {speed}")
    if "locality" in result:
        loc = result["locality"]
        with_memory = ", ".join(f"{name} {m['with_memory']['exact_match']:.3f} (-{m['exact_match_drop_points']:.1f})"
                                for name, m in loc["by_method"].items())
        lines.append(f"locality ({loc['questions']} unrelated questions): exact "
                     f"{loc['without_memory']['exact_match']:.3f} without memory; with: {with_memory}")
    if "sequence" in result:
        seq = result["sequence"]
        lines.append(f"sequence of {seq['documents']} documents in one memory ({seq['method']}), exact match by age: " +
                     ", ".join(f"{age}: {m['exact_match']:.2f} (full {m['full_context']:.2f})"
                               for age, m in seq["by_age"].items()))
        lines.append(f"  absorb s/chunk first {seq['absorb_seconds_per_chunk_by_document'][0]:.2f}, last "
                     f"{seq['absorb_seconds_per_chunk_by_document'][-1]:.2f}; state bytes first "
                     f"{seq['state_bytes_by_document'][0]}, last {seq['state_bytes_by_document'][-1]}")
    if "needle" in result:
        lines.append("needle retrieval by length (× window): " + "; ".join(
            f"{name} " + ", ".join(f"{k}×={v:.1f}" for k, v in by.items()) for name, by in result["needle"].items()))
    return "\n".join(lines)
