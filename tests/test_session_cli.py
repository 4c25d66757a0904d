"""Chat sessions and the CLI on tiny models (byte tokenizer, no downloads)."""

from __future__ import annotations

import json

import pytest

from dynalora.cli import main
from dynalora.lora import DynamicLoraModel
from dynalora.models import ByteTokenizer, tiny_model
from dynalora.runtime import Engine, EveryN, TriggerConfig
from dynalora.runtime.session import ChatSession

from conftest import make_peft_adapter
from test_engine import random_bank


def tiny_chat_engine():
    model = tiny_model("llama")
    dyn = DynamicLoraModel.attach(model, random_bank(model))
    return Engine(dyn, ByteTokenizer(), None, TriggerConfig([EveryN(5)]))


def test_saved_session_gives_the_same_next_tokens(tmp_path):
    engine = tiny_chat_engine()
    session = ChatSession(engine, system="be brief")
    list(session.ask("hello there", max_new_tokens=6))
    engine.dyn.state.set_blend(0, [0.4, -0.3, 0.9])
    session.save(tmp_path / "s")
    expected = [e.token_id for e in session.ask("and now?", max_new_tokens=8) if e.kind == "token"]

    fresh = ChatSession(tiny_chat_engine())
    fresh.load(tmp_path / "s")
    assert fresh.messages[:2] == session.messages[:2] and fresh.system == "be brief"
    got = [e.token_id for e in fresh.ask("and now?", max_new_tokens=8) if e.kind == "token"]
    assert got == expected
    fresh.reset()
    assert not fresh.engine.dyn.state.blend_weights.any() and fresh.messages == []


def test_loading_a_broken_session_changes_nothing(tmp_path):
    session = ChatSession(tiny_chat_engine())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "transcript.json").write_text("{}")
    with pytest.raises(ValueError, match="not a session transcript"):
        session.load(tmp_path / "bad")
    assert session.messages == []


def test_cli_adapters_import_list_export_info(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DYNALORA_HOME", str(tmp_path / "home"))
    first = make_peft_adapter(lambda: tiny_model("llama"), tmp_path / "news", 1, ["q_proj", "v_proj"])
    second = make_peft_adapter(lambda: tiny_model("llama"), tmp_path / "code", 2, ["q_proj"], rank=2)
    bank = tmp_path / "bank"
    assert main(["adapters", "import", str(first), "--description", "news text", "--bank", str(bank),
                 "--model", "tiny:llama"]) == 0
    assert main(["adapters", "import", str(second), "--bank", str(bank), "--model", "tiny:llama"]) == 0
    capsys.readouterr()
    assert main(["adapters", "list", "--bank", str(bank), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [a["label"] for a in listed] == ["news", "code"] and listed[0]["description"] == "news text"
    out = tmp_path / "exported"
    assert main(["adapters", "export", "--bank", str(bank), "--blend", "news=0.5,code=2", "--out", str(out),
                 "--model", "tiny:llama", "--rank", "3"]) == 0
    assert "SVD rank 3" in capsys.readouterr().out
    assert json.loads((out / "dynalora_export.json").read_text())["blend"] == {"news": 0.5, "code": 2.0}
    assert main(["info", "--bank", str(bank), "--model", "tiny:llama"]) == 0
    assert "2 adapters" in capsys.readouterr().out
    # a duplicate label is refused and the bank on disk stays as it was
    assert main(["adapters", "import", str(first), "--bank", str(bank), "--model", "tiny:llama"]) == 2
    assert "already in the bank" in capsys.readouterr().err
    assert len(json.loads((bank / "bank.json").read_text())["adapters"]) == 2
    assert main(["adapters", "export", "--bank", str(bank), "--blend", "nope=1", "--out", str(out),
                 "--model", "tiny:llama"]) == 2
    assert "unknown adapter 'nope'" in capsys.readouterr().err


def test_chat_cli_commands(tmp_path, capsys, monkeypatch):
    lines = iter(["/state", "hello", "/save " + str(tmp_path / "s"), "/reset", "/load " + str(tmp_path / "s"),
                  "/load " + str(tmp_path / "missing"), "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", "tiny:llama", "--max-tokens", "4", "--hyper", "none"]) == 0
    out = capsys.readouterr().out
    assert "(the bank is empty)" in out and "[saved to" in out and "[state and transcript reset]" in out
    assert "[loaded 2 messages]" in out and "error:" in out and "transcript.json: missing" in out
    assert json.loads((tmp_path / "s" / "transcript.json").read_text())["messages"][0]["content"] == "hello"
