"""The training recipes run for real on a tiny model with synthetic domains: a few steps, resume, outputs."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from dynalora.training import RunConfig
from dynalora.train import library as library_recipe
from dynalora.train.library import AdapterSpec, LibraryConfig, train_library

DOMAIN_TEXT = {"news": "the market rose today as traders bought shares. ",
               "scripture": "and the lord said unto them, go forth. ",
               "code-python": "def f(x):\n    return x + 1\n"}


def fake_stream(tokenizer, source, split, max_documents=None, seed=0):
    domain = source.partition(":")[2]
    rng = random.Random(hash((domain, split, seed)) % 1000)
    text = "".join(DOMAIN_TEXT[domain][rng.randrange(3):] for _ in range(60))
    return tokenizer(text)["input_ids"]


def fake_streams(config):
    """Streams of three synthetic domains, in a seeded order (stands in for ``build_streams``)."""
    rng = random.Random(config.seed)
    return [{"segments": [{"domain": d, "text": DOMAIN_TEXT[d] * 4} for d in rng.sample(list(DOMAIN_TEXT), 3)]}
            for _ in range(config.streams)]


@pytest.fixture
def synthetic_domains(monkeypatch):
    monkeypatch.setattr("dynalora.train.library.text_token_stream", fake_stream)
    monkeypatch.setattr("dynalora.data.batches.text_token_stream", fake_stream)


def library_config(tmp_path, steps=6):
    return LibraryConfig(
        adapters=[AdapterSpec(d, f"{d} text", f"domain:{d}") for d in DOMAIN_TEXT], out_dir=tmp_path / "library",
        model="tiny:llama", steps=steps, batch_size=2, seq_len=32, lr=1e-2, warmup_steps=1, eval_batches=2,
        run=RunConfig(checkpoint_every=2))


def test_library_recipe_trains_resumes_and_writes_peft_folders(tmp_path, synthetic_domains, monkeypatch):
    config = library_config(tmp_path)
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def failing_step(self, *args, **kwargs):  # interrupt the first adapter after 3 steps
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        train_library(config)
    saved = json.loads((config.out_dir / "news.partial" / "resume" / "progress.json").read_text())
    assert saved["step"] == 2 and len(saved["history"]) == 2
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    results = train_library(config)  # resumes news at step 2, then trains the rest
    assert [r["label"] for r in results] == list(DOMAIN_TEXT)
    assert [r["resumed_from_step"] for r in results] == [2] + [0] * (len(DOMAIN_TEXT) - 1)
    news = json.loads((config.out_dir / "news" / library_recipe.METADATA_FILE).read_text())
    assert news["steps"] == 6 and len(json.loads((config.out_dir / "news" / "losses.json").read_text())) == 6
    assert (config.out_dir / "news" / "loss.png").stat().st_size > 1000
    assert not (config.out_dir / "news.partial").exists()
    for result in results:  # synthetic domains are easy: the adapter must beat the base model
        assert result["validation_nll_adapter"] < result["validation_nll_base"]
    # adapters are PEFT folders the bank imports (fp16 on disk)
    from dynalora.lora import LoraBank, module_shapes_of
    from dynalora.models import tiny_model

    bank = LoraBank(module_shapes_of(tiny_model("llama")))
    bank.add_peft(config.out_dir / "news")
    # a finished library is skipped on the next run
    assert train_library(config)[0]["train_seconds"] == news["train_seconds"]


def test_library_config_errors_name_the_field(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('stepz = 3\n[[adapters]]\nlabel = "a"\ndescription = "x"\nsource = "domain:news"\n')
    with pytest.raises(ValueError, match=r"bad.toml: unknown setting\(s\) \['stepz'\]"):
        LibraryConfig.from_file(path)
    path.write_text('held_out_tasks = ["t"]\n[[adapters]]\nlabel = "a"\ndescription = "x"\nsource = "bigbench:t"\n')
    with pytest.raises(ValueError, match="trains on held-out task 't'"):
        LibraryConfig.from_file(path)
    path.write_text('[[adapters]]\nlabel = "a"\ndescription = "x"\nsource = "wiki:t"\n')
    with pytest.raises(ValueError, match=re.escape("data source 'wiki:t': use one of domain:NAME | jsonl:PATH")):
        LibraryConfig.from_file(path)
    path.write_text('[[adapters]]\nlabel = "a"\nsource = "domain:news"\n')
    with pytest.raises(ValueError, match=re.escape("bad.toml [[adapters]] #1: AdapterSpec") + ".*description"):
        LibraryConfig.from_file(path)


def test_shift_recipe_learns_to_pick_the_domain_adapter(tmp_path, synthetic_domains):
    from dynalora.hyper.shift_net import ShiftNet
    from dynalora.train.shift import ShiftTrainConfig, train_shift

    config = library_config(tmp_path, steps=8)
    train_library(config)
    result = train_shift(ShiftTrainConfig(library_dir=config.out_dir, out_dir=tmp_path / "shift", model="tiny:llama",
                                          examples_per_domain=16, context_tokens=16, continuation_tokens=16,
                                          pool_window=8, width=32, steps=40, batch_size=8, lr=1e-2))
    assert result["final"]["acc"] > 0.8  # three synthetic domains are trivially separable
    net = ShiftNet.from_pretrained(tmp_path / "shift")
    assert net.config.bank_labels == list(DOMAIN_TEXT)


def test_trigger_recipe_learns_to_fire_at_domain_changes(tmp_path, synthetic_domains, monkeypatch):
    from dynalora.runtime.special_tokens import SHIFT_TOKEN
    from dynalora.runtime.trained_trigger import TrainedTrigger
    from dynalora.models import load_base_model
    from dynalora.train.triggers import TriggerTrainConfig, train_triggers

    monkeypatch.setattr("dynalora.data.streams.build_streams", fake_streams)
    config = library_config(tmp_path, steps=4)
    train_library(config)
    result = train_triggers(TriggerTrainConfig(library_dir=config.out_dir, out_dir=tmp_path / "triggers",
                                               model="tiny:llama", train_streams=12, validation_streams=6,
                                               delay=8, steps=300, lr=0.05, max_false_per_1k=1000.0))
    scan = {c["threshold"]: c for c in result["threshold_scan"]}
    assert result["train"]["boundary_recall"] > 0.5  # far above what an untrained row does (it never fires)
    assert result["final_loss"] < 0.7 * result["initial_loss"]  # the row learned, not just a low threshold
    assert set(scan) and 0 <= result["validation"]["false_per_1k_tokens"]
    base = load_base_model("tiny:llama")
    trigger = TrainedTrigger.from_pretrained(tmp_path / "triggers")
    ids = trigger.install(base.model, base.tokenizer)
    assert ids[SHIFT_TOKEN] == 256 and base.model.get_input_embeddings().weight.shape[0] == 258
    assert trigger.threshold == result["threshold"] and trigger.lora is None  # the row-only form
    # saved and read again: the same rows, threshold and record
    again = TrainedTrigger.from_pretrained(trigger.save_pretrained(tmp_path / "copy"))
    assert again.tokens == trigger.tokens and again.record == trigger.record
    assert all(torch.equal(again.rows[key], row) for key, row in trigger.rows.items())


def test_trigger_lora_recipe_trains_saves_and_merges_exactly(tmp_path, synthetic_domains, monkeypatch):
    from dynalora.models import load_base_model
    from dynalora.runtime.trained_trigger import TrainedTrigger
    from dynalora.runtime.trigger_lora import trigger_lora_merged
    from dynalora.train.trigger_lora import TriggerLoraTrainConfig, train_trigger_lora
    from dynalora.train.triggers import TriggerTrainConfig, rescan_thresholds, train_triggers

    monkeypatch.setattr("dynalora.data.streams.build_streams", fake_streams)
    config = library_config(tmp_path, steps=2)
    train_library(config)
    train_triggers(TriggerTrainConfig(library_dir=config.out_dir, out_dir=tmp_path / "triggers", model="tiny:llama",
                                      train_streams=4, validation_streams=2, delay=8, steps=20))
    result = train_trigger_lora(TriggerLoraTrainConfig(
        library_dir=config.out_dir, row_dir=tmp_path / "triggers", out_dir=tmp_path / "lora", model="tiny:llama",
        train_streams=4, validation_streams=2, delay=8, layers=1, rank=2, steps=12, lr=1e-2))
    assert result["final"]["trigger"] < result["initial"]["trigger"]  # the LoRA + row learned something
    assert 0 <= result["final"]["kl"] < 1.0 and "threshold" in result
    deltas = TrainedTrigger.from_pretrained(tmp_path / "lora").deltas
    assert deltas and all(int(torch.linalg.matrix_rank(d, atol=1e-5)) <= 2 for d in deltas.values())
    assert all(".1." in name for name in deltas)  # tiny:llama has 2 layers: only the last one
    # choosing the threshold again from the saved files (LoRA merged at load) reproduces the training-time scan
    rescanned = rescan_thresholds(tmp_path / "lora", config.out_dir, "tiny:llama")
    assert [c["fired"] for c in rescanned["threshold_scan"]] == [c["fired"] for c in result["threshold_scan"]]
    model = load_base_model("tiny:llama").model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with trigger_lora_merged(model, deltas):
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert sorted(changed) == sorted(f"{name}.weight" for name in deltas)
    assert all(torch.allclose(p, before[n], atol=1e-6) for n, p in model.named_parameters())  # taken out again
    # the engine built from the trigger files carries the LoRA merged into its base weights
    from dynalora.system.assemble import EngineSpec, build_engine

    token_file = tmp_path / "lora" / "trigger_tokens.safetensors"
    engine = build_engine(EngineSpec(model="tiny:llama", trigger_tokens=token_file, hypernetwork="none"))
    name = next(iter(deltas))
    module = dict(engine.dyn.model.named_modules())[name]
    merged = getattr(module, "base_layer", module).weight
    assert deltas[name].abs().max() > 1e-4  # large enough that a missing merge would show
    assert torch.allclose(merged, before[f"{name}.weight"] + deltas[name], atol=1e-6)
    # the shift system's live engine (the demo's, bench xlora's, eval shift's) has it merged while it runs, and
    # only then: an evaluation's other methods see the plain model
    from dynalora.system.assemble import load_shift_system
    from dynalora.train.shift import ShiftTrainConfig, train_shift

    train_shift(ShiftTrainConfig(library_dir=config.out_dir, out_dir=tmp_path / "shift", model="tiny:llama",
                                 examples_per_domain=8, context_tokens=16, continuation_tokens=16, pool_window=8,
                                 width=32, steps=2, batch_size=4))
    system = load_shift_system(config.out_dir, tmp_path / "shift", tmp_path / "lora", "tiny:llama")
    weight = lambda: getattr(dict(system.base.model.named_modules())[name], "base_layer",  # noqa: E731
                             dict(system.base.model.named_modules())[name]).weight
    plain = weight().detach().clone()
    with system.live() as live_engine:
        assert torch.allclose(weight(), plain + deltas[name], atol=1e-6) and live_engine.hypernetwork is system.hyper
        # it pools the features the network was trained on (the demo's engine once pooled the default 32)
        assert live_engine.config.pool_window == 8
        assert live_engine.config.feature_layer == system.net.config.feature_layer
    assert torch.allclose(weight(), plain, atol=1e-6)


def test_shift_pipeline_end_to_end_on_a_tiny_model(tmp_path, synthetic_domains, monkeypatch):
    """library → shift network → trigger row → token router → eval shift (every method scored, JSON written)."""
    from dynalora.data.streams import write_streams
    from dynalora.eval.shift import ShiftEvalConfig, eval_shift
    from dynalora.train.shift import ShiftTrainConfig, train_shift
    from dynalora.train.route import RouteTrainConfig, train_route
    from dynalora.train.triggers import TriggerTrainConfig, train_triggers
    from dynalora.train.xlora import XLoraTrainConfig, train_xlora

    monkeypatch.setattr("dynalora.data.streams.build_streams", fake_streams)
    config = library_config(tmp_path, steps=4)
    train_library(config)
    train_xlora(XLoraTrainConfig(library_dir=config.out_dir, out_dir=tmp_path / "xlora", model="tiny:llama",
                                 streams=4, window=24, steps=3))
    train_shift(ShiftTrainConfig(library_dir=config.out_dir, out_dir=tmp_path / "shift", model="tiny:llama",
                                 examples_per_domain=8, context_tokens=16, continuation_tokens=16, pool_window=8,
                                 width=32, steps=5, batch_size=4))
    train_triggers(TriggerTrainConfig(library_dir=config.out_dir, out_dir=tmp_path / "triggers", model="tiny:llama",
                                      train_streams=6, validation_streams=3, delay=8, steps=50))
    train_route(RouteTrainConfig(library_dir=config.out_dir, shift_dir=tmp_path / "shift",
                                 triggers_dir=tmp_path / "triggers", out_dir=tmp_path / "router", model="tiny:llama",
                                 streams=3, segment_chars=300, window=24, steps=3, width=8,
                                 trigger=["prob", "prompt"], prompt_tokens=8))  # the priors as eval shift's prompt runs
    streams = fake_streams(type("C", (), {"seed": 5, "streams": 2})())
    streams[1]["segments"][2]["library"] = False  # one segment counted as an unseen domain
    data = write_streams(streams, tmp_path / "streams.jsonl")
    result = eval_shift(ShiftEvalConfig(data=[data], library_dir=config.out_dir, shift_dir=tmp_path / "shift",
                                        triggers_dir=tmp_path / "triggers", xlora_dir=tmp_path / "xlora",
                                        router_dir=tmp_path / "router", model="tiny:llama", skip=8, prototype_texts=2),
                        out=tmp_path / "eval.json")
    methods = result["methods"]
    for name in ("base", "uniform_merge", "peft_linear_merge", "router_select", "oracle", "dynalora",
                 "dynalora_routed", "xlora"):
        assert methods[name]["tokens"] == methods["base"]["tokens"] > 0, name
    assert abs(methods["peft_linear_merge"]["nll"] - methods["uniform_merge"]["nll"]) > 0  # not the same math
    assert result["segments"] == 6 and "unseen_domains" in result and json.loads((tmp_path / "eval.json").read_text())
    only = eval_shift(ShiftEvalConfig(data=[data], library_dir=config.out_dir, shift_dir=tmp_path / "shift",
                                      triggers_dir=tmp_path / "triggers", model="tiny:llama", skip=8,
                                      methods=["dynalora"]))
    assert list(only["methods"]) == ["dynalora"]
    assert only["methods"]["dynalora"]["nll"] == methods["dynalora"]["nll"]  # same pass, same numbers
    # bench xlora runs on the same folders (the shipped layout: library, shift, triggers, xlora)
    from dynalora.bench.xlora import XLoraBenchConfig, run_xlora_bench

    timed = run_xlora_bench(XLoraBenchConfig(checkpoints=tmp_path, model="tiny:llama", prompt_tokens=16, new_tokens=4,
                                             repeats=1, threads=1), tmp_path / "bench.json")
    assert set(timed["ratios"]) == {"dynalora_vs_hf_time_per_token", "xlora_vs_hf_time_per_token",
                                    "xlora_vs_dynalora_time_per_token", "routed_vs_dynalora_time_per_token",
                                    "xlora_vs_routed_time_per_token"}  # the router trained above is timed too
    assert all(counts == [4] for counts in timed["tokens_generated"].values())  # each made the tokens it was timed on


def test_xlora_with_a_one_hot_classifier_scores_like_that_library_adapter(tmp_path, synthetic_domains):
    """X-LoRA's adapter names ("0" … "n-1") map to the library's labels in order: a classifier that puts all
    weight on adapter k gives the NLL of the library's adapter k alone, and an untrained one is a blend."""
    from dynalora.eval.shift import _Scorer
    from dynalora.lora import DynamicLoraModel, InjectConfig, StateConfig
    from dynalora.models import load_base_model
    from dynalora.lora.library_folder import load_library_bank
    from dynalora.train.xlora import XLoraTrainConfig, train_xlora
    from dynalora.system.xlora import xlora_classifier, build_xlora, xlora_token_nll

    config = library_config(tmp_path, steps=3)
    train_library(config)
    model, tokenizer, adapters = build_xlora(config.out_dir, "tiny:llama")
    labels = [adapter["label"] for adapter in adapters]
    model.eval()
    tokens = tokenizer(DOMAIN_TEXT["news"] * 3)["input_ids"][:40]
    base = load_base_model("tiny:llama")
    bank, _ = load_library_bank(config.out_dir, base.model)
    dyn = DynamicLoraModel.attach(base.model, bank, InjectConfig(state=StateConfig(max_batch=1, generated_rank=0,
                                                                                   memory_rank=0)))
    scorer = _Scorer(dyn, dyn.model.config.vocab_size)
    per_adapter = []
    for k in range(len(labels)):
        per_adapter.append(scorer.nll(tokens, [(0, [1.0 if j == k else 0.0 for j in range(len(labels))])]))
    assert not torch.allclose(per_adapter[0], per_adapter[1], atol=1e-3)  # the adapters differ
    linear = [m for m in xlora_classifier(model).modules() if isinstance(m, torch.nn.Linear)][-1]
    for k in range(len(labels)):
        with torch.no_grad():
            linear.weight.zero_()
            linear.bias.fill_(-30.0)
            linear.bias[k] = 30.0
        assert torch.allclose(xlora_token_nll(model, tokens, dyn.model.config.vocab_size), per_adapter[k], atol=1e-4)
    record = train_xlora(XLoraTrainConfig(library_dir=config.out_dir, out_dir=tmp_path / "xlora", model="tiny:llama",
                                          streams=2, window=16, steps=2))
    assert record["labels"] == labels and len(record["history"]) == 2


