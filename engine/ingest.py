"""Getting data in safely on a shared server: folders only inside data roots, safe zip uploads.

This module never imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional

from engine import locations, runfiles
from engine.status import now_iso
from engine.users import User, local_user

# Written into each upload's folder: whose it is and when it came.
UPLOAD_NOTE = ".upload.json"


def resolve_in_roots(path: str | os.PathLike, roots: list[Path]) -> Path:
    """Resolves `path` (symlinks and `..` included) and checks it lies inside one of `roots`.

    Links inside the folder are checked too: the scan reads linked class folders and
    linked files, so a link below the folder that leads out of every root refuses the folder.

    Raises:
        ValueError: the folder does not exist, it resolves outside every data root, or a
            link inside it does.
    """
    try:
        resolved = Path(path).expanduser().resolve(strict=True)
    except (OSError, RuntimeError):
        raise ValueError(f"Folder {str(path)!r} does not exist.") from None
    if not _inside_roots(resolved, roots):
        allowed = ", ".join(str(root) for root in roots) or "none configured"
        raise ValueError(
            f"Folder {str(path)!r} is outside the data roots ({allowed}); links and '..' are followed "
            f"before this check. Ask the server's administrator to add a root (TRANSFER_STUDIO_DATA_ROOTS)."
        )
    if not resolved.is_dir():
        raise ValueError(f"{str(path)!r} is a file, not a folder of class subfolders.")
    leaving = _first_link_leaving_roots(resolved, roots)
    if leaving is not None:
        raise ValueError(
            f"Folder {str(path)!r} holds a link that leads outside the data roots: "
            f"{str(leaving.relative_to(resolved))!r}. Remove the link or copy the files into the folder."
        )
    return resolved


def _inside_roots(resolved: Path, roots: list[Path]) -> bool:
    return any(resolved == root or root in resolved.parents for root in roots)


def _first_link_leaving_roots(folder: Path, roots: list[Path]) -> Optional[Path]:
    """The first symbolic link below `folder` whose target resolves outside every root, or None.

    Linked folders are checked as links and not entered, so a link loop cannot trap the walk.
    """
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda entry: entry.name)
        except OSError:
            continue
        for entry in entries:
            if entry.is_symlink():
                try:
                    target = Path(entry.path).resolve()
                except (OSError, RuntimeError):
                    return Path(entry.path)  # a link loop: refuse rather than guess
                if not _inside_roots(target, roots):
                    return Path(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
    return None


def list_dataset_folders(roots: list[Path], depth: int = 2) -> list[Path]:
    """Folders under the roots that look like datasets (they hold subfolders), up to `depth` levels.

    The Data page lists these on every rerun, so no file is `stat`ed: a directory listing says
    which entries are folders (a class folder of 15,000 images cost 15,000 `stat` calls before).
    """
    found = []
    for root in roots:
        frontier = [root]
        for _ in range(depth):
            next_frontier = []
            for folder in frontier:
                for child in _visible_subfolders(folder):
                    if _visible_subfolders(child, first_only=True):
                        found.append(child)
                    next_frontier.append(child)
            frontier = next_frontier
    return found


def _visible_subfolders(folder: Path, first_only: bool = False) -> list[Path]:
    """The subfolders of `folder` not starting with a dot, sorted (links to folders count); the first one only
    with `first_only`. Types come from the directory listing, so files cost no `stat`."""
    found = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    if not entry.name.startswith(".") and entry.is_dir():
                        found.append(Path(entry.path))
                        if first_only:
                            break
                except OSError:
                    continue
    except OSError:
        return []
    return sorted(found)


@dataclass(frozen=True)
class ZipLimits:
    """Limits on an uploaded archive, checked before anything is extracted."""

    max_members: int = 50_000
    max_total_bytes: int = 2 * 1024**3
    max_ratio: float = 200.0


def user_folder_name(user: User) -> str:
    """A folder name for a user's uploads: readable, safe on any file system, unique per user id."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "-", user.name or "user").strip("-")[:32] or "user"
    return f"{readable}-{_user_hash(user.id)}"


@dataclass(frozen=True)
class Upload:
    """One uploaded dataset: its folder, who uploaded it and when."""

    path: Path
    owner: str
    owner_name: str
    uploaded: str


UPLOAD_FOLDER = re.compile(r"upload-[0-9a-f]{12}")


def list_uploads(uploads_dir: Optional[str | os.PathLike] = None) -> list[Upload]:
    """Every uploaded dataset with its owner, newest first (everyone's: members see every run's data too).

    Only notes this module wrote count: at `<user folder>/upload-<12 hex>/`, in the folder of
    the user they name, pointing inside their own upload. An archive cannot carry a note that
    passes (its members land one level deeper), nor point the Data page elsewhere.
    """
    root = Path(uploads_dir or locations.uploads_dir()).resolve()
    uploads = []
    for note_path in root.glob(f"*/upload-*/{UPLOAD_NOTE}"):
        upload_folder = note_path.parent
        note = runfiles.read_json(note_path)
        if not UPLOAD_FOLDER.fullmatch(upload_folder.name) or not isinstance(note, dict) or not note_path.is_file():
            continue
        owner = str(note.get("owner", ""))
        if not upload_folder.parent.name.endswith("-" + _user_hash(owner)):
            continue  # a note naming someone other than the folder's owner
        dataset = Path(str(note.get("dataset") or upload_folder)).resolve()
        if dataset != upload_folder and upload_folder not in dataset.parents:
            continue
        uploads.append(Upload(path=dataset, owner=owner, owner_name=str(note.get("owner_name", "")),
                              uploaded=str(note.get("uploaded", ""))))
    return sorted(uploads, key=lambda upload: upload.uploaded, reverse=True)


