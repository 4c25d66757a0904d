"""``dynalora serve`` over real HTTP on loopback, driven by the ``openai`` client: completions equal the engine's
tokens, a per-request blend equals ``set_blend`` in-process, streaming equals non-streaming, LoRA events arrive as
extension fields, and every bad request gets an OpenAI-style error and changes nothing."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
import time
import urllib.error
import urllib.request

import openai
import pytest
import uvicorn

from dynalora.models import tiny_model
from dynalora.runtime import SamplingConfig, TriggerConfig
from dynalora.serve.app import create_app
from dynalora.serve.config import ServeConfig
from dynalora.system.assemble import System
from dynalora.system.spec import EngineSpec
from test_engine import random_bank

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny system (3 random adapters, the prototype hypernetwork every 4 tokens) served on a free port."""
    root = tmp_path_factory.mktemp("serve")
    folder = root / "bank"
    random_bank(tiny_model("llama")).save(folder)
    system = System.from_checkpoints(EngineSpec(model="tiny:llama", bank=folder, triggers=["every:4"], min_gap=4,
                                                max_batch=1))
    engine = system.engine()
    app = create_app(engine, ServeConfig(port=0, max_tokens=32, max_prompt_tokens=512, sessions_dir=root / "sessions",
                                         blends=["warm:adapter0=0.7,adapter2=0.3"]), "tiny")
    with running(app) as port:
        yield (openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0), engine, port,
               root)


@contextmanager
def running(app):
    """``app`` served by uvicorn on a free loopback port (yields the port) until the block ends."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def in_process(engine, ids, blend=None, max_new_tokens=12):
    """The engine's own greedy tokens for ``ids`` with row 0 at ``blend`` (as the server sets it)."""
    state = engine.dyn.state
    state.reset()
    if blend:
        state.set_blend_by_label(0, blend)
    result = engine.generate([ids], max_new_tokens=max_new_tokens)
    state.reset()
    return result


def chat_ids(engine):
    return engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]


def test_models_lists_the_base_the_bank_and_the_named_blends(served, tmp_path):
    client, engine, _, _ = served
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", *engine.dyn.state.labels, "warm"]
    assert models[-1].dynalora == {"blend": {"adapter0": 0.7, "adapter2": 0.3}}
    for entry, fault in [("warm", "is not NAME:LABEL=WEIGHT"), ("adapter1:adapter0=1", "is taken"),
                         ("cold:nope=1", "unknown adapter labels"), ("cold:adapter0=x", "is not a number")]:
        with pytest.raises(ValueError, match=fault):
            create_app(engine, ServeConfig(sessions_dir=tmp_path, blends=[entry]))


def test_chat_completion_equals_the_engine_and_reports_its_lora_events(served):
    client, engine, _, _ = served
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    expected = in_process(engine, chat_ids(engine))
    assert response.choices[0].message.content == expected.texts[0]
    assert response.usage.completion_tokens == len(expected.token_ids[0]) == 12
    assert response.choices[0].finish_reason == "length"
    events = response.model_extra["dynalora"]["events"]
    assert [(e["kind"], e["position"]) for e in events] == [(e.kind, e.position) for e in expected.lora_events()]
    assert any(e["kind"] == "shift" for e in events)  # the hypernetwork moved the blend mid-generation


def test_a_per_request_blend_equals_set_blend_in_process(served):
    client, engine, _, _ = served
    labels = engine.dyn.state.labels
    blend = {labels[0]: 0.7, labels[2]: 0.3}
    named = f"blend:{labels[0]}=0.7,{labels[2]}=0.3"
    by_model = client.completions.create(model=named, prompt="the cat", max_tokens=12, temperature=0)
    by_extension = client.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0,
                                             extra_body={"dynalora": {"blend": blend}})
    by_name = client.completions.create(model="warm", prompt="the cat", max_tokens=12, temperature=0)  # the same blend
    plain = client.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0)
    expected = in_process(engine, engine.encode_prompt("the cat"), blend)
    assert by_model.choices[0].text == by_extension.choices[0].text == by_name.choices[0].text == expected.texts[0]
    assert plain.choices[0].text == in_process(engine, engine.encode_prompt("the cat")).texts[0]
    assert plain.choices[0].text != expected.texts[0]  # the blend changes what is generated


