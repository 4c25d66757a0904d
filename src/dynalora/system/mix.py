"""The mix system: base model, library bank and memory slots, the shift network and the absorber in one object,
and the mixed NLL of shift and memory LoRAs the mix gate is trained and evaluated on."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dynalora.hyper.shift_net import gated_answer
from dynalora.models import model_device
from dynalora.system.assemble import EngineSpec, System


@dataclass
class MixExample:
    features: torch.Tensor
    """(H,) the pooled state vector at the trigger."""
    blend: torch.Tensor
    """(K,) the shift network's blend there."""
    document: int
    """Index of the absorbed document in memory."""
    tokens: list[int]
    scored: int
    """The last ``scored`` tokens are scored."""
    kind: str
    """``domain`` or ``facts``."""


class MixSetup:
    """The assembled system (:class:`System`: base model, library bank and memory slots, the shift network, the
    absorber) and the pooled-feature capture the gate's examples are read with."""

    def __init__(self, config, device: str | torch.device = "cpu", dtype: str = "float32"):
        self.system = System.from_checkpoints(EngineSpec(
            model=config.model, device=str(device), dtype=dtype, bank=config.library_dir, hypernetwork="shift",
            shift_dir=config.shift_dir, triggers=[], window=10**6, compressor=config.compressor_dir,
            absorber="compressor", max_batch=max(16, config.batch_size)))
        self.base, self.bank, self.adapters, self.dyn = (self.system.base, self.system.bank, self.system.adapters,
                                                         self.system.dyn)
        self.net, self.absorber, self.device = self.system.net, self.system.absorber, model_device(self.base.model)
        self.capture = self.system.capture
        self.capture.window = self.net.config.pool_window  # the features the network reads

    def close(self) -> None:
        self.system.close()

    @torch.no_grad()
    def blend_of(self, features: torch.Tensor) -> torch.Tensor:
        """The shift network's blend for ``features (N, H)`` against a zero current blend: ``(N, K)``."""
        out = self.net(features, with_factors=False)
        return gated_answer(out)[0]

    @torch.no_grad()
    def features_of(self, token_ids: list[int]) -> torch.Tensor:
        self.dyn.state.reset()
        self.capture.reset()
        self.dyn(input_ids=torch.tensor([token_ids], device=self.device), use_cache=False)
        return self.capture.pooled(0).float()  # (H,): what the networks read, whatever the model's dtype

    def memory_of(self, text: str) -> dict:
        """The memory LoRA the absorber writes for a document: ``{module: (A (r, in), B (out, r))}``."""
        state = self.dyn.state
        state.reset(0)
        self.absorber.absorb_text(0, self.base.tokenizer(text, add_special_tokens=False)["input_ids"])
        memory = {m: (a.clone(), b.clone()) for m, (a, b) in state.row_factors(0, "memory").items()}
        state.reset(0)
        return memory


def mix_examples(setup: MixSetup, config, docs: list[dict], split: str, seed: int) -> tuple[list[MixExample], list]:
    """Domain and facts examples (see the module docstring) and each document's memory."""
    from dynalora.runtime.chat import answer_tokens, chat_prompt, end_of_turn_id
    from dynalora.data.batches import build_examples

    tokenizer, rng = setup.base.tokenizer, random.Random(seed)
    memories = [setup.memory_of(d["context"]) for d in tqdm(docs, desc="absorb documents", leave=False)]
    examples = []
    contexts, continuations, _ = build_examples(tokenizer, setup.adapters, config, split, config.examples_per_domain,
                                                seed)
    for context, continuation in tqdm(list(zip(contexts.tolist(), continuations.tolist())), desc="domain examples",
                                      leave=False):
        features = setup.features_of(context)
        examples.append(MixExample(features, setup.blend_of(features[None])[0], rng.randrange(len(docs)),
                                   continuation, len(continuation) - 1, "domain"))
    end_id = end_of_turn_id(tokenizer)
    for index, doc in enumerate(tqdm(docs, desc="facts examples", leave=False)):
        for qa in doc["questions"]:
            prompt = chat_prompt(tokenizer, qa["question"])
            answer = answer_tokens(tokenizer, qa["answer"], end_id)
            features = setup.features_of(prompt)
            examples.append(MixExample(features, setup.blend_of(features[None])[0], index, prompt + answer,
                                       len(answer), "facts"))
    setup.dyn.state.reset()
    return examples, memories


def mixed_nll(setup: MixSetup, examples: list[MixExample], memories: list[dict], weights: torch.Tensor) -> torch.Tensor:
    """Per-example NLL ``(N,)`` of the scored tokens with ``weights (N, 2)`` = ``(w_shift, w_memory)`` per row."""
    from dynalora.runtime.chat import answer_log_probs

    state, rank = setup.dyn.state, setup.dyn.state.config.memory_rank
    blends = torch.stack([e.blend for e in examples])  # (N, K)
    factors = {}
    for module in state.modules:
        a_t, b_t = [], []
        for e in examples:
            in_features, out_features = state.bank.module_shapes[module]
            lora_a, lora_b = memories[e.document].get(module, (torch.zeros(0, in_features, device=setup.device),
                                                               torch.zeros(out_features, 0, device=setup.device)))
            pad = rank - lora_a.shape[0]
            a_t.append(F.pad(lora_a.T, (0, pad)))  # (in, R)
            b_t.append(F.pad(lora_b.T, (0, 0, 0, pad)))  # (R, out)
        factors[module] = (torch.stack(a_t), torch.stack(b_t) * weights[:, 1, None, None])  # (N, in, R), (N, R, out)
    with state.functional(state.expand_blend(weights[:, :1] * blends), factors):
        log_probs = answer_log_probs(setup.dyn.model, [e.tokens for e in examples], [e.scored for e in examples],
                                     setup.base.tokenizer.pad_token_id or 0, setup.device)
    targets = torch.tensor([t for e in examples for t in e.tokens[-e.scored:]], device=setup.device)
    nll = -log_probs.gather(1, targets[:, None])[:, 0]  # (sum scored,)
    return torch.stack([part.mean() for part in nll.split([e.scored for e in examples])])


def score_mixes(setup: MixSetup, examples, memories, gate=None, batch_size: int = 8) -> dict:
    """Mean NLL per example kind for every fixed mix and (given) the gate: ``{method: {kind: nll}}``,
    with the gate's mean weights per kind."""
    methods = dict(FIXED_MIXES) | ({"gate": None} if gate is not None else {})
    result = {}
    with torch.no_grad():
        for name, fixed in methods.items():
            values, used = [], []
            for start in tqdm(range(0, len(examples), batch_size), desc=f"score {name}", leave=False):
                batch = examples[start:start + batch_size]
                weights = gate(torch.stack([e.features for e in batch])) if fixed is None else \
                    torch.tensor([fixed] * len(batch), device=setup.device)
                values.append(mixed_nll(setup, batch, memories, weights))
                used.append(weights)
            values, used = torch.cat(values), torch.cat(used)
            result[name] = {}
            for kind in ("domain", "facts"):
                mask = torch.tensor([e.kind == kind for e in examples], device=values.device)
                result[name][kind] = float(values[mask].mean())
                result[name][f"{kind}_weights"] = used[mask].mean(0).tolist()
    return result


FIXED_MIXES = {"base": (0.0, 0.0), "shift_only": (1.0, 0.0), "absorb_only": (0.0, 1.0), "fixed_half": (0.5, 0.5),
               "both": (1.0, 1.0)}
"""Baselines: fixed ``(w_shift, w_memory)`` for every row."""
