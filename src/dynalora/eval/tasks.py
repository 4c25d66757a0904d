"""``dynalora eval tasks``: accuracy on held-out BIG-Bench tasks, and what each method paid to adapt.

The Text-to-LoRA / LoraHub setting: for a task the library never saw, each method builds the row's
LoRA from a few support examples (or the task's description) and is scored on the task's queries.

* ``base`` — no LoRA; ``uniform_merge`` — the exact uniform blend of the library (both adapt in 0 s);
* ``best_adapter`` — the single library adapter with the lowest NLL of the support answers;
* ``lorahub`` — LoraHub's gradient-free search of the K blend weights on the support examples
  (objective: mean answer NLL + 0.05·Σ|w|, weights in [-1.5, 1.5], 40 evaluations of nevergrad's NGOpt, as
  LoraHub runs it: :func:`lorahub_search`);
* ``dynalora_description`` / ``dynalora_examples`` — one zero-LoRA forward over the task's description
  (or the support examples written out), the feature-layer state pooled over the network's window,
  one shift-network call: its gated blend (against a zero current blend, as ``ShiftHypernetwork``);
* ``dynalora_examples_routed`` — the same blend as the token router's prior (:mod:`dynalora.hyper.router`): the
  queries are scored with the blend re-weighted at every token inside the forward.

Support examples come from the task's **train** split, queries from its **test** split — or from every split
named in ``query_splits`` but train (by hash of the input, :func:`dynalora.data.split_examples`); both are seeded
samples. Scoring follows BIG-Bench:
``multiple_choice`` — the summed log-probability of each choice after the zero-shot prompt, the grade
of the best one (``choice_scores``: partial credit where a task gives it, else 1/0);
``exact_match`` — greedy generation, cut at the first newline / the task's ``stop_string``, the task's
``output_regex`` applied as BIG-Bench does, compared after ``strip`` with every accepted target (a
case-insensitive variant is reported beside it). Answers are tokenised as the library was trained
(:func:`dynalora.data.batches.task_pairs`: ``" " + answer``, plus EOS for the support NLL).
"""

from __future__ import annotations

import difflib
import json
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dynalora.models import check_placement, model_device
from dynalora.report import report
from dynalora.shipped import shipped
from dynalora.runtime.padding import pad_rows

logger = logging.getLogger(__name__)

METHODS = ("base", "best_adapter", "uniform_merge", "lorahub", "dynalora_description", "dynalora_examples",
           "dynalora_examples_routed")
ROUTED = "_routed"  # a method name's suffix: the method's blend as the token router's prior
SUPPORT_SPLIT = "train"