def test_a_request_brings_its_own_triggers(served, monkeypatch):
    """``dynalora.trigger``: ``[]`` keeps the requested LoRA all along (the same text as the engine without triggers);
    ``["every:6"]`` updates every 6 tokens in place of the server's every 4."""
    client, engine, _, _ = served
    ids = engine.encode_prompt("the cat")
    ask = lambda trigger: client.completions.create(  # noqa: E731
        model="adapter1", prompt="the cat", max_tokens=12, temperature=0, extra_body={"dynalora": {"trigger": trigger}})
    quiet, sparse = ask([]), ask(["every:6"])
    assert quiet.model_extra["dynalora"]["events"] == []
    updates = [e["position"] for e in sparse.model_extra["dynalora"]["events"] if e["reason"] == "every 6"]
    assert updates == [len(ids) + 5, len(ids) + 11]
    monkeypatch.setattr(engine, "triggers", TriggerConfig([]))
    assert quiet.choices[0].text == in_process(engine, ids, {"adapter1": 1.0}).texts[0]


def test_streaming_gives_the_same_text_with_the_events_as_chunks(served):
    client, engine, _, _ = served
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    pieces, events, finish = [], [], None
    for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0,
                                                stream=True):
        if chunk.model_extra.get("dynalora"):
            events.append(chunk.model_extra["dynalora"]["event"])
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert "".join(pieces) == whole.choices[0].message.content and finish == "length"
    without_time = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    assert without_time(events) == without_time(whole.model_extra["dynalora"]["events"])
    request = dict(model="tiny", prompt="the cat", max_tokens=6, temperature=0)
    text = "".join(c.choices[0].text for c in client.completions.create(**request, stream=True) if c.choices)
    assert text == client.completions.create(**request).choices[0].text


@pytest.mark.parametrize("body,status,param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "blend:adapter0=0.5,ghost=0.5", "prompt": "x"}, 404, "model"),
    ({"model": "blend:adapter0=-1", "prompt": "x"}, 400, "model"),
    ({"model": "tiny", "prompt": "x", "dynalora": {"blend": {"adapter0": float("nan")}}}, 400, "dynalora.blend"),
    ({"model": "blend:adapter0=lots", "prompt": "x"}, 400, "model"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 33}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x" * 513}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "dynalora": {"trigger": ["sometimes"]}}, 400, "dynalora.trigger"),
    ({"model": "tiny", "prompt": "x", "dynalora": {"trigger": ["every:x"]}}, 400, "dynalora.trigger"),
    ({"model": "tiny", "prompt": "x", "dynalora": {"trigger": ["token"]}}, 400, "dynalora.trigger"),  # no tokens
])
def test_bad_requests_get_openai_errors_and_change_nothing(served, body, status, param):
    _, engine, port, _ = served
    data = json.dumps(body, allow_nan=True).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=data,
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as failed:
        urllib.request.urlopen(request)
    error = json.loads(failed.value.read())["error"]
    assert failed.value.code == status and error["param"] == param and error["message"], error
    assert not engine.dyn.state.blend_weights.any()  # nothing was applied


