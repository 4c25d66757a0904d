"""``dynalora train absorb``: train the compressor by context distillation.

An example is a document (cut into chunks of ``chunk_tokens``), a question and its short answer.
The *teacher* is the frozen base model with the document in its context; the *student* is the same
model with only the question in context and the memory LoRA the compressor writes from the chunks
(each chunk compressed alone, the chunks' factors stacked along the rank: the memory before its rank
cut). The loss, on the answer tokens only: cross-entropy to the teacher's top-``k`` distribution
(cached once) + ``gold_weight`` × the gold answer's NLL. A ``locality_fraction`` of examples put an
*unrelated* document in memory and a self-contained question in context, with the teacher seeing
the same window: the memory must then change nothing. With ``locality_weight`` > 0 those examples are
scored by the KL from the model without memory to the model with it, over the answer and the
``locality_span`` window tokens before it (instead of by the answer alone, which a memory that
pushes every answer towards one format does not hurt).

Data: JSONL lines ``{"context", "questions": [{"question", "answer"}], "kind"}`` from
``dynalora data absorb``. Resumable (every ``run.checkpoint_every`` steps), progress bar,
loss plot; the teacher cache is kept in ``out_dir`` and reused when the data and settings match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dynalora.data.absorb import read_docs
from dynalora.data.batches import config_record
from dynalora.runtime.chat import answer_log_probs, answer_tokens, chat_prompt, end_of_turn_id
from dynalora.runtime.padding import pad_rows
from dynalora.shipped import trained
from dynalora.training import RunConfig, TrainingRun

logger = logging.getLogger(__name__)

COMPRESSORS = ("gradient", "perceiver")


@dataclass
class AbsorbTrainConfig:
    data: list[Path]
    """Training documents (JSONL from ``dynalora data absorb --split train``)."""
    validation: Path | None = None
    """Validation documents (``--split validation``): loss and answer accuracy with/without memory."""
    out_dir: Path = field(default_factory=lambda: trained("absorb"))
    """Where the compressor is written."""
    model: str | None = None
    """Base model: HF id or folder (None: the embedded SmolLM2-135M-Instruct)."""
    target_modules: list[str] = field(default_factory=lambda: ["o_proj", "down_proj"])
    """Module kinds the memory LoRA writes."""
    compressor: str = "gradient"
    """``gradient`` (:class:`~dynalora.hyper.gradient_compressor.GradientCompressor`: a learned transform of
    the chunk's own next-token gradient) or ``perceiver`` (:class:`~dynalora.hyper.compressor.Compressor`:
    learned queries over the chunk's hidden states)."""
    rank: int = 16
    """The memory's rank (the perceiver's chunks have it too; the gradient compressor's have one per token)."""
    width: int = 256
    """The perceiver's query width."""
    bottleneck: int = 64
    """The gradient compressor's MLP width."""
    init_step: float = 0.015
    """The gradient compressor's step size × √(chunk tokens) before training."""
    chunk_tokens: int = 128
    """Tokens per absorbed chunk."""
    max_chunks: int = 4
    """Documents longer than this many chunks are skipped."""
    steps: int = 600
    """Optimizer steps."""
    batch_size: int = 8
    """Documents per step."""
    lr: float = 1e-3
    """Adam learning rate."""
    warmup_steps: int = 30
    """Linear learning-rate warm-up steps."""
    teacher_top_k: int = 32
    """Teacher probabilities kept per position (the rest is one bucket)."""
    gold_weight: float = 0.5
    """Weight of the gold answers' NLL."""
    distill_weight: float = 1.0
    """Weight of the teacher distribution; 0 trains on the gold answers alone and skips the teacher pass."""
    b_scale: float = 1.0
    """Fixed scale on the generated ``B`` (CompressorConfig.scale): small values keep early updates gentle."""
    locality_fraction: float = 0.15
    """Share of examples with an unrelated document in memory (the memory must change nothing)."""
    locality_weight: float = 0.0
    """Weight of the locality KL (memory vs none on the locality examples); 0 scores them by the answer alone."""
    locality_span: int = 32
    """Window tokens before the answer that the locality KL also covers."""
    time_limit_minutes: float | None = None
    """Stop (and save) when training has run this long; the learning-rate schedule follows whichever of
    steps and time runs out first, so a cut run still ends annealed."""
    teacher_batch_size: int = 16
    """Rows per teacher forward."""
    validation_examples: int = 96
    """Validation examples scored at the end."""
    seed: int = 0
    """Random seed."""
    threads: int = 2
    """CPU threads torch uses."""
    run: RunConfig = field(default_factory=lambda: RunConfig(checkpoint_every=50))
    """Device, mixed precision (``bf16`` on a GPU), gradient accumulation, resumable checkpoints (accelerate)."""

    def __post_init__(self):
        if self.rank < 1 or self.chunk_tokens < 8 or self.max_chunks < 1:
            raise ValueError("AbsorbTrainConfig: rank ≥ 1, chunk_tokens ≥ 8, max_chunks ≥ 1")
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"AbsorbTrainConfig.compressor={self.compressor!r}: choose one of {COMPRESSORS}")
        if not 0 <= self.locality_fraction < 1:
            raise ValueError(f"AbsorbTrainConfig.locality_fraction={self.locality_fraction}: must be in [0, 1)")
        if self.locality_weight < 0 or self.locality_span < 0:
            raise ValueError(f"AbsorbTrainConfig: locality_weight={self.locality_weight} and "
                             f"locality_span={self.locality_span} must be ≥ 0")