def test_escalate_pipeline_on_a_tiny_model(tmp_path, synthetic_domains, monkeypatch):
    """shift network → train escalate (level 2 + <|think|> row) → eval escalate (every method, costs, plot)."""
    from dynalora.eval.escalate import EscalateEvalConfig, eval_escalate
    from dynalora.hyper.stack import load_stack
    from dynalora.hyper.shift_net import ShiftNet
    from dynalora.train.escalate import EscalateTrainConfig, train_escalate
    from dynalora.train.shift import ShiftTrainConfig, train_shift
    from dynalora.train.triggers import TriggerTrainConfig, train_triggers

    monkeypatch.setattr("dynalora.data.streams.build_streams", fake_streams)
    config = library_config(tmp_path, steps=4)
    train_library(config)
    train_shift(ShiftTrainConfig(library_dir=config.out_dir, out_dir=tmp_path / "shift", model="tiny:llama",
                                 examples_per_domain=8, context_tokens=16, continuation_tokens=16, pool_window=8,
                                 width=32, steps=3, batch_size=4))
    train_triggers(TriggerTrainConfig(library_dir=config.out_dir, out_dir=tmp_path / "triggers", model="tiny:llama",
                                      train_streams=4, validation_streams=2, delay=8, steps=10))
    folders = dict(library_dir=config.out_dir, shift_dir=tmp_path / "shift", triggers_dir=tmp_path / "triggers",
                   model="tiny:llama", context_tokens=16, continuation_tokens=16)
    trained = train_escalate(EscalateTrainConfig(out_dir=tmp_path / "escalate", examples_per_domain=8,
                                                 validation_per_domain=4, steps=6, batch_size=4, rank=2, width=16,
                                                 lr=1e-2, think_steps=20, **folders))
    assert trained["nll"]["train"]["level2"] != trained["nll"]["train"]["level1"]  # level 2 acts
    assert 0 < trained["validation_choice"]["rate"] <= 0.5 and len(trained["history"]) == 6
    assert load_stack(ShiftNet.from_pretrained(tmp_path / "shift"), tmp_path / "escalate").depth == 2
    # early stopping: validated at steps 0 (level 2 = level 1), 2, 4, 6; the kept weights are the best step's
    # (a learning rate far too high, so that the best is not the last step and keeping the last would show)
    stopped = train_escalate(EscalateTrainConfig(out_dir=tmp_path / "stopped", examples_per_domain=8,
                                                 validation_per_domain=4, steps=6, batch_size=4, rank=2, width=16,
                                                 lr=1.0, think_steps=20, validate_every=2, level2_factors=False,
                                                 **folders))
    curve = stopped["validation_history"]
    assert [point["step"] for point in curve] == [0, 2, 4, 6]
    assert curve[0]["nll"] == pytest.approx(stopped["nll"]["validation"]["level1"], rel=1e-5)
    best = min(curve, key=lambda point: point["nll"])
    # (the best is usually an early step, so keeping the last would show; in one full-suite run it was the last —
    # the order of the curve at lr 1.0 is not stable across runs — so that is not asserted)
    assert stopped["kept_step"] == best["step"]
    assert stopped["nll"]["validation"]["level2"] == pytest.approx(best["nll"], rel=1e-5)
    result = eval_escalate(EscalateEvalConfig(escalate_dir=tmp_path / "escalate", per_domain=4, random_draws=3,
                                              timing_repeats=1, **folders), out=tmp_path / "eval.json")
    methods = result["methods"]
    assert set(methods) == {"base", "level1", "level2", "dynalora", "random"}
    assert methods["level1"]["quality"] == 0.0 and methods["level2"]["quality"] == pytest.approx(1.0, rel=1e-4)
    assert methods["level2"]["extra_compute"]["flops"] == pytest.approx(1.0)
    costs = result["costs"]
    assert costs["level2"]["hyper_flops_per_call"] > costs["level1"]["hyper_flops_per_call"] > 0
    assert (tmp_path / "eval.png").is_file() and json.loads((tmp_path / "eval.json").read_text())
    # the engine: --hyper shift with the stack; a think trigger that always fires escalates every update
    from dynalora.system.assemble import EngineSpec, build_engine

    engine = build_engine(EngineSpec(model="tiny:llama", bank=config.out_dir, trigger_tokens=tmp_path / "triggers" /
                                     "trigger_tokens.safetensors", hypernetwork="shift", shift_dir=tmp_path / "shift",
                                     escalate=tmp_path / "escalate", triggers=["every:4", "think:0.0001"], min_gap=1,
                                     update_delay=0))  # updates land at once: within the 10 tokens
    events = [e for e in engine.generate([[5, 6, 7, 8]], max_new_tokens=10).events if getattr(e, "level", None)]
    thought = [e for e in events if "think" in e.reason]
    assert thought and all(e.level == 2 for e in thought)
    plain = build_engine(EngineSpec(model="tiny:llama", bank=config.out_dir, hypernetwork="shift",
                                    shift_dir=tmp_path / "shift", triggers=["every:4"], min_gap=1, update_delay=0))
    assert {e.level for e in plain.generate([[5, 6, 7, 8]], max_new_tokens=10).events if hasattr(e, "level")} == {1}


