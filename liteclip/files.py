"""File I/O that must survive a crash and never touch what it did not write: atomic file writes, folders written
beside the user's files (write_directory), safetensors reads that name a damaged file, weights into a module, file
hashes. It knows no model: what goes into a model directory is liteclip.pretrained's business, and a training
checkpoint is liteclip.train.run_directory's.

Writes go to a temporary file that is flushed, fsynced and renamed over the target (timm's checkpoint_saver does the
same), so a crash at any moment leaves either the old file or the new one, never a truncated one.
"""

from __future__ import annotations

import hashlib
import json
import os
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


MANIFEST_NAME = ".liteclip-written.json"  # in every directory a writer made: the entries liteclip wrote there


def write_directory(directory: str | Path, write_contents: Callable[[Path], None], what: str,
                    owned_names: set[str], owns: Callable[[Path, str], bool] | None = None) -> Path:
    """Writes the entries `write_contents(staging)` makes into `directory`, touching nothing else in it.

    A new directory appears whole: staged beside it and renamed into place. In an existing one (full, empty, or a
    mount point), each entry is staged inside it and swapped in by a rename; an entry of the same name is replaced
    only if liteclip wrote it and it is still exactly that (the directory's manifest lists it with its SHA-256; or,
    with no manifest, `owns(directory, name)` recognises a file an older liteclip wrote), and anything else of that
    name is refused before a byte is written. The user's other files are never moved, renamed or deleted. On an
    error the swapped entries are put back, so the directory is left as it was found; a crash midway leaves each
    entry either old or new, and the rest in a hidden `.liteclip-staging-*` folder inside it.

    Args:
        what: what is written, for messages ("the ONNX export").
        owned_names: every name write_contents may make; entries of these names that an earlier write left and this
            one does not make again are removed, while they are exactly what the manifest says liteclip made.
    """
    given = Path(directory).expanduser()
    if given.is_symlink() and not given.exists():  # resolving it would create folders wherever it points
        raise InputError(f"{what}: {given} is a link to {os.readlink(given)}, which does not exist; create that "
                         f"folder first, or give another output folder")
    # the path as the kernel reads it (`out/inner/..` is `out`): staging and renames happen where the files go
    directory = given.resolve()
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{what}: {directory} is a file, not a folder; give a folder path for the output")
    if directory.is_dir():
        check_replaceable(directory, owned_names, what, owns)
        return _swap_into(directory, write_contents, what, owned_names, owns)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".staging", dir=directory.parent))
    try:
        _stage(staging, write_contents, what, owned_names)
        try:  # a folder made meanwhile by someone else is not replaced unless empty (the rename fails otherwise)
            os.replace(staging, directory)
        except OSError as error:
            if not directory.exists():
                raise
            raise InputError(f"{what}: {directory} was made by something else while this was written; nothing was "
                             f"written there ({error.strerror})") from None
        _fsync_directory(directory.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # ours; gone already unless something failed
    return directory


def written_names(directory: Path) -> set[str]:
    """The entries a liteclip writer recorded in `directory`'s manifest (empty without one)."""
    manifest = _manifest(directory)
    return set(manifest[0]) if manifest else set()


def _manifest(directory: Path) -> tuple[list[str], dict[str, str]] | tuple[()]:
    """(top-level names, {relative path: SHA-256} of every file written below them) from the manifest; () when
    there is none, or it is not one liteclip writes (then nothing in the folder counts as liteclip's)."""
    path = directory / MANIFEST_NAME
    try:
        if path.is_symlink():
            return ()
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return ()
    names, files = (data.get("names"), data.get("files")) if isinstance(data, dict) else (None, None)
    if not isinstance(names, list) or not isinstance(files, dict):
        return ()
    return ([name for name in names if isinstance(name, str)],
            {name: digest for name, digest in files.items() if isinstance(name, str) and isinstance(digest, str)})


def changed_since_written(directory: Path, name: str, files: dict[str, str]) -> list[str]:
    """What under entry `name` is not exactly what liteclip recorded writing ([] when it all is): a file with
    another SHA-256 than the manifest holds (edited, or the user's own under the same name), a file or folder the
    manifest does not list (a note put into one of liteclip's folders), a link. A manifest left from another write
    holds other hashes, so nothing of the user's matches it."""
    path = directory / name
    if path.is_symlink() or not (path.is_file() or path.is_dir()):
        return [name]
    if path.is_file():
        return [] if files.get(name) == sha256_of(path) else [name]
    folders = {str(Path(recorded).parent) for recorded in files} | {name}
    changed = []
    for entry in sorted(path.rglob("*")):
        relative = str(entry.relative_to(directory))
        if entry.is_dir() and not entry.is_symlink():
            if relative not in folders:
                changed.append(relative)
        elif entry.is_symlink() or files.get(relative) != sha256_of(entry):
            changed.append(relative)
    return changed


def check_replaceable(directory: Path, owned_names: set[str], what: str,
                      owns: Callable[[Path, str], bool] | None = None, staged: Path | None = None) -> None:
    """Raises InputError naming what in `directory` a write would replace that is not exactly what liteclip wrote
    there: an entry of owned_names the manifest does not record with these very contents (the user's own file, one
    edited since, a note put into one of liteclip's folders), checked by SHA-256.

    owns: for a folder without a manifest, whether an older liteclip (before manifests) wrote entry `name`, judged
        by the files' own contents. staged: the new contents, once written: such an older folder may then hold only
        files the new contents hold too.
    """
    directory = Path(directory).expanduser().resolve()
    if not directory.is_dir():
        return
    manifest = _manifest(directory)
    present = sorted(name for name in owned_names if os.path.lexists(directory / name))
    if manifest:
        names, files = manifest
        foreign = [relative for name in present
                   for relative in ([name] if name not in names else changed_since_written(directory, name, files))]
    else:
        foreign = [name for name in present if owns is None or not owns(directory, name)]
        if staged is not None:  # an older liteclip's folder: nothing in it the new contents do not have
            known = {str(path.relative_to(staged)) for path in staged.rglob("*")}
            for name in present:
                if name not in foreign and (directory / name).is_dir() and not (directory / name).is_symlink():
                    foreign += sorted(str(path.relative_to(directory)) for path in (directory / name).rglob("*")
                                      if str(path.relative_to(directory)) not in known)
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        raise InputError(f"{what}: {directory} already holds {shown}, which liteclip did not write there (or which "
                         f"changed since); nothing was written. Choose a new or empty folder, or move those away")


def _stage(staging: Path, write_contents: Callable[[Path], None], what: str, owned_names: set[str]) -> None:
    """Runs the writer into `staging`, gives what it wrote ordinary modes, fsyncs it and adds the manifest."""
    write_contents(staging)
    names = sorted(entry.name for entry in staging.iterdir())
    unexpected = set(names) - owned_names
    if unexpected:  # a programming error: the refusal check above only knew owned_names
        raise RuntimeError(f"{what} wrote {sorted(unexpected)}, outside its owned names {sorted(owned_names)}")
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
    # every file with its hash: a later write replaces only what is still exactly this (check_replaceable)
    files = {str(path.relative_to(staging)): sha256_of(path) for path in sorted(staging.rglob("*"))
             if not path.is_dir()}
    (staging / MANIFEST_NAME).write_text(json.dumps({"written_by": "liteclip", "what": what, "names": names,
                                                     "files": files}, indent=1))
    (staging / MANIFEST_NAME).chmod(file_mode)


def _swap_into(directory: Path, write_contents: Callable[[Path], None], what: str, owned_names: set[str],
               owns: Callable[[Path, str], bool] | None) -> Path:
    """Renames each staged entry into an existing directory, keeping what it replaces until all are in."""
    work = Path(tempfile.mkdtemp(prefix=".liteclip-staging-", dir=directory))
    staged, previous = work / "new", work / "previous"
    staged.mkdir()
    previous.mkdir()
    swapped: list[str] = []  # names being moved in, in order; their predecessors (if any) wait in `previous`
    new_names: set[str] = set()
    try:
        _stage(staged, write_contents, what, owned_names)
        # checked again now that the new contents exist, right before the swap: a file put there meanwhile, or
        # into a folder an older liteclip wrote, is refused rather than replaced
        check_replaceable(directory, owned_names, what, owns, staged=staged)
        new_names = {entry.name for entry in staged.iterdir()}
        # entries an earlier write made that this one does not make again (a vision_config/ of another tower):
        # removed only while they are exactly what it wrote
        names, files = _manifest(directory) or ([], {})
        stale = [name for name in (set(names) & owned_names) - new_names
                 if os.path.lexists(directory / name) and not changed_since_written(directory, name, files)]
        # the manifest last: until every entry is in, it still describes the folder as it was
        for name in sorted(new_names - {MANIFEST_NAME}) + stale + [MANIFEST_NAME]:
            swapped.append(name)
            if os.path.lexists(directory / name):
                os.rename(directory / name, previous / name)
            if name in new_names:
                os.rename(staged / name, directory / name)
        _fsync_directory(directory)
    except BaseException:
        for name in reversed(swapped):  # put back exactly what was there
            if name in new_names and not os.path.lexists(staged / name) and os.path.lexists(directory / name):
                os.rename(directory / name, staged / name)
            if os.path.lexists(previous / name):
                os.rename(previous / name, directory / name)
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)  # what it holds now is what liteclip wrote before
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