@dataclass
class AbsorbExample:
    chunks: list[list[int]]
    """The document in memory, as chunks of token ids."""
    student: list[int]
    """What the student has in context: the chat prompt, then the answer tokens."""
    teacher: list[int]
    """The teacher's context (document + question prompt), then the same answer tokens."""
    answer_length: int
    """The last ``answer_length`` tokens of both sequences are the answer (scored)."""
    locality: bool = False
    document: int = 0
    """Index of the document the question is about (batches group a document's questions)."""


def chunk_ids(tokenizer, text: str, chunk_tokens: int) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [ids[i:i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)]


def build_examples(tokenizer, docs: list[dict], config: AbsorbTrainConfig, seed: int) -> list[AbsorbExample]:
    rng = random.Random(seed)
    chunked = [chunk_ids(tokenizer, d["context"], config.chunk_tokens) for d in docs]
    usable = [i for i, c in enumerate(chunked) if 0 < len(c) <= config.max_chunks]
    examples, end_id = [], end_of_turn_id(tokenizer)
    for i in usable:
        for qa in docs[i]["questions"]:
            answer = answer_tokens(tokenizer, qa["answer"], end_id)
            if rng.random() < config.locality_fraction and len(usable) > 1:
                # an unrelated document in memory; the question's own document in the window
                other = i
                while other == i:
                    other = rng.choice(usable)
                window = chat_prompt(tokenizer, qa["question"], docs[i]["context"]) + answer
                examples.append(AbsorbExample(chunked[other], window, window, len(answer), locality=True, document=i))
            else:
                examples.append(AbsorbExample(chunked[i], chat_prompt(tokenizer, qa["question"]) + answer,
                                              chat_prompt(tokenizer, qa["question"], docs[i]["context"]) + answer,
                                              len(answer), document=i))
    rng.shuffle(examples)
    return examples


@torch.no_grad()
def teacher_targets(model, examples: list[AbsorbExample], top_k: int, pad_id: int, device, batch_size: int = 8,
                    desc: str = "teacher") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per example, the teacher's top-``k`` (log-probs ``(A, k)``, token ids ``(A, k)``) at its answer positions."""
    out = []
    for start in tqdm(range(0, len(examples), batch_size), desc=desc):
        batch = examples[start:start + batch_size]
        log_probs = answer_log_probs(model, [e.teacher for e in batch], [e.answer_length for e in batch], pad_id,
                                     device)
        values, indices = log_probs.topk(top_k, dim=-1)
        for part_v, part_i in zip(values.split([e.answer_length for e in batch]),
                                  indices.split([e.answer_length for e in batch])):
            out.append((part_v.half().cpu(), part_i.int().cpu()))
    return out