def _user_hash(user_id: str) -> str:
    return hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:10]


def extract_zip(archive: BinaryIO | str | os.PathLike, uploads_dir: Optional[str | os.PathLike] = None,
                limits: ZipLimits = ZipLimits(), owner: Optional[User] = None) -> Path:
    """Extracts an uploaded zip of class folders into a fresh folder in its owner's uploads; returns the dataset folder.

    Members with absolute paths, `..`, or symlinks are refused (zip-slip), as are archives
    over the member-count, total-size or compression-ratio limits. A refused archive leaves
    nothing behind. Each user's uploads go into a folder of their own
    (`uploads/<name>-<hash of the user id>/`), with a note of who uploaded it.

    Args:
        owner: Who uploads (default: the local user).

    Raises:
        PermissionError: a viewer (viewers look; they do not add data).
        ValueError: the archive is not a zip or breaks a rule; the message names the member.
    """
    owner = owner or local_user()
    if not owner.can_start:
        raise PermissionError(f"{owner.name} is a viewer: viewers see the data but cannot upload any.")
    target_parent = Path(uploads_dir or locations.uploads_dir()) / user_folder_name(owner)
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = bundle.infolist()
            _check_members(members, limits)
            target_parent.mkdir(parents=True, exist_ok=True)
            target = target_parent / f"upload-{secrets.token_hex(6)}"
            target.mkdir()
            try:
                for member in members:
                    destination = target / member.filename
                    if member.is_dir():
                        destination.mkdir(parents=True, exist_ok=True)
                        continue
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    with bundle.open(member) as source, open(destination, "wb") as sink:
                        _copy_limited(source, sink, member)
            except OSError as error:
                # E.g. a member named like a folder another member already made a file.
                _remove_upload(target)
                raise ValueError(f"The archive could not be extracted: {error.strerror or error} "
                                 f"({getattr(member, 'filename', '?')!r}); nothing was kept.") from None
            except BaseException:
                _remove_upload(target)
                raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as error:
        # Also a member that fails its CRC check half-way through, or an unsupported compression method.
        detail = f": {error}" if str(error) else ""
        raise ValueError(f"The upload is not a valid zip archive{detail}.") from None
    entries = [entry for entry in target.iterdir() if not entry.name.startswith((".", "__MACOSX"))]
    # A zip of one top folder (the usual "compress folder") is that folder's dataset.
    dataset = entries[0] if len(entries) == 1 and entries[0].is_dir() else target
    runfiles.atomic_write_json(target / UPLOAD_NOTE, {"owner": owner.id, "owner_name": owner.name,
                                                      "uploaded": now_iso(), "dataset": str(dataset)})
    return dataset


def _remove_upload(target: Path) -> None:
    """Removes a refused upload, and its user's folder when that held nothing else: nothing is left."""
    shutil.rmtree(target, ignore_errors=True)
    try:
        target.parent.rmdir()
    except OSError:
        pass  # The user has other uploads.


def _check_members(members, limits: ZipLimits) -> None:
    if len(members) > limits.max_members:
        raise ValueError(f"The archive has {len(members)} entries; at most {limits.max_members} are allowed.")
    total = 0
    for member in members:
        name = member.filename
        parts = Path(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
            raise ValueError(f"Archive member {name!r} points outside the archive (absolute path or '..'); refused.")
        mode = member.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise ValueError(f"Archive member {name!r} is a symbolic link; links are refused.")
        total += member.file_size
        if member.compress_size and member.file_size / member.compress_size > limits.max_ratio:
            raise ValueError(
                f"Archive member {name!r} expands {member.file_size / member.compress_size:.0f}× "
                f"(over the limit of {limits.max_ratio:.0f}×): it looks like a zip bomb; refused.")
    if total > limits.max_total_bytes:
        raise ValueError(f"The archive expands to {total / 1024**2:.0f} MB; at most "
                         f"{limits.max_total_bytes / 1024**2:.0f} MB are allowed.")


def _copy_limited(source, sink, member) -> None:
    # The sizes in the zip directory can lie; never write more than the member declared.
    remaining = member.file_size
    while True:
        chunk = source.read(1024 * 1024)
        if not chunk:
            return
        remaining -= len(chunk)
        if remaining < 0:
            raise ValueError(f"Archive member {member.filename!r} is larger than its header says; refused.")
        sink.write(chunk)