def test_mix_pipeline_on_a_tiny_model(tmp_path, synthetic_domains):
    """shift network + compressor → train mix (only the gate moves) → eval mix → the gate in the engine."""
    from dynalora.eval.mix import MixEvalConfig, eval_mix
    from dynalora.system.assemble import EngineSpec, build_engine
    from dynalora.train.absorb import AbsorbTrainConfig, train_absorb
    from dynalora.train.mix import MixTrainConfig, train_mix
    from dynalora.train.shift import ShiftTrainConfig, train_shift

    config = library_config(tmp_path, steps=4)
    train_library(config)
    train_shift(ShiftTrainConfig(library_dir=config.out_dir, out_dir=tmp_path / "shift", model="tiny:llama",
                                 examples_per_domain=8, context_tokens=16, continuation_tokens=16, pool_window=8,
                                 width=32, steps=2, batch_size=4))
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"context": f"Zorb{i} lives in Quell{i}. Zorb{i} bakes bread daily.",
                                         "questions": [{"question": f"Where does Zorb{i} live?",
                                                        "answer": f"Quell{i}"}]}) + "\n" for i in range(4)))
    train_absorb(AbsorbTrainConfig(data=[facts], out_dir=tmp_path / "absorb", model="tiny:llama", rank=2,
                                   chunk_tokens=16, steps=0, threads=1, bottleneck=8, init_step=0.5))
    common = dict(facts=facts, library_dir=config.out_dir, shift_dir=tmp_path / "shift",
                  compressor_dir=tmp_path / "absorb", model="tiny:llama", max_docs=4, examples_per_domain=4,
                  context_tokens=16, continuation_tokens=16)
    trained = train_mix(MixTrainConfig(out_dir=tmp_path / "mix", steps=4, batch_size=4, lr=0.05, width=8, **common))
    assert trained["examples"] == {"domain": 12, "facts": 4} and len(trained["history"]) == 4
    weights = [(h["w_shift"], h["w_memory"]) for h in trained["history"]]
    assert weights[0] != weights[-1]  # the gate moved
    result = eval_mix(MixEvalConfig(gate_dir=tmp_path / "mix", **common), out=tmp_path / "mix.json")
    methods = result["methods"]
    assert set(methods) == {"base", "shift_only", "absorb_only", "fixed_half", "both", "gate"}
    assert methods["base"]["domain"] != methods["shift_only"]["domain"] != methods["both"]["domain"]
    assert methods["absorb_only"]["facts"] != methods["base"]["facts"]  # the memory acts
    # the engine: the gate's memory weight lands in the row's state at each trigger
    engine = build_engine(EngineSpec(model="tiny:llama", bank=config.out_dir, hypernetwork="shift",
                                     shift_dir=tmp_path / "shift", mix=tmp_path / "mix", triggers=["every:3"],
                                     min_gap=1, update_delay=0, window=40, compressor=tmp_path / "absorb"))
    events = [e for e in engine.generate([list(range(5, 45))], max_new_tokens=8).events
              if getattr(e, "kind", "") == "shift"]
    assert events and all("memory weight" in e.detail for e in events)
    assert engine.dyn.state.memory_weights[0] != 1.0
    # the whole system (library, shift network, mix gate, compressor) saved as one folder and loaded again
    from dynalora.system.assemble import System

    spec = EngineSpec(model="tiny:llama", bank=config.out_dir, hypernetwork="shift", shift_dir=tmp_path / "shift",
                      mix=tmp_path / "mix", triggers=["every:3"], min_gap=1, update_delay=0, window=40,
                      compressor=tmp_path / "absorb")
    runs = []
    for system in (System.from_checkpoints(spec), System.from_pretrained(System.from_checkpoints(spec)
                                                                          .save_pretrained(tmp_path / "system"))):
        with system.live() as live:
            runs.append(live.generate([list(range(5, 45))], max_new_tokens=8))
    assert {p.name for p in (tmp_path / "system").iterdir()} == {"library", "shift", "mix", "absorb", "system.json"}
    assert runs[0].token_ids == runs[1].token_ids
    first, again = ([(e.kind, e.position) for e in run.lora_events()] for run in runs)
    assert first == again and {"shift", "absorb"} <= {kind for kind, _ in first}  # the same, at the same tokens


