"""File I/O that must survive a crash: atomic file and directory writes, training checkpoints, weights into a
module, file hashes. It knows no model: what goes into a model directory is liteclip.pretrained's business.

Writes go to a temporary file that is flushed, fsynced and renamed over the target (timm's checkpoint_saver does the
same), so a crash at any moment leaves either the old file or the new one, never a truncated one. Reads never
unpickle: model weights are safetensors, training checkpoints load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from liteclip.errors import InputError, ModelLoadError


def ordinary_mode(directory: bool = False) -> int:
    """The permissions an ordinary write or mkdir gives under the current umask (0644 / 0755 under umask 022);
    mkstemp and mkdtemp make private 0600 / 0700 entries, which another user or a web server cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes `data` to `path` so that readers see the old file or the whole new one, never a part. The file gets
    the mode an ordinary write would give it: the old file's, or the umask's for a new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.is_file() else ordinary_mode()
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, mode)
        with os.fdopen(handle, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except OSError as error:
        Path(tmp_name).unlink(missing_ok=True)
        # the OS names no file for a full disk; the previous `path` is untouched either way
        raise OSError(error.errno, f"cannot write {path} ({len(data) / 2**20:.1f} MiB): "
                                   f"{error.strerror or error}; the previous file is kept") from error
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # the rename itself must reach the disk too, or a power cut can undo it
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_directory(directory: str | Path, write_contents: Callable[[Path], None],
                      owned_names: set[str]) -> Path:
    """Fills a fresh staging folder with write_contents(staging), then swaps it in for `directory` at once.

    Entries of an existing `directory` that are not in owned_names (a README, notes) move over to the new one; a
    crash before the swap leaves the old directory as it was.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write_contents(staging)
        # mkdtemp made the folder private, and some writers (safetensors) make private files: everything written
        # gets the modes an ordinary write gives, so the directory reads like one copied into place
        file_mode, folder_mode = ordinary_mode(), ordinary_mode(directory=True)
        for entry in staging.rglob("*"):
            if entry.is_file():
                entry.chmod(file_mode)
                with open(entry, "rb") as handle:
                    os.fsync(handle.fileno())
            elif entry.is_dir():
                entry.chmod(folder_mode)
        staging.chmod(folder_mode)
        previous = directory.with_name(f".{directory.name}.previous")
        if directory.exists():
            for entry in directory.iterdir():
                if entry.name not in owned_names:
                    os.replace(entry, staging / entry.name)
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(directory, previous)
        os.replace(staging, directory)
        shutil.rmtree(previous, ignore_errors=True)
        _fsync_directory(directory.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def refuse_overlap(output: str | Path, source: str | Path, what: str) -> None:
    """Raises InputError when writing `output` would replace or reach into `source`: the same path, one inside the
    other, or the same file under another name (a link)."""
    out, src = Path(output).resolve(), Path(source).resolve()
    same_file = out.exists() and src.exists() and os.path.samefile(out, src)
    if same_file or out.is_relative_to(src) or src.is_relative_to(out):
        raise InputError(f"{what}: the output {output} would overwrite its own input {source}; "
                         f"write it somewhere else (a new folder beside it)")


def file_stamp(path: str | Path) -> list[int]:
    """[size in bytes, modification time in ns]: what tells that a file changed without reading it."""
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digest_tensors(digest: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Feeds every tensor's name and raw bytes, in name order, into a hashlib digest (cache keys of weights)."""
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())


# ------------------------------------------------------------------------------------------ weights and checkpoints


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a message that names every missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{name}: file {tuple(state[name].shape)} vs model {tuple(expected[name].shape)}"
                  for name in sorted(set(state) & set(expected)) if state[name].shape != expected[name].shape]
    if missing or unexpected or mismatched:
        lines = [f"weights in {source} do not fit the model its config describes:"]
        for title, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if names:
                shown = ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")
                lines.append(f"  {title}: {shown}")
        raise ModelLoadError("\n".join(lines))
    model.load_state_dict(state)


def read_safetensors(path: str | Path, what: str,
                     names: Sequence[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file; a truncated or overwritten file is a ModelLoadError naming it.

    Args:
        what: what the file is and how to get a good one, for the message ("the model's weights: re-export ...").
        names: only these tensors (() for the metadata alone); None: all of them.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            wanted = handle.keys() if names is None else [name for name in names if name in handle.keys()]
            return {name: handle.get_tensor(name) for name in wanted}, dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelLoadError(f"{path} is damaged or not a safetensors file ({str(error).splitlines()[0][:200]}); "
                             f"it holds {what}") from None


def atomic_link(source: str | Path, target: str | Path) -> None:
    """Makes `target` the same file as `source` at once: a hard link renamed over it, or an atomic copy where the
    file system has no hard links. Sound here because every write replaces a file instead of changing it: the next
    save of `source` gives that name a new file and leaves `target` as it was."""
    source, target = Path(source), Path(target)
    staged = target.with_name(f".{target.name}.{os.getpid()}.link")
    staged.unlink(missing_ok=True)
    try:
        os.link(source, staged)
    except OSError:
        atomic_write_bytes(target, source.read_bytes())
        return
    try:
        os.replace(staged, target)
    finally:
        staged.unlink(missing_ok=True)  # left only if the rename failed
    _fsync_directory(target.parent)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Writes a training checkpoint (tensors, numbers, strings, dicts and lists only) atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a training checkpoint without running any code it may carry."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refused an object; its own messages are many and deep
        raise ModelLoadError(
            f"refused to load {path}: it is not a plain-tensor checkpoint that loads with weights_only=True "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}). liteclip never unpickles arbitrary "
            f"objects; re-export the weights as safetensors.") from None
    except Exception as error:  # a cut zip archive, an empty file, bytes that are no checkpoint at all
        reason = ": ".join(filter(None, [type(error).__name__, *str(error).split(". ")[:1]]))[:160]
        raise ModelLoadError(
            f"{path} is truncated or damaged ({path.stat().st_size:,} bytes; {reason}). Checkpoints are written "
            f"whole, so it was cut or changed afterwards (a full disk while copying, a partial download): resume "
            f"from another copy, or from best.pt beside it (--resume RUN_DIR/best.pt).") from None
