"""The model registry (versions, aliases, history, promotion decisions) and starting a
retrain. Project-scoped: mounted at `/api/v1` (the default project) and at
`/api/v1/projects/{project}`."""

from fastapi import APIRouter
from sqlalchemy.orm import Session

from app.api.deps import (
    AppSettings,
    CurrentProject,
    DbSession,
    Service,
    Who,
    db_user,
)
from app.api.schemas import ERRORS, DecisionIn, ModelRef, RetrainIn, RollbackIn
from quarkflow_core import registry
from quarkflow_core.orchestration import start_retrain as start_retrain_run
from quarkflow_core.schema import ModelVersion, PromotionEvent, Role
from quarkflow_core.users import authorize

router = APIRouter()


def alias_tags(s: Session, project_id: int) -> dict[int, list[str]]:
    """Model version id -> the aliases that point at it."""
    tags: dict[int, list[str]] = {}
    for alias, row in registry.aliases(session=s, project_id=project_id).items():
        tags.setdefault(row.id, []).append(alias)
    return tags


def version_dict(s: Session, row: ModelVersion, tags: dict[int, list[str]]) -> dict:
    return {**registry.summary(row, session=s), "aliases": tags.get(row.id, [])}


def decided(s: Session, event: PromotionEvent) -> dict:
    return registry.event_dict(session=s, event=event)


def serving(service: Service, project_id: int) -> dict | None:
    """What this server serves for the project right now."""
    current = service.current(project_id)
    return current.describe() if current else None


@router.get("/models", tags=["models"], responses=ERRORS)
def list_models(who: Who, project: CurrentProject, s: DbSession) -> dict:
    """Every registered version with its aliases and headline metrics."""
    tags = alias_tags(s, project.id)
    rows = registry.list_versions(session=s, project_id=project.id)
    return {"versions": [version_dict(s, r, tags) for r in rows]}


@router.get("/models/aliases", tags=["models"], responses=ERRORS)
def get_aliases(who: Who, project: CurrentProject, service: Service, s: DbSession) -> dict:
    """champion / challenger -> version, and what this server is serving right now."""
    named = {a: r.version for a, r in registry.aliases(session=s, project_id=project.id).items()}
    return {"aliases": named, "serving": serving(service, project.id)}


@router.get("/models/history", tags=["models"], responses=ERRORS)
def model_history(who: Who, project: CurrentProject, s: DbSession) -> dict:
    """Every promotion event: who, when, from, to, why, evidence hash."""
    events = registry.history(session=s, project_id=project.id)
    return {"events": [registry.event_dict(session=s, event=e) for e in events]}


@router.get("/models/{ref}", tags=["models"], responses=ERRORS)
def get_model(ref: ModelRef, who: Who, project: CurrentProject, s: DbSession) -> dict:
    """One version (3, v3, champion, challenger) with its lineage."""
    row = registry.get_version(session=s, ref=ref, project_id=project.id)
    return {
        **version_dict(s, row, alias_tags(s, project.id)),
        "lineage": registry.lineage(session=s, row=row),
    }


@router.get("/models/{ref}/proposal", tags=["models"], responses=ERRORS)
def proposal(
    ref: ModelRef,
    who: Who,
    project: CurrentProject,
    service: Service,
    settings: AppSettings,
    s: DbSession,
) -> dict:
    """The policy's verdict on making this version champion, with the evidence."""
    authorize(
        s,
        actor=who,
        allowed={Role.ANALYST, Role.ML_LEAD},
        action="models.proposal",
        what="reading promotion evidence",
        project_id=project.id,
    )
    p = registry.propose(
        session=s,
        storage=service.storage,
        ref=ref,
        cache_root=service.cache_root,
        config=registry.PolicyConfig.for_project(
            session=s, project_id=project.id, settings=settings
        ),
        project_id=project.id,
    )
    return {"evidence_sha256": p.evidence_sha256, **p.evidence}


@router.post("/models/{ref}/approve", tags=["models"], responses=ERRORS)
def approve(
    ref: ModelRef,
    body: DecisionIn,
    who: Who,
    project: CurrentProject,
    service: Service,
    settings: AppSettings,
    s: DbSession,
) -> dict:
    """Make this version champion (role ml_lead). Serving switches within seconds."""
    event = registry.approve(
        session=s,
        storage=service.storage,
        version=ref,
        user=db_user(s, who),
        reason=body.reason,
        cache_root=service.cache_root,
        override=body.override,
        config=registry.PolicyConfig.for_project(
            session=s, project_id=project.id, settings=settings
        ),
        project_id=project.id,
    )
    return decided(s, event)


@router.post("/models/{ref}/reject", tags=["models"], responses=ERRORS)
def reject(
    ref: ModelRef, body: DecisionIn, who: Who, project: CurrentProject, s: DbSession
) -> dict:
    """Decline a candidate (role ml_lead)."""
    event = registry.reject(
        session=s, version=ref, user=db_user(s, who), reason=body.reason, project_id=project.id
    )
    return decided(s, event)


@router.post("/models/rollback", tags=["models"], responses=ERRORS)
def rollback(
    body: RollbackIn, who: Who, project: CurrentProject, service: Service, s: DbSession
) -> dict:
    """Move the champion back (role ml_lead)."""
    event = registry.rollback(
        session=s,
        storage=service.storage,
        user=db_user(s, who),
        reason=body.reason,
        to=body.to,
        project_id=project.id,
    )
    return decided(s, event)


@router.post("/retrain", status_code=202, tags=["models"], responses=ERRORS)
def start_retrain(
    body: RetrainIn, who: Who, project: CurrentProject, settings: AppSettings, s: DbSession
) -> dict:
    """Start the `retrain` deployment on the Prefect worker (role ml_lead)."""
    run_id = start_retrain_run(
        session=s,
        actor=who,
        api_url=settings.prefect_api_url,
        parameters=body.model_dump(),  # start_retrain names the project
        project_id=project.id,
    )
    return {"flow_run_id": run_id, "deployment": "retrain/retrain"}
