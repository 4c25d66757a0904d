"""``dynalora demo``: the shipped library, shift network and trigger on a stream that changes domain.

The text (cut from the test split of four library domains) is read token by token; the model's own
``<|shift|>`` probability decides when to change its LoRA, the shift network decides what to, and the
events and blends are printed as they happen. Then a short generation shows the same engine live.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dynalora.console import styles
from dynalora.models import dynalora_home
from dynalora.runtime.memory_writers import WRITERS, DistillConfig
from dynalora.shipped import shipped

DIM, BOLD, RESET = styles()  # empty when piped or NO_COLOR is set
DEMO_DOMAINS = ["news", "drama-shakespeare", "code-python", "scripture"]
PROMPT_TOKENS = 32  # the stream's first tokens are read as a prompt: the first blend comes from them


@dataclass
class DemoConfig:
    checkpoints: Path = shipped()
    """Folder with library, shift, trigger_head and absorb (default: the checkpoints shipped in the package)."""
    model: str | None = None
    """Base model (None: the embedded SmolLM2-135M-Instruct, the one the checkpoints were trained on)."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto: where the model, its LoRA state and the shift network run."""
    dtype: str = "float32"
    """float32, bfloat16 or float16 (the base model's weights and the LoRA state)."""
    seed: int = 3
    """Which test-split stream the demo reads."""
    segment_chars: int = 600
    """Characters per segment of that stream."""
    plot: Path | None = field(default_factory=lambda: dynalora_home() / "demo_timeline.png")
    """Where to draw the blend timeline (none: no plot)."""
    absorb: bool = True
    """Then the absorb part: a test document read into the memory LoRA, evicted, and asked about."""
    absorber: str = "distill"
    """How the absorb part writes the memory LoRA: compressor, distill or compressor+distill."""
    absorb_steps: int = DistillConfig.steps
    """Distillation steps per chunk (the distilling writers)."""
    absorb_step_sizes: Path | None = None
    """Meta-learned step sizes for the distilling writers (e.g. CHECKPOINTS/absorb_steps; none: a constant)."""

    def __post_init__(self):
        if self.absorber not in WRITERS:
            raise ValueError(f"DemoConfig.absorber={self.absorber!r}: choose one of {', '.join(WRITERS)}")


def run_demo(config: DemoConfig) -> dict:
    from dynalora.data.streams import StreamConfig, build_streams, tokenize_stream
    from dynalora.plot import plot_blend_timeline
    from dynalora.runtime import SamplingConfig
    from dynalora.runtime.special_tokens import SHIFT_TOKEN
    from dynalora.system.assemble import load_shift_system

    system = load_shift_system(*(config.checkpoints / name for name in ("library", "shift", "trigger_head")),
                               config.model, device=config.device, dtype=config.dtype, triggers=("prob", "prompt"))
    base, bank, net, dyn, threshold = system.base, system.bank, system.net, system.dyn, system.threshold
    print(f"{BOLD}dynalora demo{RESET}: {base.name}, {len(bank)} library adapters {bank.labels},\n"
          f"shift network ({sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters), "
          f"learned {SHIFT_TOKEN} (trigger head: p>{threshold} at {system.votes[0]} of the last {system.votes[1]} "
          "tokens); the first blend from the prompt\n")

    stream = build_streams(StreamConfig(split="test", streams=1, segments=4, segment_chars=config.segment_chars,
                                        domains=DEMO_DOMAINS, seed=config.seed, joins="sentence"))[0]
    tokens, starts, domains = tokenize_stream(base.tokenizer, stream)
    scored = system.run_stream(tokens, prompt_tokens=PROMPT_TOKENS)
    fired, blends = scored.fired, scored.blends
    print(f"A stream of {len(tokens)} tokens (test split) that changes domain {len(starts) - 1} times:")
    events = sorted([(s, "segment", d) for s, d in zip(starts, domains)]
                    + [(f, "shift", e) for f, e in zip(fired, scored.events)])
    for position, kind, detail in events:
        if kind == "segment":
            preview = base.tokenizer.decode(tokens[position:position + 18]).replace("\n", " ")
            print(f"\n{BOLD}token {position:>4}: the text becomes {detail}{RESET}  “{preview}…”")
        else:  # the update lands update_delay tokens after the trigger
            top = sorted(zip(bank.labels, detail.new_blend), key=lambda x: -x[1])[:3]
            fired_how = f"the first {PROMPT_TOKENS} tokens read as the prompt" if detail.reason.startswith("prompt") \
                else "<|shift|> fired"
            print(f"{DIM}  token {position:>4}: {fired_how}; from token {detail.position}: "
                  + ", ".join(f"{label} {w:.2f}" for label, w in top) + f"  ({detail.seconds * 1e3:.1f} ms){RESET}")
    result = {"tokens": len(tokens), "segments": domains, "segment_starts": starts, "shifts": fired}
    if config.plot is not None:
        if plot_blend_timeline(blends, bank.labels, starts, domains, fired, config.plot):
            print(f"\nblend timeline written to {config.plot}")

    print(f"\n{BOLD}Live generation{RESET} (greedy with repetition penalty 1.3, the shift network on the learned "
          "trigger):")
    dyn.state.reset()
    with system.live() as engine:
        for prompt in ["Write a short Python function that reverses a string.", "Speak as Hamlet about the sea."]:
            print(f"{BOLD}> {prompt}{RESET}")
            for event in engine.stream([prompt], chat=True, max_new_tokens=48,
                                       sampling=SamplingConfig(repetition_penalty=1.3)):
                if event.kind == "token":
                    print(event.text, end="", flush=True)
                elif event.kind in ("shift", "rejected"):
                    top = sorted(zip(bank.labels, event.new_blend), key=lambda x: -x[1])[:2]
                    print(f"{DIM}[{event.kind}: " + ", ".join(f"{label} {w:.2f}" for label, w in top) + f"]{RESET}",
                          end="")
            print("\n")
            dyn.state.reset()
    return result
