"""Server sessions: a conversation and its LoRA state (blend, generated factors, memory), kept on disk so they outlive
the server process.

Layout under ``root``: ``sessions.sqlite`` (one row per session: id, times, turns, the folder of its current
version) and ``<id>/v<N>/`` folders, each a whole :class:`~dynalora.runtime.session.ChatSession` save (transcript +
LoRA state). A turn writes a new version folder completely, then commits the index row that points to it, then
removes the old folder: a process killed at any moment leaves the index pointing at a complete version (at most the
turn in progress is lost).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from safetensors import safe_open

from dynalora.runtime.session import STATE_FILE, TRANSCRIPT_FILE, ChatSession
from dynalora.serve.schema import ServeError

INDEX_FILE = "sessions.sqlite"


class SessionStore:
    def __init__(self, root: str | Path, max_sessions: int = 1000):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_sessions = max_sessions
        self.lock = threading.Lock()
        self.db = sqlite3.connect(self.root / INDEX_FILE, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, created REAL, updated REAL, "
                        "turns INTEGER, folder TEXT)")
        self._collect_garbage()

    def _collect_garbage(self) -> None:
        """Remove what a killed process left: versions written but never made current, or made current but whose
        old version was not removed yet, and folders of deleted sessions."""
        current = {folder for (folder,) in self.db.execute("SELECT folder FROM sessions")}
        for session_folder in (p for p in self.root.iterdir() if p.is_dir()):
            versions = [v for v in session_folder.iterdir() if v.is_dir()]
            for version in versions:
                if f"{session_folder.name}/{version.name}" not in current:
                    shutil.rmtree(version, ignore_errors=True)
            if not any(session_folder.iterdir()):
                session_folder.rmdir()

    def _row(self, session_id: str) -> tuple:
        row = self.db.execute("SELECT id, created, updated, turns, folder FROM sessions WHERE id = ?",
                              (session_id,)).fetchone()
        if row is None:
            raise ServeError(404, f"no session {session_id!r}", "session", "session_not_found")
        return row

    def record(self, session_id: str) -> dict:
        """What ``GET /v1/sessions/{id}`` returns: the session's times, turns, transcript and its LoRA's current blend
        (the generated and memory factors are in its state file)."""
        ident, created, updated, turns, folder = self._row(session_id)
        transcript = json.loads((self.root / folder / TRANSCRIPT_FILE).read_text())
        with safe_open(str(self.root / folder / STATE_FILE), framework="pt") as saved:
            labels = json.loads(saved.metadata()["labels"])
            blend = saved.get_tensor("blend_weights")[0].tolist()  # row 0: the session's
        return {"id": ident, "object": "session", "created": int(created), "updated": int(updated), "turns": turns,
                "system": transcript.get("system"), "messages": transcript["messages"],
                "blend": {label: round(weight, 4) for label, weight in zip(labels, blend) if weight}}

    def list(self) -> dict:
        rows = self.db.execute("SELECT id FROM sessions ORDER BY created").fetchall()
        return {"object": "list", "data": [self.record(ident) for (ident,) in rows]}

    def folder(self, session_id: str) -> Path:
        """The folder of the session's current version (its transcript and LoRA state files)."""
        return self.root / self._row(session_id)[4]

    def load(self, session_id: str, session: ChatSession) -> None:
        """Put the session's transcript and LoRA state into ``session`` (and its engine's state)."""
        session.load(self.folder(session_id))

    def create(self, session: ChatSession) -> str:
        """A new session from ``session`` as it stands (its system prompt, its engine's LoRA state)."""
        with self.lock:
            count = self.db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]
            if count >= self.max_sessions:
                raise ServeError(429, f"this server holds at most {self.max_sessions} sessions; delete one",
                                 None, "too_many_sessions")
            session_id = f"sess-{uuid.uuid4().hex}"
            folder = self._write(session_id, 0, session)
            now = time.time()
            self.db.execute("INSERT INTO sessions VALUES (?, ?, ?, 0, ?)", (session_id, now, now, folder))
        return session_id

    def commit(self, session_id: str, session: ChatSession) -> None:
        """A turn done: its new version written whole, then made current, then the old one removed."""
        with self.lock:
            _, _, _, turns, old = self._row(session_id)
            folder = self._write(session_id, turns + 1, session)
            self.db.execute("UPDATE sessions SET updated = ?, turns = ?, folder = ? WHERE id = ?",
                            (time.time(), turns + 1, folder, session_id))
            shutil.rmtree(self.root / old, ignore_errors=True)

    def delete(self, session_id: str) -> None:
        with self.lock:
            self._row(session_id)
            self.db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            shutil.rmtree(self.root / session_id, ignore_errors=True)

    def _write(self, session_id: str, version: int, session: ChatSession) -> str:
        relative = f"{session_id}/v{version}"
        target = self.root / relative
        shutil.rmtree(target, ignore_errors=True)  # a version a killed process left half written
        session.save(target)
        return relative
