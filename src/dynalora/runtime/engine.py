"""The generation loop: a batch of rows, each with its own LoRA, triggers and stop condition.

``Engine.stream`` yields :class:`TokenEvent` / :class:`LoraEvent` / :class:`FinishEvent` as they happen;
``Engine.generate`` collects them. When a row's trigger fires, the hypernetwork reads that row's
features (captured by a hook in the forward pass that just ran), the update is checked by the guard
and written in place, the KV cache is handled per ``kv_policy``, and generation goes on: the next
forward of that row runs under the new LoRA. A trigger token the model samples is consumed: never shown
and never fed back (the trigger rows are fitted on text without them); the row takes its best ordinary
token at that step instead, from the logits the KV policy gives under the new LoRA when the trigger fired.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from transformers import DynamicCache, LogitsProcessorList
from transformers import LogitsProcessor as HFLogitsProcessor

from dynalora.hyper.protocol import Hypernetwork, TriggerFeatures
from dynalora.lora.inject import DynamicLoraModel
from dynalora.models import model_device
from dynalora.runtime.absorb import Absorber
from dynalora.runtime.absorb_worker import AbsorbWorker
from dynalora.runtime.events import Event, FinishEvent, GenerationResult, LoraEvent, TokenEvent
from dynalora.runtime.detokenize import IncrementalDecoder
from dynalora.runtime.features import HiddenCapture
from dynalora.runtime.guard import GuardConfig
from dynalora.runtime.sampling import SamplingConfig, choose_next
from dynalora.runtime.decode_batch import DecodeBatch, join_caches, select_cache
from dynalora.runtime.triggers import DelayedUpdate, RowTriggers, StepObservation, TriggerConfig
from dynalora.runtime.update import apply_update

KV_POLICIES = ("keep", "recompute_last", "recompute_all")
LogitsProcessor = Callable[[int, torch.Tensor], torch.Tensor] | HFLogitsProcessor | LogitsProcessorList
"""``(step, logits (B, V)) -> logits``, or transformers' processors (called with the ids so far and the logits)."""


@dataclass
class EngineConfig:
    kv_policy: str = "keep"
    """After a LoRA change: ``keep`` the cached keys/values (cheapest; past positions keep the old
    LoRA's view), ``recompute_last`` the last ``recompute_tokens`` positions, or ``recompute_all``
    (exactly a fresh forward under the new LoRA; costs a prefill of the row)."""
    recompute_tokens: int = 32
    feature_layer: int | None = None
    """Decoder layer whose hidden states feed the hypernetwork (default: the middle one)."""
    pool_window: int = 32
    """Recent positions averaged into the pooled feature."""
    sample_triggers: bool = True
    """Let trigger tokens be sampled (then consumed). False masks them out of sampling: for triggers
    read from p(token) by a ``TokenProbability`` policy, which still sees the unmasked probability."""
    update_delay: int = 0
    """Apply a fired update this many tokens later, with the features of that moment: a trigger fires a
    few tokens into new text, when the pooled window still holds mostly the old text."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    merge_alone: bool = False
    """With one row, fold its whole LoRA into the base weights between changes (``DynamicLoraModel.merge_row``):
    decoding then costs what the base model's does; any change takes it out exactly first. Outputs equal the
    unmerged engine's up to float rounding."""
    route_report: float = 0.25
    """With a token router: a row reports its routed blend (a ``route`` event) when it has moved this much (L1) since
    the blend it last reported — readable events, not one a token."""
    background_absorb: bool = False
    """With an absorber: write a chunk that leaves the window on a background thread while the row goes on
    generating with it still in context; the new memory is merged, and the chunk evicted, at the first step
    boundary after the write finishes (:mod:`dynalora.runtime.absorb_worker`)."""

    def __post_init__(self):
        if self.kv_policy not in KV_POLICIES:
            raise ValueError(f"EngineConfig.kv_policy={self.kv_policy!r}: choose one of {KV_POLICIES}")
        if self.recompute_tokens < 1 or self.pool_window < 1:
            raise ValueError("EngineConfig.recompute_tokens and pool_window must be ≥ 1")
        if self.update_delay < 0:
            raise ValueError(f"EngineConfig.update_delay must be ≥ 0, got {self.update_delay}")


