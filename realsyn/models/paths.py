"""Models loaded from a local path: one error type whose message is one line (which model, which path, how to provide it).

Production mounts every model under ``/models`` (``k8s/``) and runs with ``HF_HUB_OFFLINE=1``, so a
model that is not at its path must fail the step at once, never fall back to a download or to
random weights. The embedded test/demo defaults (``embedded:`` names, random-weight configs) are
not paths and never reach this module.
"""

from __future__ import annotations

import os
from pathlib import Path

# Where production pods mount the model volume (k8s/).
MODELS_ROOT = "/models"


class ModelNotFoundError(RuntimeError):
    """A model is not at its configured local path; ``str()`` is one line naming model, path and fix."""

    def __init__(self, role: str, path: str | os.PathLike, setting: str, what: str = "directory"):
        self.role, self.path, self.setting = role, str(path), setting
        super().__init__(
            f"{role}: model {what} {self.path!r} does not exist; mount it there (production: the {MODELS_ROOT} volume)"
            f" or set {setting} to a local {what}"
        )


def looks_like_path(name: str) -> bool:
    """Whether a model name is meant as a local path rather than a hub id ("org/name") or tag."""
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)


def require_dir(role: str, path: str | os.PathLike, setting: str, must_contain: str | None = None) -> Path:
    """``path`` as a Path when it is a directory (holding ``must_contain`` if given); else ModelNotFoundError."""
    local = Path(path).expanduser()
    if not local.is_dir():
        raise ModelNotFoundError(role, local, setting, "directory")
    if must_contain is not None and not (local / must_contain).is_file():
        raise ModelNotFoundError(role, local / must_contain, setting, "file")
    return local


def require_file(role: str, path: str | os.PathLike, setting: str) -> Path:
    """``path`` as a Path when it is a file; else ModelNotFoundError."""
    local = Path(path).expanduser()
    if not local.is_file():
        raise ModelNotFoundError(role, local, setting, "file")
    return local