def test_trigger_head_recipe_fires_at_changes_and_sets_the_token_probability(tmp_path, synthetic_domains,
                                                                            monkeypatch):
    """The head form: trained on cached features, saved, installed — the model's own softmax then gives
    p(<|shift|>) = σ(head(features)) at every position, and the engine reads it through the ``prob`` policy."""
    from dynalora.models import load_base_model
    from dynalora.runtime.special_tokens import SHIFT_TOKEN
    from dynalora.runtime.trained_trigger import TrainedTrigger
    from dynalora.runtime.trigger_head import head_features
    from dynalora.train.trigger_head import TriggerHeadTrainConfig, rescan_head, train_trigger_head

    monkeypatch.setattr("dynalora.data.streams.build_streams", fake_streams)
    config = library_config(tmp_path, steps=4)
    train_library(config)
    result = train_trigger_head(TriggerHeadTrainConfig(
        library_dir=config.out_dir, out_dir=tmp_path / "head", model="tiny:llama", train_streams=12,
        validation_streams=6, positive_tokens=8, ignore_after=12, width=16, steps=300, positives_per_step=64,
        negatives_per_step=256, lr=1e-2, max_false_per_1k=1000.0))
    assert result["final_loss"] < 0.7 * result["initial_loss"]
    assert result["train"]["boundary_recall"] > 0.5
    trigger = TrainedTrigger.from_pretrained(tmp_path / "head")
    assert trigger.head is not None and trigger.threshold == result["threshold"]
    assert trigger.votes == tuple(result["votes"]) and {tuple(c["votes"]) for c in result["threshold_scan"]} == \
        {(1, 1), (2, 2), (2, 3), (3, 4), (3, 5)}
    rescanned = rescan_head(tmp_path / "head", config.out_dir, "tiny:llama", votes=["2/3"], max_false_per_1k=1000.0)
    trained_scan = [c for c in result["threshold_scan"] if c["votes"] == [2, 3]]
    assert [(c["votes"], c["boundaries"], c["tokens"]) for c in rescanned["threshold_scan"]] == \
        [(c["votes"], c["boundaries"], c["tokens"]) for c in trained_scan]  # the rule asked for, the same streams
    # the same head and rule: the features are computed again (float16), so a count may move by one at a threshold
    assert sum(abs(a["fired"] - b["fired"]) for a, b in zip(rescanned["threshold_scan"], trained_scan)) <= 2
    assert TrainedTrigger.from_pretrained(tmp_path / "head").votes == (2, 3)
    assert trigger.head.config.layers == result["head"]["layers"]
    base = load_base_model("tiny:llama")
    ids = torch.tensor([[5, 17, 99, 3, 42, 8, 250, 11]])
    with head_features(base.model, trigger.head.config.layers) as captured:
        base.model(input_ids=ids)
    shift_id = trigger.install(base.model, base.tokenizer)[SHIFT_TOKEN]
    logits = base.model(input_ids=ids).logits[0].float()  # (T, V)
    expected = torch.sigmoid(trigger.head(captured[0][0]))  # (T,): the features before the rows were added
    assert torch.allclose(torch.softmax(logits, -1)[:, shift_id], expected, atol=1e-5)
    last = base.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()  # as the engine decodes
    assert torch.allclose(torch.softmax(last, -1)[shift_id], expected[-1], atol=1e-5)
    trigger.head.detach()
    assert not torch.allclose(torch.softmax(base.model(input_ids=ids).logits[0].float(), -1)[:, shift_id], expected,
                              atol=1e-3)
