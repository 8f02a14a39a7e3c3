"""Per-image cache of mask proposals, so another checkpoint or class list reuses SAM's work.

Layout: ``ROOT/<fingerprint>/<key>.json``, one JSON file per image holding the image key, the
fingerprint and the proposals (RLE masks, as :class:`evaluation.proposals.MaskGenerator` returns
them). The fingerprint (:meth:`MaskGenerator.fingerprint`) covers the SAM weights and every setting
that changes proposals, so a changed setting reads from a fresh folder instead of stale masks. Writes
are atomic (a temporary file in the same folder, then ``os.replace``), so a killed run leaves whole
files or none and a restarted run picks up where it stopped. A file that does not parse, or that
names another key or fingerprint, is treated as absent (and logged), never as proposals.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ProposalCache:
    """``get``/``put`` proposals by image key under ``root/fingerprint``."""

    def __init__(self, root: str | os.PathLike, fingerprint: str):
        if not fingerprint or _UNSAFE.search(fingerprint):
            raise ValueError(f"proposal cache fingerprint {fingerprint!r} must be a non-empty [A-Za-z0-9._-] string")
        self.fingerprint = fingerprint
        self.dir = Path(root) / fingerprint

    def path(self, image_key: str) -> Path:
        """The file of ``image_key``: a readable form of the key plus a hash of it (keys may hold slashes)."""
        if not image_key:
            raise ValueError("empty image key")
        readable = _UNSAFE.sub("_", image_key)[-80:].lstrip(".") or "image"
        digest = hashlib.sha1(image_key.encode()).hexdigest()[:10]
        return self.dir / f"{readable}-{digest}.json"

    def get(self, image_key: str) -> list[dict] | None:
        """The cached proposals of ``image_key``, or None when absent or unreadable."""
        path = self.path(image_key)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("proposal cache: ignoring unreadable %s: %s", path, e)
            return None
        if (not isinstance(data, dict) or data.get("image_key") != image_key
                or data.get("fingerprint") != self.fingerprint or not isinstance(data.get("proposals"), list)):
            log.warning("proposal cache: ignoring %s (not proposals of %r with fingerprint %s)",
                        path, image_key, self.fingerprint)
            return None
        return data["proposals"]

    def put(self, image_key: str, proposals: list[dict]) -> Path:
        """Write ``proposals`` for ``image_key`` atomically; returns the file."""
        path = self.path(image_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"image_key": image_key, "fingerprint": self.fingerprint, "proposals": proposals})
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(payload)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path