def memory_factors(dyn, compressor, examples: list[AbsorbExample], pad_id: int, device) -> dict:
    """Compress every distinct chunk of the batch once (the base model reads it; no gradient into its weights)
    and stack each example's chunks along the rank: ``{module: (A_t (N, in, R), B_t (N, R, out))}``,
    ``R = max_chunks·r`` (``r``: the compressor's rank per chunk)."""
    position: dict[tuple, int] = {}
    for e in examples:
        for chunk in e.chunks:
            position.setdefault(tuple(chunk), len(position))
    ids, mask = pad_rows([list(chunk) for chunk in position], pad_id, device)
    factors = compressor.read(dyn, ids, mask)
    most = max(len(e.chunks) for e in examples)
    # distinct-chunk index of every (example, slot), or C (an all-zero row) where an example has fewer chunks
    index = torch.full((len(examples), most), len(position), dtype=torch.long)
    for i, e in enumerate(examples):
        index[i, :len(e.chunks)] = torch.tensor([position[tuple(chunk)] for chunk in e.chunks])
    index = index.to(device)
    out = {}
    for module, (lora_a, lora_b) in factors.items():  # (C, r, in), (C, out, r)
        rank = lora_a.shape[1]
        lora_a = torch.cat([lora_a, lora_a.new_zeros(1, *lora_a.shape[1:])])[index]  # (N, most, r, in)
        lora_b = torch.cat([lora_b, lora_b.new_zeros(1, *lora_b.shape[1:])])[index]  # (N, most, out, r)
        a_t = lora_a.reshape(len(examples), most * rank, -1).transpose(1, 2)  # (N, in, most·r)
        b_t = lora_b.permute(0, 1, 3, 2).reshape(len(examples), most * rank, -1)  # (N, most·r, out)
        out[module] = (a_t, b_t)
    return out


def _rows(factors: dict, rows: list[int]) -> dict:
    """The memory factors of some batch rows only."""
    index = torch.tensor(rows, device=next(iter(factors.values()))[0].device)
    return {module: (a_t[index], b_t[index]) for module, (a_t, b_t) in factors.items()}


def locality_kl(dyn, examples: list[AbsorbExample], factors: dict, pad_id: int, device, span: int) -> torch.Tensor:
    """Mean KL(no memory ‖ memory) over each locality example's answer and the ``span`` tokens before it: zero
    exactly when an unrelated memory leaves the model's predictions there unchanged."""
    lengths = [min(len(e.student) - 1, e.answer_length + span) for e in examples]
    with torch.no_grad():
        reference = answer_log_probs(dyn.model, [e.student for e in examples], lengths, pad_id, device)
    with dyn.state.functional(None, factors):
        with_memory = answer_log_probs(dyn.model, [e.student for e in examples], lengths, pad_id, device)
    return F.kl_div(with_memory, reference, log_target=True, reduction="batchmean")