@dataclass
class RowSettings:
    """What one row generates: how many tokens, how it samples, where it stops. Rows of one ``stream`` share one;
    each request of a server has its own (its own seed: a sampled row draws the same tokens alone or batched)."""

    max_new_tokens: int
    sampling: SamplingConfig
    stop_strings: tuple[str, ...] = ()
    generator: torch.Generator | None = None
    ignore_eos: bool = False
    """Go on past end-of-text tokens (shown as text) until ``max_new_tokens``: fixed-length runs for benchmarks."""
    triggers: TriggerConfig | None = None
    """The row's own trigger policies (a server request's); None: the engine's."""

    def sampling_group(self) -> tuple:
        """Rows with equal groups are sampled in one call: greedy rows together, sampled rows by their settings."""
        if self.sampling.greedy:
            return ("greedy", self.sampling.repetition_penalty)
        return ("sampled", id(self))


@dataclass
class _Row:
    """One row's generation state: its settings, trigger policies, delayed update, text so far, done or not."""

    settings: RowSettings
    triggers: RowTriggers
    delayed: DelayedUpdate
    text: IncrementalDecoder
    produced: int = 0
    finished: bool = False
    reported_route: torch.Tensor | None = None
    """(K,) the routed blend this row last reported (token router only)."""


class Engine:
    """Example::

        engine = Engine(dyn, tokenizer, NearestPrototype(...), TriggerConfig([SpecialToken(ids)]))
        for event in engine.stream(["Write a sonnet"], max_new_tokens=64):
            print(event)
    """

    def __init__(self, dyn: DynamicLoraModel, tokenizer=None, hypernetwork: Hypernetwork | None = None,
                 triggers: TriggerConfig | None = None, config: EngineConfig | None = None,
                 absorber: Absorber | None = None):
        self.dyn = dyn
        self.absorber = absorber
        """With an :class:`Absorber`, a row past ``absorber.config.window`` tokens absorbs its oldest chunk
        into its memory LoRA and drops it (see :meth:`_evict`)."""
        self.model = dyn.model
        self.device = model_device(self.model)
        """Where every tensor the engine makes lives: the model's device."""
        self.tokenizer = tokenizer
        self.hypernetwork = hypernetwork
        self.triggers = triggers or TriggerConfig()
        self.config = config or EngineConfig()
        self.capture = HiddenCapture(self.model, self.config.feature_layer, self.config.pool_window)
        self.trigger_token_ids: dict[str, int] = dict(getattr(self.model.config, "dynalora_trigger_tokens", {}) or {})
        self.eos_ids = self._eos_ids()
        self.interrupted = False
        self.worker = AbsorbWorker(absorber) if absorber is not None and self.config.background_absorb else None

    # -- helpers ----------------------------------------------------------------------------------
    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if value is not None:
                ids.update(value if isinstance(value, (list, tuple)) else [value])
        return ids

    def _pad_id(self) -> int:
        for source in (self.tokenizer, getattr(self.model, "generation_config", None), self.model.config):
            value = getattr(source, "pad_token_id", None) if source is not None else None
            if value is not None:
                return value
        return next(iter(self.eos_ids), 0)

    def encode_prompt(self, prompt: str | list[int], chat: bool = False, system: str | None = None) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer; pass token ids to a model without one")
        if chat:
            return self.encode_messages([{"role": "user", "content": prompt}], system)
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def encode_messages(self, messages: list[dict[str, str]], system: str | None = None) -> list[int]:
        """A conversation (``[{"role", "content"}, ...]``, after an optional system prompt) through the tokenizer's
        chat template, ready for the assistant's turn."""
        messages = ([{"role": "system", "content": system}] if system else []) + list(messages)
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, token_ids))
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    @torch.no_grad()
    def encode_text(self, text: str | list[int]) -> torch.Tensor:
        """(H,) pooled feature-layer hidden state of a text (no LoRA change): builds prototypes."""
        ids = torch.tensor([self.encode_prompt(text)], device=self.device)
        self.capture.reset()
        saved_window, self.capture.window = self.capture.window, ids.shape[1]
        try:
            with self.dyn.state.use_rows(0):
                self.model(input_ids=ids, use_cache=False)
            return self.capture.pooled(0).clone()
        finally:
            self.capture.window = saved_window
            self.capture.reset()

    def _forward(self, batch: DecodeBatch, new_tokens: int, cache: DynamicCache) -> torch.Tensor:
        """Feed the last ``new_tokens`` positions of every row; returns next-token logits (B, V)."""
        self.capture.expect(batch.mask[:, -new_tokens:])
        out = self.model(input_ids=batch.ids[:, -new_tokens:], attention_mask=batch.mask,
                         position_ids=batch.positions[:, -new_tokens:], cache=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1].float()

    def _forward_prompt(self, batch: DecodeBatch, cache: DynamicCache, want_all: bool) -> torch.Tensor:
        self.capture.expect(batch.mask)
        out = self.model(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.positions, cache=cache,
                         use_cache=True, logits_to_keep=0 if want_all else 1)
        return out.logits.float()  # (B, T or 1, V)

    @torch.no_grad()
    def _recompute_row(self, row: int, count: int | None) -> tuple[int, torch.Tensor]:
        """Recompute the last ``count`` cached positions of ``row`` (all if None) under its current LoRA.

        Returns the number of positions and the fresh next-token logits ``(V,)`` of the last cached one."""
        batch, cache = self._batch, self._cache
        length = cache.get_seq_length()
        count = length if count is None else min(count, length)
        keep = length - count
        temp = DynamicCache(config=self.model.config)
        if keep:
            for index, layer in enumerate(cache.layers):
                temp.update(layer.keys[row:row + 1, :, :keep].clone(), layer.values[row:row + 1, :, :keep].clone(),
                            index)
        self.capture.enabled = False
        try:
            with self.dyn.state.use_rows(row):
                out = self.model(input_ids=batch.ids[row:row + 1, keep:length],
                                 attention_mask=batch.mask[row:row + 1, :length],
                                 position_ids=batch.positions[row:row + 1, keep:length], cache=temp, use_cache=True,
                                 logits_to_keep=1)
        finally:
            self.capture.enabled = True
        for layer, fresh in zip(cache.layers, temp.layers):
            layer.keys[row, :, keep:length] = fresh.keys[0, :, keep:length]
            layer.values[row, :, keep:length] = fresh.values[0, :, keep:length]
        return count, out.logits[0, -1].float()

    def _apply(self, row: int, position: int, reason: str) -> LoraEvent:
        """Run the hypernetwork for one row and apply its answer (:func:`apply_update`). After a recompute,
        ``self.fresh_logits[row]`` holds the row's next-token logits under the new LoRA."""
        features = TriggerFeatures(row=row, position=position, reason=reason,
                                   trigger_hidden=self.capture.last(row), pooled_hidden=self.capture.pooled(row),
                                   token_ids=self._batch.row_tokens(row))
        event = apply_update(self.dyn.state, self.hypernetwork, features, self.config.guard)
        if event.kind == "shift" and self.config.kv_policy != "keep":
            count = None if self.config.kv_policy == "recompute_all" else self.config.recompute_tokens
            started = time.perf_counter()
            recomputed, self.fresh_logits[row] = self._recompute_row(row, count)
            event.seconds += time.perf_counter() - started
            event.detail += f"; recomputed {recomputed} cached positions"
        return event

    # -- the loop ---------------------------------------------------------------------------------
    def stream(self, *args, **kwargs) -> Iterator[Event]:
        """Generate for every prompt (one row each, row ``b`` uses LoRA state row ``b``); see :meth:`_stream`. A row
        merged into the weights while it ran (``EngineConfig.merge_alone``) is taken out when it ends."""
        try:
            yield from self._stream(*args, **kwargs)
        finally:
            self.dyn.unmerge()

    @torch.no_grad()
    def _stream(self, prompts: list[str | list[int]], max_new_tokens: int = 128,
                sampling: SamplingConfig | None = None, stop_strings: tuple[str, ...] = (), chat: bool = False,
                system: str | None = None, logits_processor: LogitsProcessor | None = None) -> Iterator[Event]:
        """Generate for every prompt (one row each, row ``b`` uses LoRA state row ``b``): the rows join together
        and run until all are finished (:meth:`start`, :meth:`join`, :meth:`step`, :meth:`advance`)."""
        sampling = sampling or SamplingConfig.from_generation_config(getattr(self.model, "generation_config", None))
        if isinstance(prompts, (str, bytes)):
            raise TypeError("prompts is a list (one prompt per row); wrap a single prompt in a list")
        rows = [self.encode_prompt(p, chat, system) for p in prompts]
        generator = (torch.Generator(device=self.device).manual_seed(sampling.seed) if sampling.seed is not None
                     else None)
        settings = RowSettings(max_new_tokens, sampling, tuple(stop_strings), generator)
        self.start(logits_processor)
        yield from self.join(rows, [settings] * len(rows))
        for _ in range(max_new_tokens):
            yield from self.step()
            if all(row.finished for row in self._rows):
                break
            yield from self.advance()
        if self.worker is not None:  # writes still in flight are dropped: their tokens never left the context
            self.worker.collect(wait=True)

    def start(self, logits_processor: LogitsProcessor | None = None) -> None:
        """Begin a run with no rows, on the calling thread: rows :meth:`join` it, each :meth:`step` chooses a token
        for every unfinished row, :meth:`leave` drops the finished ones, :meth:`advance` runs the forward that gives
        the next step's logits. A server joins requests between steps (continuous batching)."""
        self.capture.follow_current_thread()  # whichever thread runs this run
        self.evicted_tokens: dict[int, int] = {}  # row -> tokens absorbed and dropped during this run
        self.absorb_failed: set[int] = set()  # rows whose background write failed: no new one this run
        if self.worker is not None:
            self.worker.collect(wait=True)  # an abandoned run's writes are dropped: their tokens were not evicted
        self._rows: list[_Row] = []
        self._batch: DecodeBatch | None = None
        self._cache: DynamicCache | None = None
        self._logits: torch.Tensor | None = None  # (B, V): every row's next-token logits
        self._seen: torch.Tensor | None = None  # (B, V) bool: tokens already in each row (repetition penalty)
        self._logits_processor = logits_processor
        self._steps = 0  # steps taken by this run (what a ``(step, logits)`` processor is given)
        self.capture.reset()
        self.interrupted = False
        self.fresh_logits: dict[int, torch.Tensor] = {}

    @property
    def running_rows(self) -> int:
        """Rows in the run (finished ones included until :meth:`leave`)."""
        return len(self._rows)

    def row_finished(self, row: int) -> bool:
        return self._rows[row].finished

    def cancel(self, row: int) -> None:
        """Finish a row now, without a :class:`FinishEvent` (its client is gone); it leaves at the next
        :meth:`leave`."""
        self._rows[row].finished = True

    @torch.no_grad()
    def join(self, prompts: list[list[int]], settings: list[RowSettings]) -> Iterator[Event]:
        """Add rows below the running ones: they take the next LoRA state rows (``running_rows`` onwards: set their
        LoRA there first), are prefilled on their own and padded to the batch's length. Prompt-time events follow
        (absorbing a prompt longer than the window, triggers on the prompt)."""
        first, count = len(self._rows), len(prompts)
        if not prompts or any(len(r) == 0 for r in prompts):
            raise ValueError("every prompt needs at least one token")
        if first + count > self.dyn.state.max_batch:
            raise ValueError(f"{first + count} rows, but the LoRA state holds {self.dyn.state.max_batch} "
                             "(StateConfig.max_batch)")
        rows = [list(p) for p in prompts]
        if self.absorber is not None:  # a prompt longer than the window is absorbed before the prefill
            for i in range(count):
                rows[i], events = self._evict_row(first + i, rows[i])
                yield from events
            if self.absorber.config.relevance_gate:  # memory on only for prompts that name what it absorbed
                for i, row in enumerate(rows):
                    self.dyn.state.set_memory_weight(first + i, self.absorber.relevance(first + i, self.decode(row)))
        new = [_Row(s, RowTriggers(self.triggers if s.triggers is None else s.triggers),
                    DelayedUpdate(self.config.update_delay),
                    IncrementalDecoder(self.decode)) for s in settings]
        batch = DecodeBatch(rows, self._pad_id(), self.device, room=max(s.max_new_tokens for s in settings))
        cache = DynamicCache(config=self.model.config)
        want_prompt = any(row.triggers.wants_prompt for row in new)
        earlier = self.capture.take()
        with self.dyn.state.use_rows(first):
            logits_all = self._forward_prompt(batch, cache, want_all=want_prompt)  # (k, T|1, V)
        self.capture.put_above(earlier)
        seen = torch.zeros(count, logits_all.shape[-1], dtype=torch.bool, device=self.device)  # (k, V)
        if any(s.sampling.repetition_penalty != 1.0 for s in settings):
            seen.scatter_(1, batch.ids, batch.mask.bool())
        if self._batch is None:
            self._batch, self._cache = batch, cache
            self._logits, self._seen = logits_all[:, -1], seen
        else:
            join_caches(self._cache, cache, self._batch.join(batch))
            self._logits = torch.cat([self._logits, logits_all[:, -1]])
            self._seen = torch.cat([self._seen, seen])
        self._rows += new
        if want_prompt:  # policies that look at the prompt: p(trigger), surprise
            yield from self._observe_prompt(logits_all, range(first, first + count))
            for b, fresh in self.fresh_logits.items():  # a recompute after a prompt trigger
                self._logits[b] = fresh
            self.fresh_logits.clear()

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row (``logits (B, V)`` → ``(B,)``), each row by its own settings; rows that sample alike
        (:meth:`RowSettings.sampling_group`) in one call."""
        groups: dict[tuple, list[int]] = {}
        for b, row in enumerate(self._rows):
            groups.setdefault(row.settings.sampling_group(), []).append(b)
        if len(groups) == 1:
            settings = self._rows[0].settings
            return choose_next(logits, self._seen, settings.sampling, settings.generator)
        tokens = torch.empty(len(self._rows), dtype=torch.long, device=logits.device)
        for rows in groups.values():
            settings = self._rows[rows[0]].settings
            tokens[rows] = choose_next(logits[rows], self._seen[rows], settings.sampling, settings.generator)
        return tokens

    @torch.no_grad()
    def step(self) -> Iterator[Event]:
        """Choose the next token of every unfinished row from the logits at hand and emit what follows from it:
        a consumed trigger's update, the token, suppressed triggers, a delayed update that is due, the row's finish."""
        batch, logits, pad = self._batch, self._logits, self._pad_id()
        trigger_ids = set(self.trigger_token_ids.values())
        trigger_names = {v: k for k, v in self.trigger_token_ids.items()}
        if (self.config.merge_alone and len(self._rows) == 1 and self.dyn.state.merged_row is None
                and self.dyn.state.router is None):  # a routed row's LoRA changes at every token: never merged
            self.dyn.merge_row(0)  # taken out again by the next write to the state
        processor = self._logits_processor
        if isinstance(processor, (HFLogitsProcessor, LogitsProcessorList)):
            logits = processor(batch.ids, logits)  # transformers' processors see the ids so far
        elif processor is not None:
            logits = processor(self._steps, logits)
        log_probs = torch.log_softmax(logits, dim=-1)  # (B, V), trigger tokens included
        if not self.config.sample_triggers and trigger_ids:
            logits = logits.clone()
            logits[:, list(trigger_ids)] = float("-inf")
        next_tokens = self._choose(logits)  # (B,)
        routes = self._routed_blends()  # (B, K) or None
        length = self._cache.get_seq_length() + 1
        decisions: dict[int, tuple[str | None, str | None, LoraEvent | None]] = {}
        for b, row in enumerate(self._rows):
            if row.finished:
                next_tokens[b] = pad
                continue
            token = int(next_tokens[b])
            position = int(batch.mask[b].sum())  # where this step's token goes
            obs = StepObservation(position=position, token_id=token, token_nll=-float(log_probs[b, token]),
                                  trigger_probs={t: float(log_probs[b, t].exp()) for t in trigger_ids},
                                  context_length=length)
            reason, held_back = row.triggers.observe(obs)
            applied = None
            if token in trigger_ids:
                # consumed: fired or not, a trigger never enters the context (the trigger rows were fitted,
                # and every evaluation runs, on contexts without one; one left there makes the next likelier).
                # The row takes its best ordinary token at this step: after a fired update, from the logits
                # the KV policy recomputed under the new LoRA, else from this step's.
                source = logits[b]
                if reason is None:
                    held_back = held_back or f"token:{trigger_names[token]} (no policy fires on it)"
                elif not self.config.update_delay:
                    self.fresh_logits.pop(b, None)  # only logits this update recomputes may be used
                    applied = self._apply(b, position, reason)
                    source = self.fresh_logits.pop(b, source)
                ordinary = source[None].clone()  # (1, V)
                ordinary[:, list(trigger_ids)] = float("-inf")
                next_tokens[b] = choose_next(ordinary, self._seen[b:b + 1], row.settings.sampling,
                                             row.settings.generator)[0]
            decisions[b] = (reason, held_back, applied)
        self._seen.scatter_(1, next_tokens[:, None], True)
        batch.append(next_tokens)
        self._steps += 1
        for b, row in enumerate(self._rows):
            if row.finished:
                continue
            token = int(next_tokens[b])  # never a trigger: those were consumed above
            position = int(batch.mask[b].sum()) - 1
            reason, held_back, applied = decisions[b]
            if applied is not None:  # a consumed trigger's update: it came before this token
                yield applied
            if routes is not None:
                yield from self._report_route(b, row, position, routes[b])
            if token not in self.eos_ids or row.settings.ignore_eos:
                yield TokenEvent(row=b, position=position, token_id=token, text=row.text.add(token))
            if held_back:
                yield LoraEvent("suppressed", b, position, held_back, 0.0, None, None)
            due = row.delayed.due(reason) if applied is None else None
            if due:
                yield self._apply(b, position, due)
            row.produced += 1
            stop = self._stop_reason(token, row.text.text, row.settings)
            if stop or row.produced >= row.settings.max_new_tokens or self.interrupted:
                row.finished = True
                yield FinishEvent(row=b, reason=stop or ("interrupted" if self.interrupted else "length"))

    def _routed_blends(self) -> torch.Tensor | None:
        """``(B, K)``: the blend the token router gave each row's last position in the forward that made this step's
        logits (None without a router, or when that forward was not of the whole batch)."""
        routed = self.dyn.state.routed
        if self.dyn.state.router is None or routed is None or routed[0].shape[0] != len(self._rows):
            return None
        return routed[0][:, -1, ::self.dyn.state.bank_rank].float()  # rank weights repeat each blend weight r times

    def _report_route(self, b: int, row: _Row, position: int, blend: torch.Tensor) -> Iterator[LoraEvent]:
        """A ``route`` event when the row's routed blend moved ``route_report`` (L1) from the one it last reported."""
        before = row.reported_route if row.reported_route is not None else self.dyn.state.blend_weights[b].float()
        if float((blend - before).abs().sum()) >= self.config.route_report:
            row.reported_route = blend.clone()
            yield LoraEvent("route", b, position, "token router", 0.0, before.tolist(), blend.tolist(),
                            "the routed blend of this token (the row's blend is its prior)")

    @torch.no_grad()
    def advance(self) -> Iterator[Event]:
        """The forward after a step: every row's next-token logits, after absorbing what left the window."""
        finished = [row.finished for row in self._rows]
        if self.worker is not None:
            kept, events = self._absorb_in_background(finished)
            yield from events
            evicted = (kept, []) if kept is not None else None
        else:
            evicted = self._evict(finished) if self.absorber is not None else None
        if evicted:
            self._batch, events = evicted
            yield from events
            self._cache = DynamicCache(config=self.model.config)
            self.capture.reset()
            self._logits = self._forward_prompt(self._batch, self._cache, want_all=False)[:, -1]
        else:
            self._logits = self._forward(self._batch, 1, self._cache)

    def leave(self) -> list[int]:
        """Drop the finished rows: the others move up (LoRA state rows with them) and columns that are padding in all
        of them go. Returns the old indices of the rows kept, in their new order."""
        keep = [b for b, row in enumerate(self._rows) if not row.finished]
        if len(keep) == len(self._rows):
            return keep
        if self.worker is not None:
            raise ValueError("rows cannot leave a run that absorbs in the background (EngineConfig.background_absorb)")
        state = self.dyn.state
        for new, old in enumerate(keep):
            if new != old:
                state.restore(state.snapshot(old), new)
        for row in range(len(keep), len(self._rows)):
            state.reset(row)
        moved = {old: new for new, old in enumerate(keep)}
        self.evicted_tokens = {moved[b]: n for b, n in self.evicted_tokens.items() if b in moved}
        self.absorb_failed = {moved[b] for b in self.absorb_failed if b in moved}
        if self.absorber is not None:
            self.absorber.keep_rows(keep)
        self._rows = [self._rows[b] for b in keep]
        if not keep:
            self._batch = self._cache = self._logits = self._seen = None
            self.capture.reset()
            return keep
        select_cache(self._cache, keep, self._batch.select(keep))
        self.capture.select(keep)
        self._logits, self._seen = self._logits[keep], self._seen[keep]
        return keep

    def _room(self) -> int:
        """Columns a rebuilt batch reserves: the most tokens a running row may still add."""
        return max((row.settings.max_new_tokens - row.produced for row in self._rows), default=0)

    def _evict(self, finished: list[bool]) -> tuple[DecodeBatch, list[LoraEvent]] | None:
        """Absorb and drop the oldest chunk of every unfinished row past the window.

        Positions are renumbered: the kept tokens (sink + recent) sit at 0..n-1 and the cache is rebuilt
        by a fresh forward of them under each row's new LoRA — exactly the cache a fresh forward of the
        kept tokens gives (tested), at the cost of one prefill of the window per ``chunk_tokens`` tokens."""
        rows = [self._batch.row_tokens(b) for b in range(len(finished))]
        events = []
        for b, row in enumerate(rows):
            if not finished[b]:
                rows[b], row_events = self._evict_row(b, row)
                events += row_events
        return (DecodeBatch(rows, self._pad_id(), self.device, self._room()), events) if events else None

    def _absorb_in_background(self, finished: list[bool]) -> tuple[DecodeBatch | None, list[LoraEvent]]:
        """Merge every finished background write (evicting its chunk) and start one for every row past the
        window that has none in flight. Returns the batch after eviction (``None``: nothing was evicted) and
        the events in order: finished writes first, then the ones started."""
        config, state = self.absorber.config, self.dyn.state
        rows = [self._batch.row_tokens(b) for b in range(len(finished))]
        absorbed, events = [], []
        for job, factors, error in self.worker.collect():
            b, size = job.row, len(job.token_ids)
            if finished[b]:
                continue
            blend, seconds = state.blend_weights[b].tolist(), time.perf_counter() - job.started
            if error is None:
                try:
                    rank, cut = self.absorber.merge(b, factors, job.token_ids)
                except Exception as merge_error:  # noqa: BLE001 - a bad write must not stop generation
                    error = merge_error
            if error is not None:
                self.absorb_failed.add(b)
                events.append(LoraEvent("absorb_failed", b, len(rows[b]), "window", seconds, blend, blend,
                                        f"{type(error).__name__}: {error}; the memory is unchanged and the "
                                        f"{size} tokens stay in the window"))
                continue
            rows[b] = rows[b][:config.sink_tokens] + rows[b][config.sink_tokens + size:]
            self.evicted_tokens[b] = self.evicted_tokens.get(b, 0) + size
            absorbed.append(LoraEvent("absorb", b, len(rows[b]), "window (background)", seconds, blend, blend,
                                      f"absorbed {size} tokens into memory in {seconds:.2f} s while generating "
                                      f"(rank {rank}, rank-cut error {cut:.3f}); {len(rows[b])} tokens kept"))
        for b, row in enumerate(rows):
            if not finished[b] and len(row) > config.window and not self.worker.busy(b) and b not in self.absorb_failed:
                chunk = row[config.sink_tokens:config.sink_tokens + config.chunk_tokens]
                self.worker.start(b, chunk, row[config.sink_tokens + config.chunk_tokens:])
                blend = state.blend_weights[b].tolist()
                events.append(LoraEvent("absorb_start", b, len(row), "window", 0.0, blend, blend,
                                        f"writing {len(chunk)} tokens into memory in the background; they stay in "
                                        "the window until it is done"))
        return (DecodeBatch(rows, self._pad_id(), self.device, self._room()) if absorbed else None), absorbed + events

    def _evict_row(self, row: int, token_ids: list[int]) -> tuple[list[int], list[LoraEvent]]:
        """One row through the absorber: its kept tokens and an ``absorb`` event per chunk evicted."""
        kept, reports = self.absorber.evict(row, token_ids)
        self.evicted_tokens[row] = self.evicted_tokens.get(row, 0) + sum(r.tokens for r in reports)
        blend = self.dyn.state.blend_weights[row].tolist()
        return kept, [LoraEvent("absorb", row, len(kept), "window", r.seconds, blend, blend,
                                f"absorbed {r.tokens} tokens into memory (rank {r.memory_rank}, rank-cut error "
                                f"{r.rel_error:.3f}); {len(kept)} tokens kept in the window") for r in reports]

    def _observe_prompt(self, logits_all: torch.Tensor, rows: range) -> Iterator[Event]:
        """Show the prompt positions of the rows that just joined (``logits_all (k, T, V)``: theirs, at the batch's
        last ``T`` columns) to policies that want them; fire at most the rate limit allows."""
        width = logits_all.shape[1]
        ids, mask, positions = (t[rows.start:rows.stop, -width:] for t in (self._batch.ids, self._batch.mask,
                                                                           self._batch.positions))
        trigger_ids = list(self.trigger_token_ids.values())
        log_probs = torch.log_softmax(logits_all[:, :-1], dim=-1)  # (k, T-1, V): predicts positions 1..T-1
        targets = ids[:, 1:]
        nll = -log_probs.gather(2, targets[..., None]).squeeze(-1)  # (k, T-1)
        trigger_p = log_probs[..., trigger_ids].exp() if trigger_ids else None  # (k, T-1, n)
        length = self._cache.get_seq_length()
        for i, b in enumerate(rows):
            triggers = self._rows[b].triggers
            if not triggers.wants_prompt:
                continue
            real = mask[i, 1:].bool() & mask[i, :-1].bool()
            for t in torch.nonzero(real).flatten().tolist():
                obs = StepObservation(position=int(positions[i, t + 1]), token_id=int(targets[i, t]),
                                      token_nll=float(nll[i, t]), in_prompt=True, context_length=length,
                                      prompt_end=t == width - 2,
                                      trigger_probs={tid: float(trigger_p[i, t, j])
                                                     for j, tid in enumerate(trigger_ids)}
                                      if trigger_p is not None else {})
                reason, _ = triggers.observe(obs)
                if reason:  # features: the hidden states at the end of the prompt
                    yield self._apply(b, obs.position, f"prompt: {reason}")
                    break

    def _stop_reason(self, token: int, text: str, settings: RowSettings) -> str | None:
        if token in self.eos_ids and not settings.ignore_eos:
            return "eos"
        if any(stop and text.endswith(stop) for stop in settings.stop_strings):
            return "stop"
        return None

    def generate(self, prompts: list[str | list[int]], **kwargs) -> GenerationResult:
        """Run :meth:`stream` to the end and collect texts, visible token ids and events."""
        result = GenerationResult.empty(len(prompts))
        for event in self.stream(prompts, **kwargs):
            result.add(event)
        return result

    def close(self) -> None:
        self.capture.remove()
        if self.worker is not None:
            self.worker.close()
