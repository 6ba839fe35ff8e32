"""The git tree hash of a folder, for the GPU report: `git rev-parse HEAD:<folder>` names the
sources a report was measured on.

    python bench/tree_hash.py csrc

Prints key=value lines: csrc_tree (the tree hash of the folder as it is on disk, computed the
way git hashes trees, so it is there even where the working tree travelled without .git),
csrc_head_tree (`git rev-parse HEAD:csrc` where git is there), csrc_status (`git status
--porcelain` of the folder, entries separated by ';') and csrc_clean (whether the files on disk
are HEAD's: the two hashes agree).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys


def _object_id(kind: str, data: bytes) -> bytes:
    return hashlib.sha1(kind.encode() + b" " + str(len(data)).encode() + b"\0" + data).digest()


def tree_id(path: str) -> bytes | None:
    """Git's object id of the tree of `path` (None for a folder without files: git stores no
    empty trees). Regular files are 100644, executable ones 100755, links 120000."""
    entries = []
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.islink(full):
            entries.append((name, b"120000", _object_id("blob", os.readlink(full).encode())))
        elif os.path.isdir(full):
            if name == "__pycache__":
                continue
            sub = tree_id(full)
            if sub is not None:
                entries.append((name + "/", b"40000", sub))
        elif os.path.isfile(full):
            with open(full, "rb") as f:
                blob = _object_id("blob", f.read())
            mode = b"100755" if os.access(full, os.X_OK) else b"100644"
            entries.append((name, mode, blob))
    if not entries:
        return None
    # git orders entries by name, with a folder's name compared as if it ended in '/'
    entries.sort(key=lambda e: e[0].encode())
    body = b"".join(mode + b" " + name.rstrip("/").encode() + b"\0" + oid
                    for name, mode, oid in entries)
    return _object_id("tree", body)


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def main(argv: list[str]) -> int:
    folder = argv[0] if argv else "csrc"
    key = os.path.basename(os.path.normpath(folder))
    tree = tree_id(folder)
    on_disk = tree.hex() if tree is not None else "unavailable"
    head = _git("rev-parse", f"HEAD:{folder}")
    status = _git("status", "--porcelain", "--", folder).replace("\n", ";")
    print(f"{key}_tree={on_disk}")
    print(f"{key}_head_tree={head or 'unavailable (no git)'}")
    print(f"{key}_status={status}")
    print(f"{key}_clean={'yes' if head == on_disk else ('unknown' if not head else 'no')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
