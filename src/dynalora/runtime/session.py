"""A chat session: the transcript plus its row's LoRA state, saved and loaded together."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from dynalora.runtime.engine import Engine
from dynalora.runtime.events import Event, TokenEvent

TRANSCRIPT_FILE = "transcript.json"
STATE_FILE = "lora_state.safetensors"


class ChatSession:
    """Multi-turn chat on one engine row. Each turn re-encodes the transcript with the chat template.

    With an absorbing engine, the transcript tokens already folded into memory (counted after the sink)
    are left out of later prompts, so nothing is absorbed twice.

    Example::

        session = ChatSession(engine, system="You are terse.")
        for event in session.ask("Hello"):
            ...
        session.save("sessions/today")
    """

    def __init__(self, engine: Engine, system: str | None = None, row: int = 0):
        self.engine = engine
        self.system = system
        self.row = row
        """The engine row whose LoRA state is the session's (a server runs sessions on any free row; ``ask`` row 0)."""
        self.messages: list[dict[str, str]] = []
        self.absorbed_tokens = 0
        """Transcript tokens (after the sink) already absorbed into the row's memory and evicted."""

    def prompt_ids(self) -> list[int]:
        ids = self.engine.encode_messages(self.messages, self.system)
        if self.absorbed_tokens and self.engine.absorber is not None:
            sink = self.engine.absorber.config.sink_tokens
            ids = ids[:sink] + ids[sink + self.absorbed_tokens:]
        return ids

    def ask(self, text: str, **generate_kwargs) -> Iterator[Event]:
        """Stream the answer to ``text``; the (possibly partial, if interrupted) answer joins the transcript."""
        if self.row != 0:
            raise ValueError(f"ChatSession.ask runs on row 0 (a stream of one prompt); this session is on row "
                             f"{self.row}")
        self.messages.append({"role": "user", "content": text})
        answer = []
        try:
            for event in self.engine.stream([self.prompt_ids()], **generate_kwargs):
                if isinstance(event, TokenEvent):
                    answer.append(event.text)
                yield event
        finally:
            self.messages.append({"role": "assistant", "content": "".join(answer)})
            self.absorbed_tokens += self.evicted_now()

    def evicted_now(self) -> int:
        """Tokens of the session's row the engine's current run absorbed and dropped."""
        return getattr(self.engine, "evicted_tokens", {}).get(self.row, 0)

    def reset(self) -> None:
        self.messages.clear()
        self.absorbed_tokens = 0
        self.engine.dyn.state.reset(self.row)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.engine.dyn.state.save(folder / STATE_FILE, row=self.row)
        (folder / TRANSCRIPT_FILE).write_text(json.dumps({"system": self.system, "messages": self.messages,
                                                                 "absorbed_tokens": self.absorbed_tokens}, indent=2))
        return folder

    def load(self, folder: str | Path) -> None:
        """Load a saved session; on a bad file nothing changes (the state load validates first)."""
        folder = Path(folder)
        transcript_path = folder / TRANSCRIPT_FILE
        if not transcript_path.is_file():
            raise FileNotFoundError(f"{transcript_path}: missing (not a saved session folder)")
        try:
            transcript = json.loads(transcript_path.read_text())
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in transcript["messages"]]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{transcript_path}: not a session transcript ({error!r})") from error
        self.engine.dyn.state.load(folder / STATE_FILE, row=self.row)
        self.system, self.messages = transcript.get("system"), messages
        self.absorbed_tokens = int(transcript.get("absorbed_tokens", 0))
