"""``dynalora train absorb-steps``: meta-learn the ``distill`` writer's step sizes and the start of its factors.

The writer (:class:`~dynalora.runtime.memory_writers.DistillWriter`) learns a chunk from self-made probes in
a few Adam steps. Which step sizes make *few* steps enough — per step, per module, for ``A`` and ``B`` —
and where the fresh ``A`` factors should start, are learned here on train-seed documents, against what the
writer never sees at test time: the documents' real questions. For each document the writer runs its
steps as it would in the engine; after steps ``score_steps`` (e.g. 1, 2, 4, 8) the gold answers' NLL
(the student, without the document, with the factors) is taken and its gradient with respect to the
factors, ``g_k``. First-order meta-gradients (the update directions ``d_t`` held fixed, as in first-order
MAML and hypergradient descent):

* step size of step ``t``, module ``m``, factor ``A``/``B``: ``∂L/∂lr = −Σ_{k>t} g_k · d_t``;
* start of ``A``: ``Σ_k g_k`` (``B`` starts at zero, so the memory is off until the first step).

Scoring several ``k`` makes a schedule that is good whenever it is cut short (``eval absorb --steps``).
One pass over the documents; a resumable state every ``run.checkpoint_every`` documents (each document is tens
of seconds on a CPU); progress bar; the record keeps the gold NLL per document at each scored step.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from dynalora.plot import plot_step_sizes
from dynalora.runtime.chat import answer_tokens, chat_prompt, end_of_turn_id
from dynalora.runtime.distill_steps import StepSizes
from dynalora.runtime.memory_writers import DistillConfig, answer_positions, ScoredTexts
from dynalora.runtime.padding import pad_rows
from dynalora.data.batches import config_record
from dynalora.shipped import trained
from dynalora.training import RunConfig, TrainingRun


@dataclass
class AbsorbStepsTrainConfig:
    data: Path
    """Training documents (``dynalora data absorb --kind facts --split train``)."""
    out_dir: Path = field(default_factory=lambda: trained("absorb_steps"))
    """Where the step sizes are written."""
    model: str | None = None
    """Base model: HF id or folder (None: the embedded SmolLM2-135M-Instruct)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """The writer whose step sizes are learned (its ``steps`` is the schedule's length, ``lr`` its start)."""
    score_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Steps after which the gold answers are scored (each ≤ ``distill.steps``)."""
    documents: int | None = None
    """Training documents used (None: all), in a seeded random order."""
    meta_lr: float = 0.1
    """Adam step size on the log step sizes."""
    start_lr: float = 1e-3
    """Adam step size on the ``A`` starts (0: keep the Gaussian start; none is saved)."""
    locality_weight: float = 1.0
    """Weight of the locality term: the gold NLL of unrelated self-contained questions (their facts in the
    prompt, train-split locality items) with the document's memory on — what the memory must not harm."""
    locality_questions: int = 6
    """Unrelated questions per document (different ones for each document)."""
    window: int = 512
    """The engine's window the documents are written for."""
    seed: int = 0
    """Random seed."""
    threads: int = 2
    """CPU threads torch uses."""
    run: RunConfig = field(default_factory=lambda: RunConfig(checkpoint_every=8))
    """Device, mixed precision, resumable checkpoints every this many documents (accelerate). One document per
    meta-step: under ``accelerate launch`` every process runs the same documents."""

    def __post_init__(self):
        if not self.score_steps or min(self.score_steps) < 1 or max(self.score_steps) > self.distill.steps:
            raise ValueError(f"AbsorbStepsTrainConfig.score_steps={self.score_steps}: each in 1..distill.steps="
                             f"{self.distill.steps}")
        if self.meta_lr <= 0 or self.start_lr < 0:
            raise ValueError(f"AbsorbStepsTrainConfig: meta_lr > 0 and start_lr ≥ 0 (got {self.meta_lr}, "
                             f"{self.start_lr})")
        if self.distill.step_sizes is not None:
            raise ValueError("AbsorbStepsTrainConfig.distill.step_sizes: learning starts from the constant lr")


def question_texts(writer, dyn, tokenizer, questions: list[dict], device,
                   contexts: list[str] | None = None) -> ScoredTexts:
    """The gold answers as the student scores them: the chat prompt (without the document, or with
    ``contexts[i]`` before question ``i``), then the answer."""
    end = end_of_turn_id(tokenizer)
    answers = [answer_tokens(tokenizer, q["answer"], end) for q in questions]
    contexts = contexts or [None] * len(questions)
    rows = [chat_prompt(tokenizer, q["question"], c) + a for q, a, c in zip(questions, answers, contexts)]
    ids = pad_rows(rows, writer.pad_id, device)[0]  # (N, L)
    return ScoredTexts(writer.lower_inputs(dyn, ids, {}), answer_positions(ids, rows, [len(a) for a in answers]),
                  labels=torch.tensor([t for a in answers for t in a], device=device))


