"""The README's bring-your-own walkthrough on tiny models: your model, your PEFT adapters, your text →
import → train the shift network and the trigger → generate, and the trained system fires and blends on its
own streams. Models: Llama, Qwen2 with spare embedding rows (as real Qwen2 checkpoints), Gemma (tied
embeddings), GPT-2 (Conv1D)."""

from __future__ import annotations

import json
import random

import pytest

from conftest import ATTENTION, make_peft_adapter
from dynalora.cli import main
from dynalora.data.streams import library_streams
from dynalora.lora.library_folder import load_library_bank
from dynalora.models import load_base_model, tiny_model
from dynalora.system.assemble import System, load_shift_system

ATTENTION = {**ATTENTION, "gemma": ATTENTION["llama"]}
PHRASES = {"news": "the market rose today as traders bought shares in the bank. ",
           "scripture": "and the lord said unto them, go forth and be glad. ",
           "code": "def f(x):\n    return x + 1\n\n"}


def user_folders(tmp_path, family: str):
    """What a user has: three PEFT adapters, and their text as a JSONL file, a custom JSONL field and a folder."""
    rng = random.Random(0)
    text = lambda label: "".join(PHRASES[label][rng.randrange(4):] for _ in range(6))  # noqa: E731
    (tmp_path / "news.jsonl").write_text("".join(json.dumps({"text": text("news")}) + "\n" for _ in range(60)))
    (tmp_path / "scripture.jsonl").write_text("".join(json.dumps({"id": i, "body": text("scripture")}) + "\n"
                                                      for i in range(60)))
    notes = tmp_path / "code_notes"
    notes.mkdir()
    for i in range(60):
        (notes / f"snippet{i:02d}{'.md' if i % 2 else '.txt'}").write_text(text("code"))
    sources = {"news": f"jsonl:{tmp_path / 'news.jsonl'}", "scripture": f"jsonl:{tmp_path / 'scripture.jsonl'}#body",
               "code": f"dir:{notes}"}
    factory = lambda: tiny_model(family)  # noqa: E731
    adapters = {label: make_peft_adapter(factory, tmp_path / f"peft_{label}", seed, ATTENTION[family],
                                         fan_in_fan_out=family == "gpt2")
                for seed, label in enumerate(PHRASES)}
    return adapters, sources


@pytest.mark.parametrize("model", ["tiny:llama", "tiny:qwen2:300", "tiny:gemma", "tiny:gpt2"])
def test_import_train_shift_and_trigger_then_generate_on_your_own_model_adapters_and_text(tmp_path, model):
    adapters, sources = user_folders(tmp_path, model.split(":")[1])
    bank, shift, triggers = tmp_path / "bank", tmp_path / "shift", tmp_path / "triggers"
    for label, folder in adapters.items():
        assert main(["adapters", "import", str(folder), "--label", label, "--description", f"{label} text",
                     "--data", sources[label], "--bank", str(bank), "--model", model]) == 0
    assert main(["train", "shift", "--library", str(bank), "--model", model, "--out-dir", str(shift), "--steps", "6",
                 "--examples-per-domain", "8", "--context-tokens", "16", "--continuation-tokens", "16",
                 "--pool-window", "8", "--width", "32", "--batch-size", "4", "--threads", "1"]) == 0
    assert main(["train", "triggers", "--library", str(bank), "--model", model, "--out-dir", str(triggers),
                 "--streams", "6", "--validation-streams", "3", "--segment-chars", "300", "--delay", "8",
                 "--steps", "60", "--lr", "0.05", "--max-false-per-1k", "1000", "--threads", "1"]) == 0
    assert main(["generate", "--model", model, "--bank", str(bank), "--hyper", "shift", "--shift", str(shift),
                 "--trigger-tokens", str(triggers), "--trigger", "prob",  # the README's: the trained threshold
                 "--max-tokens", "8", "--show-events", "the market rose"]) == 0

    system = load_shift_system(bank, shift, triggers, model)
    _, metas = load_library_bank(bank, load_base_model(model).model)
    stream = library_streams(metas, "test", 1, seed=5, segments=4, segment_chars=300)[0]
    tokens = [t for segment in stream["segments"] for t in system.base.tokenizer(segment["text"])["input_ids"]]
    scored = system.run_stream(tokens, min_gap=16)
    shifts = [event for event in scored.events if event.kind == "shift"]
    assert shifts, "the trained trigger never fired on a stream of its own adapters' text"
    assert system.bank.labels == list(PHRASES)  # the blend is over the user's adapters
    assert all(event.new_blend != event.old_blend for event in shifts)  # and every shift moved it
    # saved as one folder and loaded again, the system fires at the same tokens with the same blends
    again = System.from_pretrained(system.save_pretrained(tmp_path / "system"))
    assert (tmp_path / "system" / "library" / "bank.json").is_file() and again.spec.model == model
    rescored = again.run_stream(tokens, min_gap=16)
    assert rescored.fired == scored.fired
    assert [event.new_blend for event in rescored.events] == [event.new_blend for event in scored.events]
    with pytest.raises(FileNotFoundError, match="system.json"):
        System.from_pretrained(bank)