@dataclass
class TaskEvalConfig:
    tasks: list[str] | None = None
    """BIG-Bench task names (default: the library's ``held_out_tasks`` in ``library.json``)."""
    library_dir: Path = shipped("library")
    """The trained library (``dynalora train library``)."""
    shift_dir: Path = shipped("shift")
    """The shift network (``dynalora train shift``)."""
    triggers_dir: Path = shipped("triggers")
    """The trained trigger (``dynalora train triggers``)."""
    router_dir: Path = shipped("router")
    """The token router of ``dynalora_examples_routed`` (``dynalora train route``)."""
    model: str | None = None
    """Base model: HF id or folder (None: the embedded SmolLM2-135M-Instruct)."""
    support: int = 5
    """Support examples per task (from its train split) for best_adapter, lorahub and dynalora_examples."""
    max_queries: int = 60
    """Query examples per task (from its query splits; fewer where they are smaller)."""
    query_splits: list[str] = field(default_factory=lambda: ["test"])
    """The splits queries come from: test, or validation and test for more queries (never train: the support
    examples' split)."""
    seed: int = 0
    """Seed of the support/query samples and of the LoraHub search."""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """Methods scored: base, best_adapter, uniform_merge, lorahub, dynalora_description, dynalora_examples,
    dynalora_examples_routed."""
    lorahub_steps: int = 40
    """Objective evaluations of the LoraHub search (LoraHub: NGOpt with 40 steps)."""
    lorahub_l1: float = 0.05
    """Weight of LoraHub's L1 term Σ|w| in the search objective."""
    lorahub_bound: float = 1.5
    """Blend weights are searched in [-bound, bound] (LoraHub's bounds)."""
    max_new_tokens: int = 24
    """Cap on generated tokens for exact-match tasks (the longest target + 4, at most this)."""
    batch_size: int = 16
    """Rows per scoring / generation batch."""
    allow_library_tasks: bool = False
    """Allow tasks that are not in the library's held_out_tasks (they may be in its training data)."""
    use_factors: bool = False
    """dynalora methods also apply the shift network's generated factors (off: the shipped default)."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or auto."""
    dtype: str = "float32"
    """The base model's weights: float32, bfloat16 or float16 (scores are computed in float32)."""
    threads: int = 2
    """CPU threads for torch (1 can be much faster when another job shares the cores)."""

    def __post_init__(self):
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"--methods: unknown {unknown or 'none given'}; choose from {list(METHODS)}")
        for name, low in (("support", 1), ("max_queries", 1), ("lorahub_steps", 1), ("max_new_tokens", 1),
                          ("batch_size", 1), ("threads", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"TaskEvalConfig.{name} (--{name.replace('_', '-')}) must be ≥ {low}, "
                                 f"got {getattr(self, name)}")
        from dynalora.data.splits import SPLITS

        bad = [s for s in self.query_splits if s not in SPLITS or s == SUPPORT_SPLIT]
        if bad or not self.query_splits:
            raise ValueError(f"--query-splits: {bad or 'none given'}; choose from "
                             f"{[s for s in SPLITS if s != SUPPORT_SPLIT]} (train holds the support examples)")
        if self.lorahub_bound <= 0:
            raise ValueError(f"TaskEvalConfig.lorahub_bound must be > 0, got {self.lorahub_bound}")
        check_placement(self.device, self.dtype)


# -- which tasks ---------------------------------------------------------------------------------------
def library_held_out(library_dir: Path) -> list[str]:
    """The library's ``held_out_tasks`` (kept out of its training), read from ``library.json``."""
    path = Path(library_dir) / "library.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; make the library with `dynalora train library`")
    return list(json.loads(path.read_text())["config"].get("held_out_tasks", []))


def check_tasks(names: list[str], known: list[str], held_out: list[str], allow_library_tasks: bool = False,
                library_sources: list[str] = ()) -> None:
    """Refuse a name BIG-Bench does not have (naming close ones) or one not held out from the library."""
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=6, cutoff=0.6)
            close += [k for k in known if name.split(":")[0] in k and k not in close][:6 - len(close)]
            raise ValueError(f"--tasks: no BIG-Bench task {name!r}" + (f"; close names: {', '.join(close)}"
                                                                         if close else ""))
        if name not in held_out and not allow_library_tasks:
            trained = [s for s in library_sources if s.removeprefix("bigbench:") == name]
            raise ValueError(f"--tasks: {name!r} is not held out from the library"
                             + (" (a library adapter was trained on it)" if trained else "")
                             + f"; held out: {held_out}. Pass --allow-library-tasks to evaluate it anyway")


def sample_examples(task, support: int, max_queries: int, seed: int, query_splits: tuple[str, ...] = ("test",)):
    """((support examples from the train split, pool size), (query examples from ``query_splits``, pool size)):
    seeded samples, task order. With the test split alone, the same draw as before ``query_splits`` existed."""
    from dynalora.data import split_examples

    drawn = []
    for splits, count in (((SUPPORT_SPLIT,), support), (tuple(query_splits), max_queries)):
        pool = [example for split in splits for example in split_examples(task, split)]
        if not pool:
            raise ValueError(f"task {task.name!r} has no examples in its {'/'.join(splits)} split")
        picked = sorted(random.Random(f"{seed}:{task.name}:{'+'.join(splits)}").sample(range(len(pool)),
                                                                                   min(count, len(pool))))
        drawn.append(([pool[i] for i in picked], len(pool)))
    return drawn[0], drawn[1]


# -- scoring -------------------------------------------------------------------------------------------
def answer_ids(tokenizer, answer: str, eos: bool = False) -> list[int]:
    """An answer's ids as the library's task adapters were trained (``task_pairs``): ``" " + answer``."""
    ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if eos and tokenizer.eos_token_id is not None else ids


