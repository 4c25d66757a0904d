"""Training on accelerate: two processes take the same steps as one, and an interrupted run resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dynalora.cli import build_parser, main
from dynalora.runtime.trained_trigger import TrainedTrigger
from dynalora.training import CURVES_FILE, RunConfig, TrainingRun
from test_bring_your_own import user_folders

SHIFT = ["--model", "tiny:llama", "--steps", "6", "--examples-per-domain", "8", "--context-tokens", "16",
         "--continuation-tokens", "16", "--pool-window", "8", "--width", "32", "--batch-size", "4", "--threads", "1"]
XLORA = ["--model", "tiny:llama", "--steps", "6", "--streams", "4", "--window", "24", "--segment-chars", "300",
         "--batch-size", "2", "--threads", "1"]
TRIGGERS = ["--model", "tiny:llama", "--streams", "4", "--validation-streams", "2", "--segment-chars", "300",
            "--delay", "8", "--threads", "1"]
ABSORB = ["--model", "tiny:llama", "--steps", "6", "--rank", "2", "--chunk-tokens", "16", "--max-chunks", "4",
          "--batch-size", "2", "--teacher-top-k", "4", "--bottleneck", "8", "--warmup-steps", "1", "--threads", "1"]
ABSORB_STEPS = ["--model", "tiny:llama", "--distill.steps", "2", "--distill.rank", "2", "--distill.memory-rank", "2",
                "--distill.max-probes", "1", "--distill.cloze", "1", "--score-steps", "1", "2", "--window", "64",
                "--locality-questions", "2", "--threads", "1"]
TRIGGER_LORA = [*TRIGGERS, "--steps", "6", "--layers", "1", "--rank", "2", "--batch-size", "2", "--lr", "0.01"]


def trigger_weights(folder):
    trigger = TrainedTrigger.from_pretrained(folder)
    return {**trigger.rows, **trigger.deltas}  # ΔW, not its SVD factors (whose signs are arbitrary)


LIBRARY = ["--model", "tiny:llama", "--steps", "6", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1",
           "--rank", "2", "--threads", "1"]


def library_weights(folder):
    return {f"{label}.{name}": tensor for label in ("news", "scripture", "code")
            for name, tensor in load_file(str(folder / label / "adapter_model.safetensors")).items()}


def record(name):
    return lambda folder: json.loads((folder / name).read_text())


ESCALATE = ["--model", "tiny:llama", "--steps", "4", "--examples-per-domain", "8", "--validation-per-domain", "4",
            "--context-tokens", "16", "--continuation-tokens", "16", "--rank", "2", "--width", "16",
            "--batch-size", "4", "--lr", "0.01", "--think-steps", "5", "--threads", "1"]
MIX = ["--model", "tiny:llama", "--steps", "6", "--batch-size", "4", "--width", "8", "--max-docs", "4",
       "--examples-per-domain", "4", "--context-tokens", "16", "--continuation-tokens", "16", "--threads", "1"]
ROUTE = ["--model", "tiny:llama", "--steps", "6", "--streams", "3", "--window", "24", "--segment-chars", "300",
         "--batch-size", "2", "--width", "8", "--threads", "1"]
RECIPES = {  # recipe: (its flags besides its data and --out-dir, its trained weights, its record)
    "shift": (SHIFT, lambda folder: load_file(str(folder / "shift_net.safetensors")), record("train_shift.json")),
    "xlora": (XLORA, lambda folder: load_file(str(folder / "classifier.safetensors")), record("xlora.json")),
    "trigger-lora": (TRIGGER_LORA, trigger_weights, record("triggers.json")),
    "absorb": (ABSORB, lambda folder: load_file(str(folder / "gradient_compressor.safetensors")),
               record("train_absorb.json")),
    "absorb-steps": (ABSORB_STEPS, lambda folder: load_file(str(folder / "step_sizes.safetensors")),
                     record("train_absorb_steps.json")),
    "library": (LIBRARY, library_weights, record("news/dynalora_adapter.json")),  # the first: the one interrupted
    "escalate": (ESCALATE, lambda folder: load_file(str(folder / "level2" / "level_net.safetensors")),
                 record("escalate.json")),
    "mix": (MIX, lambda folder: load_file(str(folder / "mix_gate.safetensors")), record("train_mix.json")),
    "route": (ROUTE, lambda folder: load_file(str(folder / "router.safetensors")), record("train_route.json")),
}
ALL_RECIPES = sorted(set(build_parser()._subparsers._group_actions[0].choices["train"]._subparsers._group_actions[0]
                         .choices) - {"rescan-triggers"})  # every `dynalora train` recipe, new ones too
DATA_PARALLEL = ["escalate", "library", "shift", "trigger-lora", "xlora"]
"""Recipes whose loss is a mean over equal parts of a batch (the library's text windows all have seq_len tokens;
absorb's loss is a mean over answer tokens: two processes weigh them per half-batch, so they match one process only
when every answer has the same length). Escalate's level 2 and the trigger LoRA are not called through accelerate's
wrapper: their gradients are averaged by ``TrainingRun.update(average=True)``; without it they would not match."""


def made(folder, command: list[str]):
    """``folder``, trained by ``command`` unless it is there already (what a recipe starts from)."""
    if not folder.exists():
        assert main([*command, "--out-dir", str(folder)]) == 0
    return str(folder)


def recipe_command(recipe: str, bank, tmp_path) -> list[str]:
    """``dynalora train RECIPE`` on the bank, with what it starts from made first (a shift network, a row
    trigger, a compressor; documents with questions)."""
    library = ["--library", str(bank)]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"context": f"Zorb{i} lives in Quell{i}. Zorb{i} is a baker.",
                                        "questions": [{"question": f"Where does Zorb{i} live?",
                                                       "answer": f"Quell{i}"}]}) + "\n" for i in range(6)))
    row = lambda: made(tmp_path / "row", ["train", "triggers", *library, *TRIGGERS, "--steps", "10"])  # noqa: E731
    shift = lambda: made(tmp_path / "shift", ["train", "shift", *library, *SHIFT])  # noqa: E731
    if recipe == "library":  # the user's text sources, from the bank
        config = tmp_path / "library.toml"
        config.write_text("".join(f'[[adapters]]\nlabel = "{a["label"]}"\ndescription = "{a["label"]} text"\n'
                                  f'source = "{a["data"]}"\n\n'
                                  for a in json.loads((bank / "bank.json").read_text())["adapters"]))
        return ["train", recipe, "--config", str(config), *LIBRARY]
    if recipe in ("absorb", "absorb-steps"):
        return ["train", recipe, "--data", str(docs), *RECIPES[recipe][0]]
    if recipe == "triggers":
        return ["train", recipe, *library, *TRIGGERS, "--steps", "10"]
    if recipe == "trigger-head":
        return ["train", recipe, *library, *TRIGGERS[:-4], "--steps", "6", "--width", "8", "--positive-tokens", "8",
                "--ignore-after", "12", "--positives-per-step", "8", "--negatives-per-step", "16", "--threads", "1"]
    if recipe == "trigger-lora":
        return ["train", recipe, *library, *TRIGGER_LORA, "--row-dir", row()]
    if recipe in ("escalate", "route"):
        return ["train", recipe, *library, *RECIPES[recipe][0], "--shift", shift(), "--triggers", row()]
    if recipe == "mix":
        compressor = made(tmp_path / "compressor", ["train", "absorb", "--data", str(docs), *ABSORB, "--steps", "0"])
        return ["train", recipe, *library, *MIX, "--shift", shift(), "--compressor", compressor, "--facts", str(docs)]
    return ["train", recipe, *library, *RECIPES[recipe][0]]


@pytest.fixture
def bank(tmp_path):
    adapters, sources = user_folders(tmp_path, "llama")
    for label, folder in adapters.items():
        assert main(["adapters", "import", str(folder), "--label", label, "--data", sources[label],
                     "--bank", str(tmp_path / "bank"), "--model", "tiny:llama"]) == 0
    return tmp_path / "bank"


@pytest.mark.parametrize("recipe", DATA_PARALLEL)
def test_two_processes_under_accelerate_launch_train_as_one(tmp_path, bank, recipe):
    _, weights, _ = RECIPES[recipe]
    command = recipe_command(recipe, bank, tmp_path)
    assert main([*command, "--out-dir", str(tmp_path / "one")]) == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dynalora",
              *command, "--out-dir", str(tmp_path / "two")]
    done = subprocess.run(launch, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    assert RECIPES[recipe][2](tmp_path / "two")["processes"] == 2  # it really ran data-parallel
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:  # the same steps: gradients averaged over two halves of each batch (fp16 files)
        torch.testing.assert_close(two[name].float(), one[name].float(), atol=2e-3, rtol=1e-2)


def test_a_command_closes_the_process_group_a_recipe_opened(tmp_path, monkeypatch):
    """Whatever a command's handler leaves open (a recipe under ``accelerate launch``), ``main`` closes before the
    process exits — also when the handler fails."""
    import torch.distributed as dist

    def opens_a_group(args):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        raise RuntimeError("the handler failed")

    args = build_parser().parse_args(["data", "list"])
    monkeypatch.setattr(args, "handler", opens_a_group)
    monkeypatch.setattr("dynalora.cli.build_parser", lambda: type("P", (), {"parse_args": lambda self, argv: args})())
    assert main(["data", "list"]) == 2
    assert not dist.is_initialized()


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_an_interrupted_run_resumes_from_its_last_state_to_the_same_weights(tmp_path, bank, monkeypatch, recipe):
    _, weights, read_record = RECIPES[recipe]
    command = [*recipe_command(recipe, bank, tmp_path), "--run.checkpoint-every", "3"]
    assert main([*command, "--out-dir", str(tmp_path / "whole")]) == 0
    assert not list((tmp_path / "whole").rglob("resume"))  # a finished run leaves no state behind

    save = TrainingRun.end_step

    def save_then_stop(self, step, history, rng=None, extra=None):
        save(self, step, history, rng, extra)
        if step == 3:
            raise KeyboardInterrupt  # as if the machine went away after the checkpoint at step 3

    monkeypatch.setattr(TrainingRun, "end_step", save_then_stop)
    assert main([*command, "--out-dir", str(tmp_path / "cut")]) == 130
    assert list((tmp_path / "cut").rglob("resume/progress.json"))  # (the library's: in the adapter's .partial)
    monkeypatch.setattr(TrainingRun, "end_step", save)
    assert main([*command, "--out-dir", str(tmp_path / "cut")]) == 0
    # it went on from step 3 (a rerun from scratch would also end equal: the run is seeded)
    assert read_record(tmp_path / "cut")["resumed_from_step"] == 3
    assert read_record(tmp_path / "whole")["resumed_from_step"] == 0
    if recipe not in ("library", "absorb-steps"):  # the curves (library: per adapter, in its losses.json)
        whole_curves, cut_curves = ((tmp_path / run / CURVES_FILE).read_text().splitlines() for run in ("whole", "cut"))
        assert [json.loads(line)["step"] for line in cut_curves] == list(range(1, len(whole_curves) + 1))
        assert cut_curves == whole_curves  # the steps after the saved state were logged once, with the same values
    whole, cut = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[name], cut[name]) for name in whole)


def test_a_tracker_that_is_not_installed_is_refused_before_anything_loads():
    with pytest.raises(ValueError, match=r"tracker='no-such-tracker': not installed; available here: \["):
        RunConfig(tracker="no-such-tracker")


@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_every_recipe_trains_on_a_bfloat16_base_model(tmp_path, bank, recipe):
    """--run.dtype bfloat16: the frozen base in bfloat16, what is trained in float32 (the features, the LoRA sums and
    the trigger rows are cast where the two meet)."""
    assert main([*recipe_command(recipe, bank, tmp_path), "--run.dtype", "bfloat16",
                 "--out-dir", str(tmp_path / "out")]) == 0
    if recipe in RECIPES:
        trained = RECIPES[recipe][1](tmp_path / "out")
        assert trained and all(bool(torch.isfinite(t.float()).all()) for t in trained.values())