def test_malformed_json_and_a_missing_key_are_refused(tmp_path):
    from fastapi.testclient import TestClient

    model = tiny_model("llama")
    random_bank(model).save(tmp_path / "bank")
    system = System.from_checkpoints(EngineSpec(model="tiny:llama", bank=tmp_path / "bank", triggers=[]))
    client = TestClient(create_app(system.engine(), ServeConfig(api_key="secret", sessions_dir=tmp_path / "s"), "tiny"))
    assert client.get("/v1/models").json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer secret"}).status_code == 200
    broken = client.post("/v1/completions", content=b'{"model": "tiny", "prompt": ',
                         headers={"Authorization": "Bearer secret", "Content-Type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(ValueError, match="beyond loopback: give an api_key"):
        ServeConfig(host="0.0.0.0")


def test_the_serve_command_serves_until_stopped(tmp_path):
    """``dynalora serve`` as a user starts it: a process that answers on its port until it is told to stop."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "dynalora", "serve", "--model", "tiny:llama", "--hyper", "none",
                                "--triggers", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "DYNALORA_HOME": str(tmp_path)})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        for _ in range(300):  # up to a minute to start
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert process.poll() is None, process.stdout.read().decode()
                time.sleep(0.2)
        assert [m.id for m in models.data] == ["tiny:llama"]
        reply = client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens == 4
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_client_that_disconnects_stops_its_generation(served, monkeypatch):
    client, engine, _, _ = served
    produced, original = [], engine.step

    def slow_step():  # 30 ms a token, so the disconnect lands mid-generation
        for event in original():
            time.sleep(0.03)
            produced.append(event.kind)
            yield event

    monkeypatch.setattr(engine, "step", slow_step)
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=32, temperature=0,
                                            stream=True)
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 3:
            break
    stream.close()  # the client goes away
    # the next request runs only once the engine is free: the abandoned row must have stopped long before 32 tokens
    client.completions.create(model="tiny", prompt="x", max_tokens=1, temperature=0)
    assert produced.count("token") < 16, produced.count("token")


def post(port: int, path: str, body: dict | None = None, method: str = "POST") -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


def test_a_session_continues_its_conversation_and_its_lora_across_turns_and_a_restart(served):
    client, engine, port, root = served
    labels = engine.dyn.state.labels
    first = post(port, "/v1/sessions", {"system": "Be brief.", "blend": {labels[1]: 1.0}})
    other = post(port, "/v1/sessions", {"blend": {labels[2]: 1.0}})
    assert first["turns"] == 0 and first["blend"] == {labels[1]: 1.0} and first["messages"] == []
    ask = lambda text, session=first["id"]: client.chat.completions.create(  # noqa: E731
        model="base", messages=[{"role": "user", "content": text}], max_tokens=10, temperature=0,
        extra_body={"dynalora": {"session": session}})
    one = ask("Name a colour.")
    after_one = post(port, f"/v1/sessions/{first['id']}", method="GET")
    assert after_one["turns"] == 1 and [m["role"] for m in after_one["messages"]] == ["user", "assistant"]
    assert after_one["messages"][1]["content"] == one.choices[0].message.content
    events = one.model_extra["dynalora"]["events"]
    assert events[0]["old_blend"] == [1.0 if label == labels[1] else 0.0 for label in labels]  # its own blend
    saved = [round(w, 4) for w in events[-1]["new_blend"]]
    assert [after_one["blend"].get(label, 0.0) for label in labels] == saved  # the LoRA it ended with is kept
    two = ask("And another?")
    transcript = [{"role": "system", "content": "Be brief."}, *after_one["messages"],
                  {"role": "user", "content": "And another?"}]
    expected = engine.tokenizer.apply_chat_template(transcript, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
    assert two.usage.prompt_tokens == len(expected)  # the whole conversation so far
    assert [round(w, 4) for w in two.model_extra["dynalora"]["events"][0]["old_blend"]] == saved  # goes on from it
    assert post(port, f"/v1/sessions/{other['id']}", method="GET")["blend"] == {labels[2]: 1.0}  # untouched
    # another server over the same folder (as after a restart): the session is there and goes on
    store = root / "sessions"
    system = System.from_checkpoints(EngineSpec(model="tiny:llama", bank=root / "bank", triggers=["every:4"],
                                                min_gap=4, max_batch=1))
    again = create_app(system.engine(), ServeConfig(max_tokens=32, max_prompt_tokens=512, sessions_dir=store), "tiny")
    with running(again) as new_port:
        record = post(new_port, f"/v1/sessions/{first['id']}", method="GET")
        assert record["turns"] == 2 and record["messages"][:2] == after_one["messages"]
        post(new_port, "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "Bye."}],
                                                "max_tokens": 4, "dynalora": {"session": first["id"]}})
        assert post(new_port, f"/v1/sessions/{first['id']}", method="GET")["turns"] == 3
        assert post(new_port, f"/v1/sessions/{other['id']}", method="DELETE")["deleted"]
        assert [s["id"] for s in post(new_port, "/v1/sessions", method="GET")["data"]] == [first["id"]]


@pytest.mark.parametrize("body,status,param", [
    ({"model": "base", "messages": [{"role": "user", "content": "x"}], "dynalora": {"session": "sess-none"}}, 404,
     "session"),
    ({"model": "base", "messages": [{"role": "system", "content": "x"}], "dynalora": {"session": "SESSION"}}, 400,
     "messages"),
    ({"model": "adapter0", "messages": [{"role": "user", "content": "x"}], "dynalora": {"session": "SESSION"}}, 400,
     "model"),
])
def test_bad_session_requests_get_errors(served, body, status, param):
    _, _, port, _ = served
    for blend in ({"ghost": 1.0}, {"adapter0": -1.0}):  # a session's starting blend is checked like a request's
        with pytest.raises(urllib.error.HTTPError) as failed:
            post(port, "/v1/sessions", {"blend": blend})
        assert json.loads(failed.value.read())["error"]["param"] == "blend"
    session = post(port, "/v1/sessions", {})["id"]
    body = json.loads(json.dumps(body).replace("SESSION", session))
    with pytest.raises(urllib.error.HTTPError) as failed:
        post(port, "/v1/chat/completions", body)
    error = json.loads(failed.value.read())["error"]
    assert failed.value.code == status and error["param"] == param, error
    assert post(port, f"/v1/sessions/{session}", method="GET")["turns"] == 0


def test_a_server_killed_mid_turn_loses_nothing_committed(tmp_path):
    """``kill -9`` a real server process while a client keeps a session talking (saves land at any moment), twice:
    each restart finds the session whole — its transcript and LoRA state from one complete version, holding every
    turn the client saw answered and at most the one in flight."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    random_bank(tiny_model("llama")).save(tmp_path / "bank")

    def start() -> tuple[subprocess.Popen, int]:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        process = subprocess.Popen([sys.executable, "-m", "dynalora", "serve", "--model", "tiny:llama", "--bank",
                                    str(tmp_path / "bank"), "--hyper", "none", "--triggers", "--port", str(port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "OMP_NUM_THREADS": "1", "DYNALORA_HOME": str(tmp_path)})
        for _ in range(300):
            try:
                post(port, "/v1/models", method="GET")
                return process, port
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        raise AssertionError("the server did not start")

    process, port = start()
    session = post(port, "/v1/sessions", {"blend": {"adapter1": 1.0}})["id"]
    answered = 0
    for round_ in range(2):
        stop = threading.Event()

        def talk():
            nonlocal answered
            while not stop.is_set():
                try:
                    post(port, "/v1/chat/completions", {"model": "base", "max_tokens": 2,
                                                        "dynalora": {"session": session},
                                                        "messages": [{"role": "user", "content": f"turn {answered}"}]})
                except (urllib.error.URLError, ConnectionError):
                    return
                answered += 1

        talker = threading.Thread(target=talk)
        talker.start()
        time.sleep(1.0 + 0.37 * round_)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        stop.set()
        talker.join()
        process, port = start()
        record = post(port, f"/v1/sessions/{session}", method="GET")
        assert answered >= 3 and record["turns"] in (answered, answered + 1), (answered, record["turns"])
        assert len(record["messages"]) == 2 * record["turns"] and record["blend"] == {"adapter1": 1.0}
        answered = record["turns"]
    post(port, "/v1/chat/completions", {"model": "base", "max_tokens": 2, "dynalora": {"session": session},
                                        "messages": [{"role": "user", "content": "still there?"}]})
    assert post(port, f"/v1/sessions/{session}", method="GET")["turns"] == answered + 1
    # what the kills left half done was cleared at start: one folder, the current version
    assert sorted(p.name for p in (tmp_path / "sessions" / session).iterdir()) == [f"v{answered + 1}"]
    process.terminate()
    process.wait(timeout=30)


def test_body_size_rate_and_time_limits(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    random_bank(tiny_model("llama")).save(tmp_path / "bank")
    engine = System.from_checkpoints(EngineSpec(model="tiny:llama", bank=tmp_path / "bank", triggers=[])).engine()
    app = create_app(engine, ServeConfig(max_body_bytes=300, rate_limit=3, timeout_seconds=0.5,
                                         sessions_dir=tmp_path / "s"), "tiny")
    client = TestClient(app)
    big = client.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 400})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    produced, original = [], engine.step

    def slow_step():  # 0.1 s a token: 20 tokens take 2 s, past the 0.5 s limit
        for event in original():
            time.sleep(0.1)
            produced.append(event.kind)
            yield event

    monkeypatch.setattr(engine, "step", slow_step)
    slow = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 20})
    assert slow.status_code == 408 and slow.json()["error"]["code"] == "timeout"
    monkeypatch.setattr(engine, "step", original)
    quick = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert quick.status_code == 200 and produced.count("token") < 20  # the slow one was stopped
    limited = client.get("/v1/models")  # the third counted request of this minute passes (the refused big one is
    # not counted), the fourth does not
    assert limited.status_code == 200
    refused = client.get("/v1/models")
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
    other_key = client.get("/v1/models", headers={"Authorization": "Bearer someone-else"})
    assert other_key.status_code == 200  # counted per key