def prompt_ids(tokenizer, task, example) -> list[int]:
    return tokenizer(task.format_prompt(example), add_special_tokens=False)["input_ids"]


@torch.no_grad()
def continuation_logprobs(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, vocab_size: int | None = None,
                          batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each continuation given its prompt, and its token count: ``(N,)``, ``(N,)``.

    Left-padded batches with explicit positions (as the engine runs them), so every continuation ends
    at the last position and only the last ``longest continuation + 1`` logits are computed; row ``b``
    of a batch reads LoRA state row ``b``. Log-probabilities are over the first ``vocab_size`` logits
    (trigger tokens excluded). Example: ``continuation_logprobs(model, [([5, 6], [7, 8])], 0)`` =
    log p(7|5,6) + log p(8|5,6,7)."""
    sums, counts, device = [], [], model_device(model)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        if any(not prompt or not answer for prompt, answer in chunk):
            raise ValueError("every prompt and every continuation needs at least one token")
        width = max(len(p) + len(a) for p, a in chunk)
        keep = max(len(a) for _, a in chunk) + 1
        ids, mask = pad_rows([prompt + answer for prompt, answer in chunk], pad_id, device, left=True)  # (B, T)
        scored = torch.zeros((len(chunk), keep - 1), dtype=torch.bool, device=device)  # (B, k-1): continuations
        for b, (_, answer) in enumerate(chunk):
            scored[b, keep - 1 - len(answer):] = True
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                       logits_to_keep=keep).logits[:, :-1]  # (B, k-1, V): predicts the last k-1 tokens
        rows, cols = torch.nonzero(scored, as_tuple=True)
        targets = ids[:, width - keep + 1:][rows, cols]  # (n,)
        picked = logits[rows, cols, :vocab_size].float()  # (n, V)
        token_log_probs = torch.log_softmax(picked, dim=-1).gather(1, targets[:, None])[:, 0]  # (n,)
        sums.append(torch.zeros(len(chunk), device=device).index_add_(0, rows, token_log_probs))
        counts.append(scored.sum(1))
    return torch.cat(sums), torch.cat(counts)


def choose_choices(model, tokenizer, task, examples, pad_id: int, vocab_size: int | None = None,
                   batch_size: int = 16) -> list[int]:
    """Index of the choice with the highest summed log-probability after the zero-shot prompt, per example."""
    pairs, owners = [], []
    for index, example in enumerate(examples):
        prompt = prompt_ids(tokenizer, task, example)
        for choice in example.choices:
            pairs.append((prompt, answer_ids(tokenizer, choice)))
            owners.append(index)
    scores, _ = continuation_logprobs(model, pairs, pad_id, vocab_size, batch_size)
    best = [(-float("inf"), -1)] * len(examples)
    offsets = [0] * len(examples)
    for owner, score in zip(owners, scores.tolist()):
        if score > best[owner][0]:  # first best on ties, as BIG-Bench
            best[owner] = (score, offsets[owner])
        offsets[owner] += 1
    return [choice for _, choice in best]


def extract_answer(text: str, stop_string: str | None = None, output_regex: str | None = None) -> str:
    """Generated text → the answer: cut at the first newline and at ``stop_string``, then BIG-Bench's
    ``output_regex`` (its first match, or ``""``), stripped. ``extract_answer(" cat\\nQ: x") == "cat"``."""
    text = text.split("\n", 1)[0]
    if stop_string:
        text = text.split(stop_string, 1)[0]
    if output_regex:
        found = re.findall(output_regex, text)
        text = found[0] if found else ""
        text = text if isinstance(text, str) else "".join(text)
    return text.strip()


def exact_match(answer: str, targets: list[str]) -> tuple[bool, bool]:
    """(exact, case-insensitive) match of an extracted answer against every accepted target."""
    clean = [t.strip() for t in targets]
    return answer in clean, answer.lower() in [t.lower() for t in clean]


# -- adaptation ----------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    weights: list[float]
    value: float
    values: list[float]
    """The objective at every evaluation, in order (the first is the start point)."""


def lorahub_search(objective: Callable[[torch.Tensor], float], dim: int, budget: int = 40, bound: float = 1.5,
                   seed: int = 0) -> SearchResult:
    """LoraHub's search of the blend weights: nevergrad's ``NGOpt`` over ``[-bound, bound]^dim`` from zero (the base
    model), ``budget`` evaluations of ``objective(weights (dim,))``, seeded; the weights are the optimiser's
    recommendation, as LoraHub takes them (``value``: the objective there, one evaluation past the budget)."""
    try:
        import nevergrad as ng
        import numpy as np
    except ImportError:
        raise RuntimeError("the lorahub method needs nevergrad (LoraHub's optimiser): pip install 'dynalora[eval]'") \
            from None
    parametrization = ng.p.Array(init=np.zeros(dim), lower=-bound, upper=bound)
    parametrization.random_state = np.random.RandomState(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget)
    values = []

    def scored(weights) -> float:
        values.append(float(objective(torch.tensor(weights, dtype=torch.float32))))
        return values[-1]

    weights = torch.tensor(optimizer.minimize(scored).value, dtype=torch.float32)
    return SearchResult(weights.tolist(), float(objective(weights)), values)


@dataclass
class Adaptation:
    """One method's LoRA for a task: a blend (and, optionally, generated factors), and what it cost."""

    blend: list[float]
    seconds: float = 0.0
    generated: dict | None = None
    extra: dict = field(default_factory=dict)


def set_all_rows(state, blend, generated=None) -> None:
    """Every row of the state gets the same LoRA (a batch's row ``b`` reads state row ``b``)."""
    for row in range(state.max_batch):
        state.reset(row)
        state.update(row, blend=blend, generated=generated)


def description_text(task) -> str:
    """The task's description; else the first sentence of its prefix; else its name."""
    if task.description.strip():
        return task.description.strip()
    prefix = task.task_prefix.strip()
    return re.split(r"(?<=[.!?])\s", prefix, maxsplit=1)[0] if prefix else task.name


def examples_text(task, examples) -> str:
    """The task prefix once, then the support examples as prompt + answer, joined by the few-shot separator."""
    return task.task_prefix + task.few_shot_example_separator.join(
        task.format_prompt(e).removeprefix(task.task_prefix) + (e.target if e.target is not None else
                                                                 e.choices[e.correct]) for e in examples)


@torch.no_grad()
def shift_net_blend(system, text: str) -> Adaptation:
    """One zero-LoRA forward over ``text``, its feature-layer state pooled over the network's window, one
    shift-network call; the blend it proposes, gated against a zero current blend (``ShiftHypernetwork``)."""
    from dynalora.hyper.protocol import TriggerFeatures

    tokenizer, dyn, capture = system.base.tokenizer, system.dyn, system.capture
    started = time.perf_counter()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    dyn.state.reset()
    capture.reset()
    capture.enabled = True
    try:
        dyn(input_ids=torch.tensor([ids], device=model_device(dyn.model)), use_cache=False, logits_to_keep=1)
        features = TriggerFeatures(0, len(ids) - 1, "task text", capture.last(0), capture.pooled(0), ids)
    finally:
        capture.enabled = False
    update = system.hyper(features, dyn.state)
    seconds = time.perf_counter() - started
    gate = float(system.net(features.pooled_hidden.float()[None], with_factors=False)["gate"][0])
    return Adaptation(update.blend.tolist(), seconds, update.generated,
                      {"gate": round(gate, 4), "text_tokens": len(ids)})


# -- one task ------------------------------------------------------------------------------------------
class TaskRunner:
    """Adapts and scores every method on one task with one dynamic model (all state rows share the LoRA)."""

    def __init__(self, system, config: TaskEvalConfig, engine, router=None):
        self.system, self.config, self.engine, self.router = system, config, engine, router
        self.dyn, self.tokenizer = system.dyn, system.base.tokenizer
        self.labels = list(system.bank.labels)
        self.pad_id = engine._pad_id()

    def support_nll(self, pairs, blend, generated=None) -> float:
        """Mean NLL per answer token of the support pairs under ``blend`` (the selection objective)."""
        set_all_rows(self.dyn.state, blend, generated)
        sums, counts = continuation_logprobs(self.dyn, pairs, self.pad_id, self.system.vocab_size,
                                             self.config.batch_size)
        return float(-sums.sum() / counts.sum())

    def adapt(self, method: str, task, support, pairs) -> Adaptation:
        count = len(self.labels)
        if method == "base":
            return Adaptation([0.0] * count)
        if method == "uniform_merge":
            return Adaptation([1.0 / count] * count)
        if method == "best_adapter":
            started = time.perf_counter()
            nll = [self.support_nll(pairs, [1.0 if j == k else 0.0 for j in range(count)]) for k in range(count)]
            pick = min(range(count), key=nll.__getitem__)
            return Adaptation([1.0 if j == pick else 0.0 for j in range(count)], time.perf_counter() - started,
                              extra={"picked": self.labels[pick], "support_nll_per_adapter":
                                     dict(zip(self.labels, (round(v, 4) for v in nll)))})
        if method == "lorahub":
            config = self.config
            started = time.perf_counter()
            result = lorahub_search(
                lambda w: self.support_nll(pairs, w) + config.lorahub_l1 * float(w.abs().sum()), count,
                config.lorahub_steps, config.lorahub_bound, config.seed)
            return Adaptation(result.weights, time.perf_counter() - started,
                              extra={"objective_start": round(result.values[0], 4),
                                     "objective_best": round(result.value, 4), "evaluations": len(result.values)})
        text = description_text(task) if method == "dynalora_description" else examples_text(task, support)
        return shift_net_blend(self.system, text)

    def score(self, task, queries) -> dict:
        """Accuracy of the current LoRA (already in every row) on the queries."""
        config, model = self.config, self.dyn
        if task.metric == "multiple_choice":
            picks = choose_choices(model, self.tokenizer, task, queries, self.pad_id, self.system.vocab_size,
                                   config.batch_size)
            grades = [e.choice_scores[p] if e.choice_scores else float(p == e.correct) for e, p in zip(queries, picks)]
            return {"accuracy": sum(grades) / len(grades), "grades": grades,
                    "samples": [queries[i].choices[picks[i]] for i in range(3) if i < len(queries)]}
        prompts = [prompt_ids(self.tokenizer, task, e) for e in queries]
        longest = max(len(answer_ids(self.tokenizer, t)) for e in queries for t in e.targets)
        max_new = min(longest + 4, config.max_new_tokens)
        stops = tuple(s for s in ("\n", task.stop_string) if s)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
        texts = [""] * len(prompts)
        for start in range(0, len(order), config.batch_size):
            chunk = order[start:start + config.batch_size]
            result = self.engine.generate([prompts[i] for i in chunk], max_new_tokens=max_new, stop_strings=stops)
            for i, text in zip(chunk, result.texts):
                texts[i] = text
        answers = [extract_answer(t, task.stop_string, task.output_regex) for t in texts]
        matches = [exact_match(a, e.targets) for a, e in zip(answers, queries)]
        return {"accuracy": sum(m[0] for m in matches) / len(matches), "grades": [float(m[0]) for m in matches],
                "accuracy_case_insensitive": sum(m[1] for m in matches) / len(matches),
                "max_new_tokens": max_new, "samples": answers[:3]}

    def run(self, task, support, queries) -> dict:
        pairs = [(prompt_ids(self.tokenizer, task, e),
                  answer_ids(self.tokenizer, e.target if e.target is not None else e.choices[e.correct], eos=True))
                 for e in support]
        methods, adaptations = {}, {}  # a routed method reuses its unrouted twin's adaptation (and its seconds)
        for method in self.config.methods:
            routed, unrouted = method.endswith(ROUTED), method.removesuffix(ROUTED)
            if unrouted not in adaptations:
                adaptations[unrouted] = self.adapt(unrouted, task, support, pairs)
            adaptation = adaptations[unrouted]
            set_all_rows(self.dyn.state, adaptation.blend, adaptation.generated)
            if routed:
                self.router.attach(self.dyn)
            try:
                scores = self.score(task, queries)
                support_nll = self.support_nll(pairs, adaptation.blend, adaptation.generated)
            finally:
                if routed:
                    self.router.detach(self.dyn)
            methods[method] = {"accuracy": scores.pop("accuracy"), "adapt_seconds": adaptation.seconds, **scores,
                               "support_nll": round(support_nll, 4), "blend": [round(w, 4) for w in adaptation.blend],
                               **adaptation.extra}
        self.dyn.state.reset()
        return methods


# -- the command ---------------------------------------------------------------------------------------
def eval_tasks(config: TaskEvalConfig, out: Path | None = None) -> dict:
    from dynalora.data import list_tasks, load_task
    from dynalora.runtime import Engine, EngineConfig, TriggerConfig
    from dynalora.system.assemble import load_shift_system

    torch.set_num_threads(config.threads)
    held_out = library_held_out(config.library_dir)
    names = list(config.tasks or held_out)
    library = json.loads((Path(config.library_dir) / "library.json").read_text())
    sources = [a["source"] for a in library["config"]["adapters"]]
    check_tasks(names, list_tasks(progress=False), held_out, config.allow_library_tasks, sources)
    tasks = [load_task(name, progress=False) for name in names]
    for task in tasks:
        if task.metric not in ("exact_match", "multiple_choice"):
            raise ValueError(f"--tasks: {task.name!r} is scored by {task.preferred_score} in BIG-Bench (free text); "
                             "choose an exact-match or multiple-choice task")
    started_run = time.perf_counter()
    system = load_shift_system(config.library_dir, config.shift_dir, config.triggers_dir, config.model,
                               max_batch=max(config.batch_size, config.support), use_factors=config.use_factors,
                               device=config.device, dtype=config.dtype)
    system.capture.window = system.net.config.pool_window  # as the engine pools its features
    system.capture.enabled = False  # only the dynalora feature passes capture
    engine = Engine(system.dyn, system.base.tokenizer, None, TriggerConfig(), EngineConfig(sample_triggers=False))
    router = None
    if any(m.endswith(ROUTED) for m in config.methods):
        from dynalora.hyper.router import TokenRouter

        router = TokenRouter.from_pretrained(config.router_dir, system.dyn.state.device)
    runner = TaskRunner(system, config, engine, router)
    with torch.no_grad():  # warm-up, untimed, so no method pays the first forward's allocations
        system.dyn(input_ids=torch.tensor([[runner.pad_id] * 8], device=model_device(system.dyn.model)),
                   use_cache=False)

    per_task = {}
    for task in tasks:
        (support, support_pool), (queries, query_pool) = sample_examples(task, config.support, config.max_queries,
                                                                         config.seed, tuple(config.query_splits))
        task_started = time.perf_counter()
        methods = runner.run(task, support, queries)
        per_task[task.name] = {"metric": task.metric, "queries": len(queries), "support": len(support),
                               "train_examples": support_pool, "query_pool": query_pool,
                               "description": description_text(task),
                               "seconds": round(time.perf_counter() - task_started, 1), "methods": methods}
        logger.info(f"{task.name}: " + ", ".join(f"{m} {v['accuracy']:.3f}" for m, v in methods.items()))
    engine.close()
    system.close()

    mean = {m: {"accuracy": sum(t["methods"][m]["accuracy"] for t in per_task.values()) / len(per_task),
                "adapt_seconds": sum(t["methods"][m]["adapt_seconds"] for t in per_task.values()) / len(per_task)}
            for m in config.methods}
    ratios = {}
    for slow in ("lorahub", "best_adapter"):
        for fast in ("dynalora_examples", "dynalora_description"):
            if slow in mean and fast in mean and mean[fast]["adapt_seconds"] > 0:
                ratios[f"{slow}_over_{fast}_seconds"] = mean[slow]["adapt_seconds"] / mean[fast]["adapt_seconds"]
    targets = {}
    for fast in ("dynalora_examples", "dynalora_description"):
        if fast not in mean:
            continue
        acc = mean[fast]["accuracy"]
        for other, relation in (("base", "above"), ("uniform_merge", "above"), ("lorahub", "at_least")):
            if other in mean:
                ok = acc > mean[other]["accuracy"] if relation == "above" else acc >= mean[other]["accuracy"]
                targets[f"{fast}_{relation}_{other}"] = ok
        if f"lorahub_over_{fast}_seconds" in ratios:
            targets[f"{fast}_100x_faster_than_lorahub"] = ratios[f"lorahub_over_{fast}_seconds"] >= 100
    grades = {m: {name: t["methods"][m]["grades"] for name, t in per_task.items()} for m in config.methods}
    intervals = bootstrap_intervals(grades, config.seed)
    result = {
        "tasks": per_task, "mean": mean, "intervals": intervals, "ratios": ratios, "targets": targets,
        "splits": {"support": f"{config.support} examples sampled (seed {config.seed}) from each task's "
                              f"{SUPPORT_SPLIT} split",
                   "queries": f"up to {config.max_queries} examples sampled (seed {config.seed}) from each task's "
                              f"{' + '.join(config.query_splits)} split",
                   "by": "hash of the example input (dynalora.data.split_examples)"},
        "held_out_from_library": [n for n in names if n in held_out],
        "config": {"support": config.support, "max_queries": config.max_queries, "seed": config.seed,
                   "query_splits": config.query_splits,
                   "lorahub_steps": config.lorahub_steps, "lorahub_l1": config.lorahub_l1,
                   "lorahub_bound": config.lorahub_bound, "max_new_tokens": config.max_new_tokens,
                   "use_factors": config.use_factors, "threads": config.threads},
        "wall_seconds": round(time.perf_counter() - started_run, 1),
    }
    return report(result, format_tasks_table(result), out)


def bootstrap_intervals(grades: dict[str, dict[str, list[float]]], seed: int = 0, resamples: int = 2000,
                        level: float = 0.95) -> dict:
    """Confidence intervals of the mean accuracy over tasks (``grades[method][task]``: per-query grades), by a paired
    bootstrap: each resample draws every task's queries with replacement, the same draw for every method, so a
    difference between two methods is resampled as a difference. Returns each method's interval and, for every
    dynalora method against every other, the difference's mean and interval (``real``: the interval excludes 0)."""
    generator = torch.Generator().manual_seed(seed)
    methods = list(grades)
    tasks = list(grades[methods[0]])
    draws = torch.zeros(len(methods), resamples)  # (M, R): mean accuracy over tasks in each resample
    for task in tasks:
        table = torch.tensor([grades[m][task] for m in methods])  # (M, n)
        index = torch.randint(table.shape[1], (resamples, table.shape[1]), generator=generator)  # (R, n)
        draws += table[:, index].mean(-1) / len(tasks)  # (M, R)
    low, high = (1 - level) / 2, (1 + level) / 2

    def interval(values: torch.Tensor) -> list[float]:
        return [round(float(values.quantile(low)), 4), round(float(values.quantile(high)), 4)]

    out = {"level": level, "resamples": resamples, "methods": {m: interval(draws[i]) for i, m in enumerate(methods)},
           "differences": {}}
    for i, fast in enumerate(methods):
        if not fast.startswith("dynalora"):
            continue
        for j, other in enumerate(methods):
            if j != i:
                values = draws[i] - draws[j]
                bounds = interval(values)
                mean = sum(sum(grades[fast][t]) / len(grades[fast][t]) - sum(grades[other][t]) / len(grades[other][t])
                           for t in tasks) / len(tasks)
                out["differences"][f"{fast} - {other}"] = {"mean": round(mean, 4), "interval": bounds,
                                                          "real": bounds[0] > 0 or bounds[1] < 0}
    return out


def format_tasks_table(result: dict) -> str:
    """Methods × tasks accuracy, then mean accuracy and mean adaptation seconds."""
    names = list(result["tasks"])
    short = [n if len(n) <= 14 else n[:13] + "…" for n in names]
    lines = [f"{'method':<22}" + "".join(f"{s:>15}" for s in short) + f"{'mean acc':>10}{'adapt s':>10}"]
    for method, m in result["mean"].items():
        cells = "".join(f"{result['tasks'][n]['methods'][method]['accuracy']:>15.3f}" for n in names)
        lines.append(f"{method:<22}{cells}{m['accuracy']:>10.3f}{m['adapt_seconds']:>10.3f}")
    for key, value in result.get("ratios", {}).items():
        lines.append(f"{key}: {value:.1f}×")
    intervals = result.get("intervals", {})
    for name, d in intervals.get("differences", {}).items():
        verdict = "real" if d["real"] else "not separated"
        lines.append(f"{name}: {d['mean']:+.3f} [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}] ({verdict})")
    return "\n".join(lines)