class MetaGradients:
    """The writer's ``after_step`` hook for one document: at each scored step, the gold NLL (plus
    ``locality_weight`` × the gold NLL of ``unrelated`` self-contained questions, the memory on) and its
    gradient with respect to the factors, folded into first-order meta-gradients. After the document:
    :attr:`lr_grad` ``(steps, M, 2)`` (∂L/∂lr), :attr:`start_grad` ``{module: (r, in)}``, :attr:`losses`,
    :attr:`locality_losses`."""

    def __init__(self, writer, dyn, questions: ScoredTexts, score_steps: list[int], steps: int,
                 unrelated: ScoredTexts | None = None, locality_weight: float = 0.0):
        self.writer, self.dyn, self.questions, self.score_steps = writer, dyn, questions, set(score_steps)
        self.unrelated, self.locality_weight = unrelated, locality_weight
        self.locality_losses: dict[int, float] = {}
        self.directions: list[list[torch.Tensor]] = []
        self.lr_grad = torch.zeros(steps, len(writer.modules_list), 2)
        self.start_grad: dict[str, torch.Tensor] = {}
        self.losses: dict[int, float] = {}

    def __call__(self, step: int, params: dict, directions: list[torch.Tensor]) -> None:
        self.directions.append(directions)
        if step + 1 not in self.score_steps:
            return
        tensors = [t for m in self.writer.modules_list for t in params[m]]  # A, B of each module in order
        loss = self.writer.loss(self.dyn, self.questions, {}, params)
        self.losses[step + 1] = float(loss.detach())
        if self.unrelated is not None and self.locality_weight > 0:
            locality = self.writer.loss(self.dyn, self.unrelated, {}, params)
            self.locality_losses[step + 1] = float(locality.detach())
            loss = loss + self.locality_weight * locality
        grads = torch.autograd.grad(loss, tensors)
        for t, directions_t in enumerate(self.directions):
            dots = torch.stack([-(g * d).sum() for g, d in zip(grads, directions_t)])  # (M·2,) A, B per module
            self.lr_grad[t] += dots.reshape(-1, 2)
        for m, g in zip(self.writer.modules_list, grads[0::2]):
            self.start_grad[m] = self.start_grad.get(m, 0) + g


def train_absorb_steps(config: AbsorbStepsTrainConfig) -> dict:
    from dynalora.data.absorb import read_absorb_docs, unrelated_questions
    from dynalora.system.assemble import EngineSpec, System

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    docs = read_absorb_docs(config.data)
    random.Random(config.seed).shuffle(docs)
    docs = docs[:config.documents]
    run = TrainingRun(config.run, config.out_dir)
    system = System.from_checkpoints(EngineSpec(
        model=config.model, device=str(run.device), dtype=config.run.dtype, hypernetwork="none", triggers=[],
        window=config.window, absorber="distill", distill=config.distill))
    absorber, tokenizer = system.absorber, system.base.tokenizer
    writer, dyn = absorber.writer, absorber.dyn
    steps, device = config.distill.steps, dyn.state.device
    sizes = StepSizes.constant(writer.modules_list, steps, config.distill.lr)
    log_lr = sizes.log_lr.requires_grad_()
    groups = [{"params": [log_lr], "lr": config.meta_lr}]
    if config.start_lr > 0:
        sizes.start = {m: a.detach().clone().requires_grad_() for m, (a, _) in
                       writer.start_factors(dyn, [], device).items()}
        groups.append({"params": list(sizes.start.values()), "lr": config.start_lr})
    writer.step_sizes = sizes
    meta_optimizer = run.accelerator.prepare(torch.optim.Adam(groups))
    learned = [log_lr, *sizes.start.values()]
    start, _, extra = run.resume()
    record = extra.get("record") or {"config": config_record(config), "modules": writer.modules_list,
                                     "documents": [], "seconds": 0.0}
    if extra:  # the step sizes and starts are plain tensors: the recipe saves them itself
        with torch.no_grad():
            for tensor, saved in zip(learned, extra["tensors"]):
                tensor.copy_(saved)
    started = time.time() - record["seconds"]
    for index in tqdm(range(start, len(docs)), desc="meta-learning step sizes", initial=start, total=len(docs),
                      disable=not run.is_main):
        doc = docs[index]
        chunk = tokenizer(doc["context"], add_special_tokens=False)["input_ids"][:absorber.config.chunk_tokens]
        questions = question_texts(writer, dyn, tokenizer, doc["questions"], device)
        items = unrelated_questions(config.locality_questions, seed=index * config.locality_questions,
                                    split="train") if config.locality_weight > 0 else []
        unrelated = question_texts(writer, dyn, tokenizer, [i["questions"][0] for i in items], device,
                                   [i["context"] for i in items]) if items else None
        with torch.no_grad():
            before = float(writer.loss(dyn, questions, {}, {}))
            locality_before = float(writer.loss(dyn, unrelated, {}, {})) if unrelated is not None else None
        meta = MetaGradients(writer, dyn, questions, config.score_steps, steps, unrelated, config.locality_weight)
        with run.accelerator.autocast():
            writer.fit(dyn, chunk, after_step=meta)
        meta_optimizer.zero_grad(set_to_none=True)
        log_lr.grad = meta.lr_grad * log_lr.detach().exp()  # ∂L/∂log lr = lr · ∂L/∂lr
        for m, a in sizes.start.items():
            a.grad = meta.start_grad[m]
        meta_optimizer.step()
        record["documents"].append({"seed": doc.get("seed"), "nll_before": round(before, 4),
                                    "nll_after": {k: round(v, 4) for k, v in meta.losses.items()},
                                    "locality_nll_before": locality_before,
                                    "locality_nll_after": {k: round(v, 4) for k, v in meta.locality_losses.items()}})
        record["seconds"] = round(time.time() - started, 1)
        run.end_step(index + 1, [], extra={"tensors": [t.detach().cpu() for t in learned], "record": record})
    run.finish()
    record["resumed_from_step"] = start
    if run.is_main:
        sizes.save(config.out_dir, record)
        plot_step_sizes(sizes.log_lr.detach(), sizes.modules, Path(config.out_dir) / "step_sizes.png")
    return record
