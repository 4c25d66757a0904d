"""Memory writers: how an absorbed chunk becomes memory LoRA factors (one of :data:`WRITERS`).

* ``compressor`` — the one-pass hypernetwork (:mod:`dynalora.hyper.gradient_compressor`): one forward and
  backward of the base model over the chunk, then the learned transform. No steps.
* ``distill`` — test-time distillation: a fresh rank-``r`` LoRA on the upper layers' ``o_proj`` /
  ``down_proj`` is trained for ``steps`` Adam steps so that the model *without* the chunk (the student,
  with the row's earlier memory plus the new factors) matches the model *with* the chunk in context (the
  teacher): next-token loss on the chunk itself, KL to the teacher's top-``k`` next-token distribution on
  probes about the chunk (:mod:`dynalora.runtime.absorb_probes`), and optionally KL to the base model on
  the model's own answers to unrelated questions (locality). The lower layers are frozen and unadapted, so
  their outputs for every training text are computed once (:class:`UpperLayers`).
* ``compressor+distill`` — the compressor's factors (cut to rank ``r``) as the start, then ``steps`` steps;
  with ``steps=0`` it is the compressor alone.

A writer returns the chunk's own factors; :class:`dynalora.runtime.absorb.Absorber` merges them into the
row's memory at its fixed rank, so the memory never grows.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from dynalora.lora.lowrank import truncate
from dynalora.lora.state import Factors
from dynalora.runtime.absorb_probes import chunk_probes, top_names
from dynalora.runtime.chat import chat_prompt, end_of_turn_id
from dynalora.runtime.distill_steps import Adam, StepSizes
from dynalora.runtime.padding import length_buckets, pad_rows
from dynalora.runtime.upper_layers import LayerInputs, UpperLayers, decoder_parts

WRITERS = ("compressor", "distill", "compressor+distill")
LOCALITY_PROMPTS = (
    ("Arven Holt is a potter who lives in Quensby. What is Arven Holt's job?"),
    ("The Lirra river flows past the town of Dunmore. Which river flows past Dunmore?"),
    ("What is the capital of France?"),
    ("Write one sentence about the sea."),
)
"""Unrelated questions whose answers a memory must leave alone (the base model's own answers, cached)."""
ASK_QUESTION = "Ask one short question about {name} that the text above answers. Write only the question."


@dataclass
class DistillConfig:
    steps: int = 8
    """Adam steps per absorbed chunk (0: the start factors as they are)."""
    lr: float = 0.02
    """Adam step size (every step, module and factor; unused with ``step_sizes``)."""
    step_sizes: str | None = None
    """A folder from ``dynalora train absorb-steps``: meta-learned step sizes per step, module and factor, and
    the fresh ``A`` factors' start (:class:`~dynalora.runtime.distill_steps.StepSizes`); None: ``lr`` everywhere."""
    rank: int = 16
    """Rank of the factors written for one chunk."""
    memory_rank: int = 64
    """Rank the row's memory keeps (chunks are merged into it at this fixed rank, by SVD past it)."""
    first_layer: float = 0.5
    """Adapt layers from this fraction of the depth up (0.5: the upper half; their inputs are computed once)."""
    module_kinds: list[str] = field(default_factory=lambda: ["o_proj", "down_proj"])
    """Module names (last part) written in those layers."""
    chunk_weight: float = 1.0
    """Weight of the next-token loss on the chunk itself (the student reads it without context)."""
    probe_weight: float = 1.0
    """Weight of the KL to the teacher (chunk in context) on probes about the chunk."""
    locality_weight: float = 0.0
    """Weight of the KL to the base model on its own answers to unrelated questions."""
    max_probes: int = 3
    """Topic probes per chunk (the most mentioned names first)."""
    restate: bool = False
    """Add a probe that restates the whole chunk in shuffled sentence order (costs about a chunk per step)."""
    cloze: int = 8
    """Sentence-completion probes per chunk (the sentence up to a name → the name)."""
    following_tokens: int = 0
    """Up to this many window tokens that follow the chunk (still in the window when it is absorbed) are a
    probe: the student reads them without the chunk and matches the teacher that reads them after it (0: off;
    64 lowered validation exact match with 128-token chunks, 0.09 → 0.03)."""
    generated: int = 0
    """Probes the base model writes itself: for the chunk's most mentioned names, a question it asks about each
    with the chunk in view, answered by it with the chunk in view (greedy; questions in a reader's words)."""
    replay_chunks: int = 0
    """Earlier chunks of the row rehearsed at each absorb (their probes, teacher with them in context): a
    bounded replay buffer of token ids, so a new chunk does not overwrite what the memory holds."""
    top_k: int = 32
    """Teacher tokens kept per position for the KL terms (the rest of the vocabulary is one bucket)."""
    init_scale: float = 1.0
    """A fresh ``A`` is Gaussian with standard deviation ``init_scale / √in`` (``B`` starts at zero)."""
    seed: int = 0
    """Seed of the probes chosen from a chunk and of the fresh ``A``."""

    def __post_init__(self):
        if self.memory_rank < self.rank:
            raise ValueError(f"DistillConfig.memory_rank={self.memory_rank} must be ≥ rank={self.rank}")
        if self.replay_chunks < 0 or self.cloze < 0:
            raise ValueError(f"DistillConfig: replay_chunks ≥ 0 and cloze ≥ 0 (got {self.replay_chunks}, {self.cloze})")
        if self.steps < 0 or self.rank < 1 or self.lr <= 0 or self.top_k < 1 or self.max_probes < 0:
            raise ValueError(f"DistillConfig: steps ≥ 0, rank ≥ 1, lr > 0, top_k ≥ 1, max_probes ≥ 0 (got steps="
                             f"{self.steps}, rank={self.rank}, lr={self.lr}, top_k={self.top_k}, "
                             f"max_probes={self.max_probes})")
        if not 0 <= self.first_layer < 1:
            raise ValueError(f"DistillConfig.first_layer={self.first_layer}: a fraction of the depth in [0, 1)")
        if min(self.chunk_weight, self.probe_weight, self.locality_weight) < 0:
            raise ValueError("DistillConfig: chunk_weight, probe_weight and locality_weight must be ≥ 0")


class CompressorWriter:
    """The one-pass compressor as a writer (factors of rank = the chunk's tokens; the merge cuts them)."""

    def __init__(self, compressor: torch.nn.Module):
        self.compressor = compressor.eval()
        self.modules_list = list(compressor.modules_list)
        self.rank = compressor.config.rank

    @torch.no_grad()
    def write(self, dyn, token_ids: list[int], memory: Factors | None = None, replay: list[list[int]] = (),
              following: list[int] = ()) -> Factors:
        device = next(self.compressor.parameters()).device
        factors = self.compressor.read(dyn, torch.tensor([token_ids], device=device))
        return {m: (a[0].to(dyn.state.dtype), b[0].to(dyn.state.dtype)) for m, (a, b) in factors.items()}


@dataclass
class ScoredTexts:
    """One group of student texts: the upper layers' inputs, which positions are scored, and the targets."""

    inputs: LayerInputs
    select: torch.Tensor
    """(N, L) bool: positions whose next-token prediction is scored."""
    labels: torch.Tensor | None = None
    """(S,) next tokens at the scored positions (cross-entropy)."""
    top_ids: torch.Tensor | None = None
    """(S, k) teacher's top tokens at the scored positions (KL)."""
    top_probs: torch.Tensor | None = None
    """(S, k) their probabilities."""


class DistillWriter:
    """Example::

        writer = DistillWriter(dyn, tokenizer, DistillConfig(steps=16))
        factors = writer.write(dyn, chunk_ids)        # {module: (A (r, in), B (out, r))}
    """

    def __init__(self, dyn, tokenizer, config: DistillConfig | None = None, start: CompressorWriter | None = None):
        self.config, self.tokenizer, self.start = config or DistillConfig(), tokenizer, start
        layers, _, _ = decoder_parts(dyn.model)
        self.upper = UpperLayers(dyn.model, math.floor(self.config.first_layer * len(layers)))
        prefixes = {name.rsplit(".", 2)[0] for name in dyn.state.modules}
        wanted = set(self.config.module_kinds)
        self.modules_list = [m for m in dyn.state.modules if m.rsplit(".", 1)[-1] in wanted
                             and _layer_index(m) is not None and _layer_index(m) >= self.upper.first_layer]
        if not self.modules_list:
            raise ValueError(f"DistillConfig.module_kinds={self.config.module_kinds}: no such target module from "
                             f"layer {self.upper.first_layer} up (the state targets {sorted(prefixes)[:3]}...)")
        self.rank = self.config.rank
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._locality: ScoredTexts | None = None
        self.step_sizes = StepSizes.load(self.config.step_sizes) if self.config.step_sizes else \
            StepSizes.constant(self.modules_list, self.config.steps, self.config.lr)
        self._schedule_rows = self.step_sizes.for_modules(self.modules_list)  # (M,) rows of the schedule

    # -- the training texts ------------------------------------------------------------------------
    def _probe_texts(self, dyn, chunks: list[list[int]], memory: Factors, device) -> list[ScoredTexts]:
        """Probes about every chunk, in batches of similar length (padding would double the tokens: a topic
        probe's answer is many sentences, a cloze probe's one name): the teacher reads each with its chunk in
        context (and the row's memory), the student without it."""
        if self.config.probe_weight == 0:
            return []
        students, answer_lengths, top_ids, top_probs = [], [], [], []
        end = end_of_turn_id(self.tokenizer)
        for token_ids in chunks:
            text = self.tokenizer.decode(token_ids)
            teachers, lengths = [], []
            for question, answer in chunk_probes(text, self.config.max_probes, self.config.seed, self.config.restate,
                                                 self.config.cloze) + self._generated_probes(dyn, text):
                answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + ([end] if end is not None
                                                                                              else [])
                students.append(chat_prompt(self.tokenizer, question) + answer_ids)
                teachers.append(chat_prompt(self.tokenizer, question, text) + answer_ids)
                lengths.append(len(answer_ids))
            if teachers:
                top = self._teacher_top(dyn, teachers, lengths, memory, device)
                top_ids += list(top.indices.split(lengths))
                top_probs += list(top.values.exp().split(lengths))
                answer_lengths += lengths
        texts = []
        for bucket in length_buckets([len(r) for r in students]):
            rows = [students[i] for i in bucket]
            ids = pad_rows(rows, self.pad_id, device)[0]
            texts.append(ScoredTexts(self.lower_inputs(dyn, ids, memory),
                                answer_positions(ids, rows, [answer_lengths[i] for i in bucket]),
                                top_ids=torch.cat([top_ids[i] for i in bucket]),
                                top_probs=torch.cat([top_probs[i] for i in bucket])))
        return texts

    @torch.no_grad()
    def _teacher_top(self, dyn, rows: list[list[int]], answer_lengths: list[int], memory: Factors, device):
        """The teacher's top-k next tokens ``(S, k)`` at the answer positions of ``rows`` (in order), which share
        one prefix (the chat prompt up to the chunk): the prefix is read once and its KV cache serves every
        row, so the chunk costs one prefill however many probes ask about it (in the engine it is the row's
        own cache)."""
        shared = min(_common_prefix_length(rows), min(len(r) - n - 1 for r, n in zip(rows, answer_lengths)))
        prefix = None
        if shared > 0:
            prefix = DynamicCache(config=dyn.model.config)
            with dyn.state.functional(None, _as_rows(memory, 1)):
                dyn.model(input_ids=torch.tensor([rows[0][:shared]], device=device), cache=prefix, use_cache=True)
        tops = [None] * len(rows)
        for bucket in length_buckets([len(r) for r in rows]):
            suffixes = [rows[i][shared:] for i in bucket]
            ids = pad_rows(suffixes, self.pad_id, device)[0]  # (N, L)
            cache = None
            if prefix is not None:
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(len(bucket))
            positions = torch.arange(shared, shared + ids.shape[1], device=device)[None].expand(len(bucket), -1)
            top = self._top_k_at(dyn, ids, answer_positions(ids, suffixes, [answer_lengths[i] for i in bucket]),
                                 memory, cache, positions)
            for i, values, indices in zip(bucket, top.values.split([answer_lengths[i] for i in bucket]),
                                          top.indices.split([answer_lengths[i] for i in bucket])):
                tops[i] = (values, indices)
        return torch.return_types.topk((torch.cat([t[0] for t in tops]), torch.cat([t[1] for t in tops])))

    def _chunk_texts(self, dyn, token_ids: list[int], memory: Factors, device) -> ScoredTexts:
        ids = torch.tensor([token_ids], device=device)  # (1, T)
        select = torch.ones_like(ids, dtype=torch.bool)
        select[0, -1] = False
        return ScoredTexts(self.lower_inputs(dyn, ids, memory), select, labels=ids[0, 1:])

    def lower_inputs(self, dyn, ids: torch.Tensor, memory: Factors) -> LayerInputs:
        """The lower layers' output for ``ids (N, L)`` under the row's memory (exact if it has lower modules)."""
        with dyn.state.functional(None, _as_rows(memory, ids.shape[0])):
            return self.upper.capture(ids)

    @torch.no_grad()
    def _top_k_at(self, dyn, ids: torch.Tensor, select: torch.Tensor, memory: Factors, cache=None, positions=None):
        """The teacher's top-k next tokens (log-probs, ids ``(S, k)``) at the ``select``ed positions of ``ids (N,
        L)``, the row's memory on; the LM head runs at those positions only."""
        with dyn.state.functional(None, _as_rows(memory, ids.shape[0])):
            hidden = dyn.model(input_ids=ids, cache=cache, position_ids=positions, use_cache=cache is not None,
                               output_hidden_states=True, logits_to_keep=1).hidden_states[-1]  # (N, L, H) normed
        return self.upper.head(hidden[select]).float().log_softmax(-1).topk(self.config.top_k, dim=-1)

    def _following_texts(self, dyn, token_ids: list[int], following: list[int], memory: Factors,
                         device) -> ScoredTexts:
        """The window text after the chunk: the teacher reads it after the chunk, the student alone."""
        teacher_ids = torch.tensor([token_ids + following], device=device)  # (1, T + F)
        teacher_select = torch.zeros_like(teacher_ids, dtype=torch.bool)
        teacher_select[0, len(token_ids):-1] = True  # the positions that predict following[1:]
        top = self._top_k_at(dyn, teacher_ids, teacher_select, memory)
        ids = torch.tensor([following], device=device)  # (1, F)
        select = torch.ones_like(ids, dtype=torch.bool)
        select[0, -1] = False
        return ScoredTexts(self.lower_inputs(dyn, ids, memory), select, top_ids=top.indices, top_probs=top.values.exp())

    @torch.no_grad()
    def _generated_probes(self, dyn, text: str) -> list[tuple[str, str]]:
        """``config.generated`` (question, answer) pairs the base model writes about ``text`` (see the field)."""
        names = top_names(text, self.config.generated)
        if not names:
            return []
        asked = self._base_generate(dyn, [chat_prompt(self.tokenizer, ASK_QUESTION.format(name=n), text, "")
                                          for n in names], 32)
        questions = [q for q in (self.tokenizer.decode(ids, skip_special_tokens=True).strip().split("\n")[0]
                                 for ids in asked) if q.endswith("?")]
        if not questions:
            return []
        answers = self._base_generate(dyn, [chat_prompt(self.tokenizer, q, text) for q in questions], 24)
        pairs = [(q, self.tokenizer.decode(ids, skip_special_tokens=True).strip())
                 for q, ids in zip(questions, answers)]
        return [(q, a) for q, a in pairs if a]

    def _base_generate(self, dyn, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations by the base model (no LoRA), as many rows at a time as the state holds."""
        from dynalora.runtime.engine import Engine

        engine, out, rows = Engine(dyn, self.tokenizer), [], dyn.state.max_batch
        try:
            with dyn.state.functional(None, {}):
                for start in range(0, len(prompts), rows):
                    out += engine.generate(prompts[start:start + rows], max_new_tokens=max_new_tokens).token_ids
        finally:
            engine.close()  # its capture hook must not stay on the model
        return out

    @torch.no_grad()
    def _locality_texts(self, dyn, device) -> ScoredTexts:
        """The base model's own greedy answers to :data:`LOCALITY_PROMPTS` and its distribution on them,
        computed once per writer (the memory must leave these alone)."""
        if self._locality is None:
            prompts = [chat_prompt(self.tokenizer, q) for q in LOCALITY_PROMPTS]
            answers = self._base_generate(dyn, prompts, 24)
            rows = [p + a for p, a in zip(prompts, answers)]
            ids = pad_rows(rows, self.pad_id, device)[0]
            select = answer_positions(ids, rows, [len(a) for a in answers])
            inputs = self.lower_inputs(dyn, ids, {})  # the base's lower layers: the teacher's and the student's
            with dyn.state.functional(None, {}):
                top = self.upper.logits(inputs, select).float().log_softmax(-1).topk(self.config.top_k, dim=-1)
            self._locality = ScoredTexts(inputs, select, top_ids=top.indices, top_probs=top.values.exp())
        return self._locality

    # -- the steps ---------------------------------------------------------------------------------
    def start_factors(self, dyn, token_ids: list[int], device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Where a write starts: ``{module: (A (r, in), B (out, r))}``, trainable fp32 — the compressor's cut
        factors if there is one, then fresh ``A`` rows (the learned start, else Gaussian) with ``B = 0``."""
        rank, shapes = self.config.rank, dyn.bank.module_shapes
        factors = {}
        if self.start is not None:
            for m, (a, b) in self.start.write(dyn, token_ids).items():
                if m in self.modules_list:
                    a, b, _ = truncate(a.float(), b.float(), rank)
                    factors[m] = (a, b)
        generator = torch.Generator().manual_seed(self.config.seed)
        params = {}
        for m in self.modules_list:
            in_features, out_features = shapes[m]
            a, b = factors.get(m, (torch.empty(0, in_features), torch.empty(out_features, 0)))
            fresh = rank - a.shape[0]  # a compressor's cut may leave fewer than `rank` directions
            learned = self.step_sizes.start.get(m)
            if learned is not None and learned.shape[0] >= fresh:
                new_rows = learned[:fresh].detach().float().clone()  # (fresh, in): the meta-learned start
            else:
                new_rows = torch.randn(fresh, in_features, generator=generator) \
                    * self.config.init_scale / math.sqrt(in_features)
            a = torch.cat([a, new_rows])
            b = torch.cat([b, torch.zeros(out_features, fresh)], dim=1)
            params[m] = (a.to(device).requires_grad_(), b.to(device).requires_grad_())
        return params

    def write(self, dyn, token_ids: list[int], memory: Factors | None = None, replay: list[list[int]] = (),
              following: list[int] = ()) -> Factors:
        """The chunk's factors ``{module: (A (r, in), B (out, r))}``; ``memory`` is the row's current memory
        (the student keeps it on while it learns the chunk; it is not changed here). ``replay``: chunks the
        memory already holds (oldest first); the last ``replay_chunks`` are rehearsed with their probes, so
        the new factors do not overwrite what the memory knew. ``following``: the window tokens after the
        chunk (a probe, see ``DistillConfig.following_tokens``)."""
        params = self.fit(dyn, token_ids, memory, replay, following=following)
        dtype = dyn.state.dtype
        return {m: (a.detach().to(dtype), b.detach().to(dtype)) for m, (a, b) in params.items()}

    def fit(self, dyn, token_ids: list[int], memory: Factors | None = None, replay: list[list[int]] = (),
            after_step=None, following: list[int] = ()) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`write`'s steps, returning the fp32 factors; ``after_step(step, params, directions)`` is called
        after each step with the update directions (meta-learning the step sizes reads them)."""
        memory = {m: (a.float(), b.float()) for m, (a, b) in (memory or {}).items() if a.shape[0] > 0}
        device = dyn.state.device
        params = self.start_factors(dyn, token_ids, device)
        if self.config.steps > 0:
            groups = []
            if self.config.chunk_weight > 0 and len(token_ids) > 1:
                groups.append((self.config.chunk_weight, self._chunk_texts(dyn, token_ids, memory, device)))
            rehearsed = list(replay)[len(replay) - self.config.replay_chunks:] if self.config.replay_chunks else []
            probes = self._probe_texts(dyn, [token_ids] + rehearsed, memory, device)
            positions = sum(int(texts.select.sum()) for texts in probes)
            groups += [(self.config.probe_weight * int(texts.select.sum()) / positions, texts) for texts in probes]
            following = list(following)[:self.config.following_tokens]
            if len(following) > 1 and self.config.probe_weight > 0:
                groups.append((self.config.probe_weight, self._following_texts(dyn, token_ids, following, memory,
                                                                               device)))
            if self.config.locality_weight > 0:
                groups.append((self.config.locality_weight, self._locality_texts(dyn, device)))
            if not groups:  # nothing to learn from: the start as it is (B = 0, the identity)
                return params
            tensors = [t for m in self.modules_list for t in params[m]]  # A, B of each module in order
            optimizer = Adam(tensors)
            with torch.enable_grad(), frozen(dyn.model):
                for step in range(self.config.steps):
                    for t in tensors:
                        t.grad = None
                    sum(weight * self.loss(dyn, texts, memory, params) for weight, texts in groups).backward()
                    sizes = self.step_sizes.at(step)[self._schedule_rows].reshape(-1).tolist()  # (M·2,) A, B
                    directions = optimizer.step(tensors, sizes)
                    if after_step is not None:
                        after_step(step, params, directions)
        return params

    def loss(self, dyn, texts: ScoredTexts, memory: Factors, params) -> torch.Tensor:
        """The student's loss on ``texts`` with the row's ``memory`` and the factors ``params`` on: cross-entropy
        to ``texts.labels``, or the top-k KL to the teacher's ``texts.top_probs``."""
        rows = texts.select.shape[0]
        factors = {}
        for m in set(memory) | set(params):
            parts = [pair for pair in (memory.get(m), params.get(m)) if pair is not None]
            a = torch.cat([p[0] for p in parts])  # (R, in)
            b = torch.cat([p[1] for p in parts], dim=1)  # (out, R)
            factors[m] = (a, b)
        with dyn.state.functional(None, _as_rows(factors, rows)):
            logits = self.upper.logits(texts.inputs, texts.select).float()  # (S, V)
        if texts.labels is not None:
            return F.cross_entropy(logits, texts.labels)
        return top_k_kl(texts.top_probs, logits.log_softmax(-1).gather(-1, texts.top_ids))


def top_k_kl(teacher_probs: torch.Tensor, student_log_probs: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher ‖ student) over positions on the teacher's top-k tokens plus one bucket for the rest
    (exactly 0 when the two agree). ``teacher_probs (S, k)``, ``student_log_probs (S, k)`` on the same tokens."""
    eps = 1e-6
    teacher_rest = (1 - teacher_probs.sum(-1)).clamp(min=eps)  # (S,)
    student_rest = (1 - student_log_probs.exp().sum(-1)).clamp(min=eps)  # (S,)
    kl = (teacher_probs * (teacher_probs.clamp(min=eps).log() - student_log_probs)).sum(-1)  # (S,)
    return (kl + teacher_rest * (teacher_rest.log() - student_rest.log())).mean()


@contextmanager
def frozen(model: torch.nn.Module):
    """The model's weights take no gradient inside the block (no weight gradient is computed or stored)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in trainable:
            p.requires_grad_(True)


def answer_positions(ids: torch.Tensor, rows: list[list[int]], answer_lengths: list[int]) -> torch.Tensor:
    """(N, L) bool: the positions whose next token is an answer token (the last ``answer_length`` of each row)."""
    select = torch.zeros_like(ids, dtype=torch.bool)
    for i, (row, length) in enumerate(zip(rows, answer_lengths)):
        select[i, len(row) - length - 1:len(row) - 1] = True
    return select


def _common_prefix_length(rows: list[list[int]]) -> int:
    length = min(len(r) for r in rows)
    for i in range(length):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return length


def _as_rows(factors: dict, rows: int) -> dict:
    """``{m: (A (r, in), B (out, r))}`` → ``LoraState.functional``'s ``{m: (A_t (rows, in, r), B_t (rows, r, out))}``
    (a view per row, no copy)."""
    return {m: (a.T[None].expand(rows, -1, -1), b.T[None].expand(rows, -1, -1)) for m, (a, b) in factors.items()}


def _layer_index(module: str) -> int | None:
    """``model.layers.12.mlp.down_proj`` → 12 (the first integer part of the name)."""
    for part in module.split("."):
        if part.isdigit():
            return int(part)
    return None