def distillation_loss(dyn, compressor, examples, targets, pad_id, device, gold_weight: float,
                      use_memory: bool = True, distill_weight: float = 1.0, locality_weight: float = 0.0,
                      locality_span: int = 32) -> tuple[torch.Tensor, dict]:
    """Loss of one batch and its parts; ``use_memory=False`` scores the student with no memory (baseline).
    With ``locality_weight`` > 0 the locality examples are scored by :func:`locality_kl` instead."""
    row_factors = memory_factors(dyn, compressor, examples, pad_id, device) if use_memory else {}
    apart = [i for i, e in enumerate(examples) if e.locality] if locality_weight and use_memory else []
    kept = [i for i in range(len(examples)) if i not in apart]
    kl = torch.zeros((), device=device)
    if apart:
        kl = locality_kl(dyn, [examples[i] for i in apart], _rows(row_factors, apart), pad_id, device, locality_span)
    if len(kept) < len(examples):
        examples, targets = [examples[i] for i in kept], [targets[i] for i in kept]
        row_factors = _rows(row_factors, kept) if kept else {}
    if not examples:  # a batch of locality examples only
        parts = {"distill": 0.0, "gold_nll": 0.0, "answer_acc": 0.0, "locality_kl": float(kl.detach())}
        return locality_weight * kl, parts
    with dyn.state.functional(None, row_factors):
        log_probs = answer_log_probs(dyn.model, [e.student for e in examples], [e.answer_length for e in examples],
                                     pad_id, device)
    distill = log_probs.new_zeros(())
    if distill_weight:
        teacher_values = torch.cat([t[0] for t in targets]).to(device).float()  # (A, k)
        teacher_ids = torch.cat([t[1] for t in targets]).to(device).long()  # (A, k)
        distill = -(torch.softmax(teacher_values, -1) * log_probs.gather(1, teacher_ids)).sum(-1).mean()
    gold = torch.tensor([t for e in examples for t in e.student[-e.answer_length:]], device=device)
    gold_nll = F.nll_loss(log_probs, gold)
    # all answer tokens right, teacher-forced: a cheap accuracy proxy
    correct = (log_probs.argmax(-1) == gold).split([e.answer_length for e in examples])
    accuracy = sum(bool(c.all()) for c in correct) / len(examples)
    loss = distill_weight * distill + gold_weight * gold_nll + locality_weight * kl
    return loss, {"distill": float(distill.detach()), "gold_nll": float(gold_nll.detach()), "answer_acc": accuracy,
                  "locality_kl": float(kl.detach())}


def document_batches(examples: list[AbsorbExample], batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches of example indices: epochs of shuffled documents, each document's questions kept
    together, so a batch reads few distinct chunks (the base model's backward over them dominates a step)."""
    by_document: dict[int, list[int]] = {}
    for index, example in enumerate(examples):
        by_document.setdefault(example.document, []).append(index)
    order, batches = random.Random(seed), []
    while len(batches) < steps:
        groups = list(by_document.values())
        order.shuffle(groups)
        flat = [index for group in groups for index in order.sample(group, len(group))]
        batches += [flat[i:i + batch_size] for i in range(0, len(flat) - batch_size + 1, batch_size)] or [flat]
    return batches[:steps]


def _lr_at(step: int, seconds: float, config: AbsorbTrainConfig) -> float:
    """The library's schedule; with a time limit, progress is whichever of steps and time runs out first."""
    from dynalora.lr_schedule import cosine_lr

    progress = None
    if config.time_limit_minutes and step >= config.warmup_steps:
        steps_progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        progress = max(steps_progress, seconds / (60 * config.time_limit_minutes))
    return cosine_lr(step, config.steps, config.warmup_steps, config.lr, progress)


def _cache_key(config: AbsorbTrainConfig, docs_bytes: bytes, name: str) -> str:
    keyed = {k: str(getattr(config, k)) for k in ("model", "chunk_tokens", "max_chunks", "teacher_top_k",
                                                   "locality_fraction", "seed")}
    return hashlib.sha256(docs_bytes + json.dumps(keyed, sort_keys=True).encode() + name.encode()).hexdigest()[:16]


def cached_teacher(path: Path, key: str, compute) -> list:
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("key") == key:
            return saved["targets"]
    targets = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "targets": targets}, path)
    return targets


