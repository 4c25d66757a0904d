"""``dynalora handoff`` without vLLM: the rank vLLM accepts (exact when it fits, else SVD with its error reported, a
wrong ``--rank`` refused), the registration request vLLM's runtime LoRA API expects (checked against a stand-in
server), its errors, and a session's LoRA exported from the server's session store. ``test_slow_vllm.py`` runs the
hand-off against a real vLLM server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from dynalora.cli import main
from dynalora.lora import DynamicLoraModel
from dynalora.lora.peft_io import read_peft_adapter
from dynalora.models import tiny_model
from dynalora.runtime import Engine
from dynalora.runtime.session import ChatSession
from dynalora.serve.handoff import export_for_vllm, register_with_vllm
from dynalora.serve.sessions import SessionStore
from test_engine import random_bank


def test_the_export_is_exact_when_its_rank_fits_and_compressed_to_the_servers_limit_when_not(tmp_path):
    model = tiny_model("llama")
    dyn = DynamicLoraModel.attach(model, random_bank(model))  # 3 adapters of rank 4
    dyn.state.set_blend(0, [0.5, 0.3, 0.2])  # exact rank 12
    exact = export_for_vllm(dyn, 0, tmp_path / "exact", max_lora_rank=16)
    assert exact.exact and exact.rank == 12
    squeezed = export_for_vllm(dyn, 0, tmp_path / "squeezed", max_lora_rank=8)
    assert not squeezed.exact and squeezed.rank == 8 and 0 < squeezed.relative_error < 1
    assert {a.shape[0] for a, _ in read_peft_adapter(tmp_path / "squeezed").factors.values()} == {8}
    assert export_for_vllm(dyn, 0, tmp_path / "four", rank=4, max_lora_rank=8).rank == 4
    with pytest.raises(ValueError, match=r"--rank 32: vLLM accepts ranks 1..16"):
        export_for_vllm(dyn, 0, tmp_path / "bad", rank=32, max_lora_rank=16)


class StandIn(BaseHTTPRequestHandler):
    """vLLM's ``/v1/load_lora_adapter`` as far as the hand-off sees it: records the request, answers ``status``."""

    status, received = 200, []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandIn.received.append((self.path, self.headers.get("Authorization"), body))
        self.send_response(StandIn.status)
        self.end_headers()
        self.wfile.write(b"Success: LoRA adapter loaded" if StandIn.status == 200 else b'{"message": "no"}')

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    server = HTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    StandIn.status, StandIn.received = 200, []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_registration_asks_vllm_to_load_the_folder_in_place_and_reports_its_refusals(stand_in, tmp_path):
    answer = register_with_vllm(stand_in, "mine", tmp_path / "adapter", api_key="k")
    assert answer == "Success: LoRA adapter loaded"
    assert StandIn.received == [("/v1/load_lora_adapter", "Bearer k",
                                 {"lora_name": "mine", "lora_path": str((tmp_path / "adapter").resolve()),
                                  "load_inplace": True})]
    StandIn.status = 404
    with pytest.raises(RuntimeError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
        register_with_vllm(stand_in, "mine", tmp_path)
    StandIn.status = 400
    with pytest.raises(RuntimeError, match=r"refused the adapter 'mine'.*HTTP 400.*no"):
        register_with_vllm(stand_in, "mine", tmp_path)
    with pytest.raises(RuntimeError, match="cannot reach vLLM"):
        register_with_vllm("http://127.0.0.1:9", "mine", tmp_path, timeout=5)


def test_the_handoff_command_sends_a_sessions_lora_as_its_last_turn_left_it(stand_in, tmp_path, capsys):
    model = tiny_model("llama")
    random_bank(model).save(tmp_path / "bank")
    from dynalora.lora import LoraBank, module_shapes_of

    dyn = DynamicLoraModel.attach(model, LoraBank.load(tmp_path / "bank", module_shapes_of(model)))
    dyn.state.update(0, blend=[0.0, 1.0, 0.0])
    session_id = SessionStore(tmp_path / "sessions").create(ChatSession(Engine(dyn)))
    expected = dyn.state.effective_factors(0)
    assert main(["handoff", "--model", "tiny:llama", "--bank", str(tmp_path / "bank"), "--session", session_id,
                 "--sessions-dir", str(tmp_path / "sessions"), "--name", "s1", "--vllm", stand_in,
                 "--out", str(tmp_path / "out")]) == 0
    assert "rank 4, exact" in capsys.readouterr().out
    handed = read_peft_adapter(tmp_path / "out").factors
    for module, (lora_a, lora_b) in expected.items():
        assert torch.allclose(handed[module][1] @ handed[module][0], lora_b @ lora_a, atol=1e-6)
    assert StandIn.received[0][2]["lora_name"] == "s1"
    assert main(["handoff", "--model", "tiny:llama", "--bank", str(tmp_path / "bank"), "--session", "sess-nope",
                 "--sessions-dir", str(tmp_path / "sessions"), "--name", "s1"]) == 2
    assert "no session 'sess-nope'" in capsys.readouterr().err