def test_concurrent_sessions_stay_isolated(tmp_path):
    """Two sessions with different blends, talked to at the same time from two threads: every answer equals what the
    engine gives alone for that session's transcript under that session's blend."""
    random_bank(tiny_model("llama")).save(tmp_path / "bank")
    system = System.from_checkpoints(EngineSpec(model="tiny:llama", bank=tmp_path / "bank", hypernetwork="none",
                                                triggers=[], max_batch=4))
    engine = system.engine()
    app = create_app(engine, ServeConfig(max_tokens=8, max_prompt_tokens=2048, sessions_dir=tmp_path / "s"), "tiny")
    with running(app) as port, batch_sizes(engine) as sizes:
        blends = {"adapter0": 1.0}, {"adapter2": 0.6, "adapter1": 0.4}
        sessions = [post(port, "/v1/sessions", {"blend": blend})["id"] for blend in blends]

        def talk(session: str) -> None:
            for turn in range(3):
                post(port, "/v1/chat/completions", {"model": "base", "max_tokens": 6, "temperature": 0,
                                                    "dynalora": {"session": session},
                                                    "messages": [{"role": "user", "content": f"say {turn}"}]})

        threads = [threading.Thread(target=talk, args=(session,)) for session in sessions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        records = [post(port, f"/v1/sessions/{session}", method="GET") for session in sessions]
    for record, blend in zip(records, blends):
        assert record["turns"] == 3 and record["blend"] == blend
        for turn in range(3):
            history = record["messages"][:2 * turn + 1]
            ids = engine.tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"]
            assert record["messages"][2 * turn + 1]["content"] == in_process(engine, ids, blend, 6).texts[0]
    assert records[0]["messages"][1]["content"] != records[1]["messages"][1]["content"]  # the blends differ
    assert max(sizes) == 2  # the two sessions' rows shared forward passes


@contextmanager
def batch_sizes(engine):
    """The batch size of every forward of ``engine``'s model while the block runs."""
    sizes = []
    handle = engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        yield sizes
    finally:
        handle.remove()


def test_concurrent_requests_share_forward_passes_and_each_equals_the_engine_alone(tmp_path, monkeypatch):
    """Requests arriving while others run join the batch between steps and leave when done, each on its own blend,
    length and sampling seed: every answer equals the engine's for that request alone."""
    random_bank(tiny_model("llama")).save(tmp_path / "bank")
    engine = System.from_checkpoints(EngineSpec(model="tiny:llama", bank=tmp_path / "bank", triggers=["every:3"],
                                                min_gap=3, max_batch=3)).engine()
    app = create_app(engine, ServeConfig(max_tokens=32, sessions_dir=tmp_path / "s"), "tiny")
    step = engine.step

    def slow_step():  # 10 ms a step: the tiny model would finish each request before the next arrives
        time.sleep(0.01)
        yield from step()

    monkeypatch.setattr(engine, "step", slow_step)
    requests = [({"adapter0": 1.0}, 20, None), ({"adapter1": 0.5, "adapter2": 0.5}, 6, None), (None, 12, 7),
                ({"adapter2": 1.0}, 9, None), ({"adapter1": 1.0}, 14, 3)]  # blend, max_tokens, seed (None: greedy)
    answers = {}
    with running(app) as port, batch_sizes(engine) as sizes:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)

        def ask(i: int) -> None:
            blend, count, seed = requests[i]
            time.sleep(0.05 * i)  # arrivals spread over the first requests' generation
            answers[i] = client.completions.create(
                model="tiny", prompt=f"request {i} says", max_tokens=count, seed=seed,
                temperature=0 if seed is None else 1.0, extra_body={"dynalora": {"blend": blend}} if blend else None)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert max(sizes) == 3 and 1 in sizes  # up to the 3 rows at once; more requests than rows waited their turn
    monkeypatch.setattr(engine, "step", step)
    for i, (blend, count, seed) in enumerate(requests):
        state = engine.dyn.state
        state.reset()
        if blend:
            state.set_blend_by_label(0, blend)
        alone = engine.generate([engine.encode_prompt(f"request {i} says")], max_new_tokens=count,
                                sampling=SamplingConfig(temperature=0 if seed is None else 1.0, seed=seed))
        state.reset()
        assert answers[i].choices[0].text == alone.texts[0], f"request {i}"
        assert answers[i].usage.completion_tokens == len(alone.token_ids[0])