@torch.no_grad()
def evaluate(dyn, compressor, examples, targets, pad_id, device, config) -> dict:
    """Validation loss and answer accuracy with the right memory, with none, and with the memory of another
    document (``wrong_memory``: what the memory gives beyond answer-format priors). Examples are taken in
    document order, so a batch reads few distinct chunks."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].document)
    examples, targets = [examples[i] for i in order], [targets[i] for i in order]
    documents = list(dict.fromkeys(e.document for e in examples))
    first: dict[int, AbsorbExample] = {}
    for e in examples:
        first.setdefault(e.document, e)
    other = {d: first[documents[(k + 1) % len(documents)]].chunks for k, d in enumerate(documents)}
    wrong = [AbsorbExample(other[e.document], e.student, e.teacher, e.answer_length, e.locality, e.document)
             for e in examples]
    result = {}
    for name, rows, use_memory in (("memory", examples, True), ("no_memory", examples, False),
                                   ("wrong_memory", wrong, True)):
        parts = []
        for start in range(0, len(rows), config.batch_size):
            batch = rows[start:start + config.batch_size]
            _, part = distillation_loss(dyn, compressor, batch, targets[start:start + config.batch_size], pad_id,
                                        device, config.gold_weight, use_memory, config.distill_weight,
                                        config.locality_weight, config.locality_span)
            parts.append((part, len(batch)))
        total = sum(n for _, n in parts)
        result[name] = {k: sum(p[k] * n for p, n in parts) / total for k in parts[0][0]}
    return result


def new_compressor(config: AbsorbTrainConfig, hidden_size: int, module_shapes: dict[str, list[int]]) -> torch.nn.Module:
    if config.compressor == "gradient":
        from dynalora.hyper.gradient_compressor import GradientCompressor, GradientCompressorConfig

        return GradientCompressor(GradientCompressorConfig(module_shapes=module_shapes, rank=config.rank,
                                                           bottleneck=config.bottleneck, init_step=config.init_step))
    from dynalora.hyper.compressor import Compressor, CompressorConfig

    return Compressor(CompressorConfig(hidden_size=hidden_size, module_shapes=module_shapes, rank=config.rank,
                                       width=config.width, scale=config.b_scale))


def train_absorb(config: AbsorbTrainConfig) -> dict:
    from dynalora.lora import DynamicLoraModel, InjectConfig, LoraBank, StateConfig, module_shapes_of
    from dynalora.plot import plot_losses

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    run = TrainingRun(config.run, config.out_dir)
    device = run.device
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    base = run.load_base(config.model)
    model = base.model
    tokenizer = base.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    shapes = module_shapes_of(model)
    dyn = DynamicLoraModel.attach(model, LoraBank(shapes), InjectConfig(
        target_modules=config.target_modules,
        state=StateConfig(max_batch=1, generated_rank=0, memory_rank=config.rank)))
    compressor = new_compressor(config, model.config.hidden_size,
                                {m: list(shapes[m]) for m in dyn.state.modules}).to(device)

    started = time.perf_counter()
    paths = config.data if isinstance(config.data, list) else [config.data]
    docs = read_docs(paths)
    train = build_examples(tokenizer, docs, config, config.seed)
    if not train:
        raise ValueError(f"{paths}: no usable documents (each needs ≤ {config.max_chunks} chunks of "
                         f"{config.chunk_tokens} tokens)")
    docs_bytes = b"".join(Path(p).read_bytes() for p in paths)
    no_teacher = not config.distill_weight
    train_targets = [None] * len(train) if no_teacher else cached_teacher(
        config.out_dir / "teacher_train.pt", _cache_key(config, docs_bytes, "train"),
        lambda: teacher_targets(model, train, config.teacher_top_k, pad_id, device,
                                config.teacher_batch_size, desc="teacher (train)"))
    validation, validation_targets = [], []
    if config.validation:
        validation = build_examples(tokenizer, read_docs(config.validation), config,
                                    config.seed + 1)[:config.validation_examples]
        validation_targets = [None] * len(validation) if no_teacher else cached_teacher(
            config.out_dir / "teacher_validation.pt",
            _cache_key(config, Path(config.validation).read_bytes(), f"validation{config.validation_examples}"),
            lambda: teacher_targets(model, validation, config.teacher_top_k, pad_id, device,
                                   config.teacher_batch_size, desc="teacher (val)"))
    teacher_seconds = time.perf_counter() - started

    optimizer = run.accelerator.prepare(torch.optim.AdamW(compressor.parameters(), lr=config.lr, weight_decay=0.01))
    run.accelerator.register_for_checkpointing(compressor)  # called through .read, not a prepared forward
    start, history, extra = run.resume()  # the batches are drawn up front: no generator to keep
    seconds, untrained = extra.get("seconds", 0.0), extra.get("untrained", {})
    if start:
        logger.info(f"resuming train absorb from step {start}")
    batches = document_batches(train, config.batch_size, config.steps, config.seed)
    if validation and start == 0:  # what the compressor writes before training (the gradient one: one SGD step)
        compressor.eval()
        untrained = evaluate(dyn, compressor, validation, validation_targets, pad_id, device, config)
        logger.info("validation before training: " + ", ".join(f"{k} gold NLL {v['gold_nll']:.3f}"
                                                        for k, v in untrained.items()))
    compressor.train()
    progress = tqdm(range(start, config.steps), desc="train absorb", initial=start, total=config.steps,
                    disable=not run.is_main)
    for step in progress:
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, seconds, config)
        rows = [batches[step][i] for i in run.shard(torch.arange(len(batches[step]))).tolist()]
        with run.accelerator.accumulate(), run.accelerator.autocast():
            loss, parts = distillation_loss(dyn, compressor, [train[i] for i in rows], [train_targets[i] for i in rows],
                                            pad_id, device, config.gold_weight, distill_weight=config.distill_weight,
                                            locality_weight=config.locality_weight,
                                            locality_span=config.locality_span)
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"train absorb: non-finite loss at step {step}: {parts}")
            run.update(loss, optimizer, compressor.parameters(), max_norm=1.0, average=True)  # called via .read
        history.append({key: run.mean(torch.tensor(float(value), device=device)) for key, value in parts.items()})
        seconds += run.mean(torch.tensor(time.perf_counter() - began, device=device))  # alike on every process
        progress.set_postfix(distill=f"{parts['distill']:.3f}", gold=f"{parts['gold_nll']:.3f}",
                             acc=f"{parts['answer_acc']:.2f}")
        if config.time_limit_minutes and seconds > 60 * config.time_limit_minutes:
            logger.info(f"train absorb: time limit of {config.time_limit_minutes} min reached after {step + 1} steps")
            break
        run.end_step(step + 1, history, extra={"seconds": seconds, "untrained": untrained})
    run.finish()
    compressor.eval()
    scores = evaluate(dyn, compressor, validation, validation_targets, pad_id, device, config) if validation else {}
    dyn.detach()
    config.out_dir.mkdir(parents=True, exist_ok=True)
    if run.is_main:
        compressor.cpu().save_pretrained(config.out_dir)
    if history and run.is_main:  # steps=0 saves the untrained compressor (the gradient one: one SGD step), a baseline
        plot_losses([h["gold_nll"] for h in history], config.out_dir / "loss.png",
                    "absorb compressor: gold answer NLL with the memory LoRA")
    metadata = {"config": config_record(config), "train_seconds": round(seconds, 1),
                "teacher_seconds": round(teacher_seconds, 1), "device": str(device),
                "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                "steps_done": len(history), "train_examples": len(train),
                "parameters": sum(p.numel() for p in compressor.parameters()),
                "final": {k: sum(h[k] for h in history[-20:]) / len(history[-20:]) for k in history[-1]}
                if history else {},
                "validation": scores, "validation_untrained": untrained, "validation_examples": len(validation),
                "history": history,
                "split": {"train": [str(p) for p in paths], "validation": str(config.validation)},
                "processes": run.accelerator.num_processes, "resumed_from_step": start}
    if run.is_main:
        (config.out_dir / "train_absorb.json").write_text(json.dumps(metadata, indent=2))
    return metadata
