"""The models the prediction service serves: one ``ModelHolder`` per project that has a
champion, each swapped (load fully, verify sha256, warm up, swap) when its champion changes,
and one last-served pointer per project, so a restart with the database down serves the same
models (``serving/current.json`` for the default project, ``serving/projects/<id>/current.json``
for the others).

Holders are made lazily: a project gets one when its champion is first seen (each poll lists
the projects), or when a request names a project whose model is not loaded yet (at most once
per poll interval, so a project without a champion costs a request one lookup now and then)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from quarkflow_core import registry
from quarkflow_core.config import Settings
from quarkflow_core.database import is_unreachable
from quarkflow_core.predictor import ModelHolder, Predictor, read_pointer, write_pointer
from quarkflow_core.projects import list_projects
from quarkflow_core.schema import DEFAULT_PROJECT, DEFAULT_PROJECT_ID, Project
from quarkflow_core.storage import Storage

log = logging.getLogger("quarkflow.service")


def load_served(path: str | Path, *, version: int | None, backend: str = "auto") -> Any:
    """The predictor of a verified artifact: a classifier's ``Predictor``, or a detector's
    ``detection.predictor.DetectionPredictor`` (the manifest's ``task`` says which)."""
    import json

    manifest = json.loads((Path(path) / "manifest.json").read_text())
    if manifest.get("task") == "detection":
        from quarkflow_core.detection.predictor import DetectionPredictor

        return DetectionPredictor.from_artifact(path, version=version, backend=backend)
    return Predictor.from_artifact(path, version=version, backend=backend)


def served_entry(predictor: Any) -> dict[str, Any]:
    """What ``/readyz`` says of a served model: its version, backend and device, and why that
    backend (``backend_note``; ``fallback`` when the one asked for could not be used)."""
    entry = {
        "ok": True,
        "version": predictor.version,
        "backend": predictor.backend_name,
        "device": getattr(predictor, "device", "cpu"),
    }
    note = getattr(predictor, "backend_note", None)
    if note:
        entry["backend_note"] = note
    if getattr(predictor, "fallback", False):
        entry["fallback"] = True
    return entry


class ProjectModels:
    """``holders``: project id -> its ``ModelHolder`` (the default project's always exists);
    ``names``: project id -> name, as of the last listing; ``errors``: project id -> why its
    champion could not be loaded at the last check (cleared once it loads)."""

    def __init__(
        self,
        settings: Settings,
        *,
        storage: Storage,
        cache_root: Path,
        serving_dir: Path,
        session: Callable[[], AbstractContextManager[Session]],
        on_swap: Callable[[int, Predictor], None],
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.cache_root = cache_root
        self.serving_dir = serving_dir
        self.session = session
        self.on_swap = on_swap
        self.holders: dict[int, ModelHolder] = {}
        self.names: dict[int, str] = {DEFAULT_PROJECT_ID: DEFAULT_PROJECT}
        self.errors: dict[int, str] = {}
        self._lock = threading.Lock()  # holders
        self._load_lock = threading.Lock()  # one champion check + load at a time
        self._tried: dict[int, float] = {}  # project id -> monotonic time of the last lazy try
        self.holder(DEFAULT_PROJECT_ID)

    # ------------------------------------------------------------------ holders

    def holder(self, project_id: int) -> ModelHolder:
        """The project's holder, made (empty) on first use."""
        with self._lock:
            holder = self.holders.get(project_id)
            if holder is None:
                holder = ModelHolder()
                holder.listeners.append(lambda predictor: self.on_swap(project_id, predictor))
                self.holders[project_id] = holder
            return holder

    def current(self, project_id: int = DEFAULT_PROJECT_ID) -> Predictor | None:
        holder = self.holders.get(project_id)
        return None if holder is None else holder.current

    def name(self, project_id: int) -> str:
        return self.names.get(project_id, f"#{project_id}")

    def no_model_message(self, project_id: int) -> str:
        if project_id == DEFAULT_PROJECT_ID:
            return (
                "no model is being served yet: approve a version (`quarkflow models approve`) "
                "or run `make demo`"
            )
        name = self.name(project_id)
        return (
            f"no model is being served in project {name} yet: approve a version "
            f"(`quarkflow --project {name} models approve`)"
        )

    def pointer(self, project_id: int = DEFAULT_PROJECT_ID) -> Path:
        if project_id == DEFAULT_PROJECT_ID:
            return self.serving_dir / "current.json"
        return self.serving_dir / "projects" / str(project_id) / "current.json"

    # ------------------------------------------------------------------ loading

    def refresh(self, project_id: int | None = None) -> bool:
        """Swap to each project's current champion where it changed (``None``: every project,
        listed afresh). Returns True when a swap happened. An unreachable database, or a
        default-project champion that cannot be loaded, raises (after the other projects were
        checked); another project's failure is kept in ``errors``, logged, and retried at the
        next check."""
        with self.session() as s:
            if project_id is None:
                listed = {p.id: p.name for p in list_projects(session=s)}
                self.names.update(listed)
                ids = list(listed)
            else:
                ids = [project_id]
                row = s.get(Project, project_id)
                if row is not None:
                    self.names[project_id] = row.name
        swapped, fatal = False, None
        for pid in ids:
            try:
                with self._load_lock:
                    swapped |= self._refresh_one(pid)
                self.errors.pop(pid, None)
            except Exception as exc:
                self.errors[pid] = f"{type(exc).__name__}: {exc}"[:500]
                if pid == DEFAULT_PROJECT_ID or is_unreachable(exc):
                    fatal = fatal or exc
                else:
                    log.warning("project %s: champion check failed: %s", self.name(pid), exc)
        if fatal is not None:
            raise fatal
        return swapped

    def _refresh_one(self, project_id: int) -> bool:
        with self.session() as s:
            row = registry.alias_of(session=s, alias=registry.CHAMPION, project_id=project_id)
            if row is None:
                return False
            current = self.current(project_id)
            if current is not None and current.sha256 == row.sha256:
                return False
            path = registry.materialize(storage=self.storage, row=row, cache_root=self.cache_root)
            version = row.version
        predictor = load_served(path, version=version, backend=self.settings.serving_backend)
        predictor.warm_up()
        self.holder(project_id).swap(predictor)
        write_pointer(
            self.pointer(project_id),
            predictor,
            path,
            project_id=project_id,
            project=self.name(project_id),
        )
        return True

    def ensure(self, project_id: int) -> Predictor | None:
        """The project's served model; when none is loaded, check its champion now (at most
        once per poll interval; any failure is logged and answered with None)."""
        current = self.current(project_id)
        if current is not None:
            return current
        now = time.monotonic()
        if now - self._tried.get(project_id, -1e9) < self.settings.model_poll_s:
            return None
        self._tried[project_id] = now
        try:
            self.refresh(project_id)
        except Exception as exc:
            log.warning("project %s: loading its champion failed: %s", self.name(project_id), exc)
        return self.current(project_id)

    def load_pointers(self) -> int:
        """With the database down at start: serve what each project served last (its pointer,
        verified against the artifact's sha256). Returns how many models were loaded."""
        found = {DEFAULT_PROJECT_ID: self.pointer(DEFAULT_PROJECT_ID)}
        for path in sorted(self.serving_dir.glob("projects/*/current.json")):
            if path.parent.name.isdigit():
                found[int(path.parent.name)] = path
        loaded = 0
        for pid, path in found.items():
            pointer = read_pointer(path)
            if not pointer:
                continue
            if pid != DEFAULT_PROJECT_ID and pointer.get("project"):
                self.names.setdefault(pid, str(pointer["project"]))
            try:
                predictor = load_served(
                    pointer["path"],
                    version=pointer["version"],
                    backend=self.settings.serving_backend,
                )
            except Exception as exc:
                log.warning("project %s: last served model unusable: %s", self.name(pid), exc)
                continue
            if predictor.sha256 == pointer["sha256"]:
                predictor.warm_up()
                self.holder(pid).swap(predictor)
                loaded += 1
        return loaded

    # ------------------------------------------------------------------ health

    def report(self) -> dict[str, dict[str, Any]]:
        """Per project name: the served version and backend, or why none is served."""
        out: dict[str, dict[str, Any]] = {}
        for pid in sorted(set(self.names) | set(self.holders)):
            current = self.current(pid)
            entry: dict[str, Any] = (
                served_entry(current) if current else {"ok": False, "error": "no model loaded"}
            )
            if pid in self.errors:
                entry["load_error"] = self.errors[pid]
            out[self.name(pid)] = entry
        return out
