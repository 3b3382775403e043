"""Append-only for real on Postgres: the history refuses TRUNCATE even from the table owner,
and the API and workers connect as a role that does not own the tables, so it can neither
change the history nor switch its triggers off, while every normal write still works.

Each test gets a fresh database, migrated by the test server's role (the table owner), and a
throw-away LOGIN role created by a Postgres superuser (the owner here may not create roles):
QF_TEST_POSTGRES_SUPERUSER_URL, else the test server's URL as user ``postgres``."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from quarkflow_core import migrations, registry
from quarkflow_core.config import get_settings
from quarkflow_core.database import (
    APPEND_ONLY_TABLES,
    app_privileges,
    check_database,
    grant_app_role,
    make_engine,
)
from quarkflow_core.errors import ConfigError
from quarkflow_core.schema import AuditLog, ModelVersion, PromotionEvent, Role
from quarkflow_core.storage import LocalStorage

pytestmark = pytest.mark.integration

HISTORY = ("audit_log", "promotion_events", "model_versions")
REFUSED_TRUNCATE = "append-only: TRUNCATE is refused"
NO_PERMISSION = "permission denied for table"
NOT_OWNER = "must be owner of table"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def superuser(request) -> Iterator[Engine]:
    admin = make_url(request.config.getoption("--pg-url"))
    default = admin.set(username="postgres", password=None, database="postgres")
    url = os.environ.get("QF_TEST_POSTGRES_SUPERUSER_URL") or default.render_as_string(
        hide_password=False
    )
    engine = make_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            is_super = conn.execute(
                text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            ).scalar()
    except Exception as exc:  # pragma: no cover - environment problem
        is_super = exc
    if is_super is not True:  # pragma: no cover - environment problem
        pytest.fail(
            f"no Postgres superuser at {make_url(url).render_as_string()}: {is_super}. These "
            "tests create roles; set QF_TEST_POSTGRES_SUPERUSER_URL."
        )
    yield engine
    engine.dispose()


@dataclass
class Deployment:
    """One database as a deployment sees it: the owner migrates, the app role runs."""

    owner_url: str
    app_url: str
    role: str
    owner: Engine
    app: Engine


def _new_role(superuser: Engine) -> str:
    role = f"qf_app_{uuid.uuid4().hex[:10]}"
    with superuser.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD 'app-pw-for-tests'"))
    return role


def _drop_role(superuser: Engine, role: str, database_url: str) -> None:
    """DROP OWNED BY (in the test database) removes its grants and default privileges."""
    db = make_url(database_url).database
    in_db = make_engine(
        superuser.url.set(database=db).render_as_string(hide_password=False),
        isolation_level="AUTOCOMMIT",
    )
    try:
        with in_db.connect() as conn:
            conn.execute(text(f"DROP OWNED BY {role}"))
    finally:
        in_db.dispose()
    with superuser.connect() as conn:
        conn.execute(text(f"DROP ROLE IF EXISTS {role}"))


@pytest.fixture
def deployment(pg_factory, superuser) -> Iterator[Deployment]:
    owner_url = pg_factory.create()
    migrations.upgrade(owner_url)
    role = _new_role(superuser)
    app_url = (
        make_url(owner_url)
        .set(username=role, password="app-pw-for-tests")
        .render_as_string(hide_password=False)
    )
    dep = Deployment(owner_url, app_url, role, make_engine(owner_url), make_engine(app_url))
    try:
        grant_app_role(dep.owner, role)
        yield dep
    finally:
        dep.app.dispose()
        dep.owner.dispose()
        _drop_role(superuser, role, owner_url)


def _refused(engine: Engine, sql: str, match: str) -> None:
    with pytest.raises(DBAPIError, match=match), engine.begin() as conn:
        conn.execute(text(sql))


def _counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in HISTORY}


def _granted(engine: Engine, role: str) -> dict[str, set[str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT table_name, privilege_type FROM information_schema.role_table_grants "
                "WHERE grantee = :r AND table_schema = 'public'"
            ),
            {"r": role},
        ).all()
    out: dict[str, set[str]] = {}
    for table, privilege in rows:
        out.setdefault(table, set()).add(privilege)
    return out


def _tables(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
            .scalars()
            .all()
        )


# --------------------------------------------------------------------------- the application


def _run_the_app(dep: Deployment, tmp_path) -> None:
    """What the API and workers write, through the core functions, as the app role: users and
    a token (then used and revoked), a registered version approved as champion, a prediction
    made by that champion and logged the way the outbox writes it, and feedback on it."""
    import torch

    from quarkflow_core.demo_data import demo_pngs
    from quarkflow_core.images import probe_image
    from quarkflow_core.ml.artifacts import save_artifact
    from quarkflow_core.ml.models import get_model
    from quarkflow_core.ml.transforms import eval_preset
    from quarkflow_core.outbox import Record
    from quarkflow_core.predictions import FEEDBACK, PREDICTION, apply_records, prediction_record
    from quarkflow_core.predictor import Predictor, summarize
    from quarkflow_core.users import create_token, create_user, revoke_token, touch_token

    torch.manual_seed(0)
    classes = [str(d) for d in range(10)]
    artifact = tmp_path / "artifact"
    save_artifact(
        artifact,
        model=get_model("smallcnn", num_classes=10, in_channels=1),
        architecture="smallcnn",
        classes=classes,
        in_channels=1,
        preset=eval_preset("digits28"),
    )
    storage = LocalStorage(tmp_path / "store")
    with Session(dep.app, expire_on_commit=False) as s:
        lead = create_user(session=s, username="lead", role=Role.ML_LEAD)
        create_user(session=s, username="expert", role=Role.DOMAIN_EXPERT)
        token, _ = create_token(session=s, user=lead, secret="k" * 32)
        s.commit()
        touch_token(session=s, token_hash=token.token_hash)
        revoke_token(session=s, token_id=token.id)
        s.commit()
        row = registry.register_version(
            session=s, storage=storage, artifact_dir=artifact, created_by="lead"
        )
        registry.approve(
            session=s,
            storage=storage,
            version=row,
            user=lead,
            reason="first champion of this deployment",
            cache_root=tmp_path / "cache",
        )
        champion = registry.alias_of(session=s, alias=registry.CHAMPION)
        assert champion is not None and champion.id == row.id

        predictor = Predictor.from_loaded(
            registry.load_version(storage=storage, row=champion, cache_root=tmp_path / "cache"),
            version=champion.version,
            sha256=champion.sha256,
            backend="eager",
        )
        pngs, labels = demo_pngs(1)
        probs = predictor.probabilities(np.stack([predictor.preprocess(pngs[0])]))[0]
        rec = prediction_record(
            summary=summarize(probs, predictor.classes),
            info=probe_image(pngs[0]),
            model_version=champion.version,
            latency_ms=1.0,
            review_threshold=1.0,  # every prediction opens a review item
        )
        answer = {
            "id": str(uuid.uuid4()),
            "prediction_id": rec["id"],
            "verdict": "wrong",
            "true_label": labels[0],
            "created_at": rec["created_at"],
        }
        records = [
            Record(0, PREDICTION, rec["id"], rec, pngs[0], 0),
            Record(0, FEEDBACK, answer["id"], answer, None, 0),
        ]
        apply_records(s, storage, records)
        s.commit()
        apply_records(s, storage, records)  # a replayed batch changes nothing
        s.commit()

        assert s.scalars(select(ModelVersion)).one().version == 1
        assert s.scalars(select(PromotionEvent)).one().action.value == "approve"
        assert {a.action for a in s.scalars(select(AuditLog))} >= {
            "models.register",
            "models.approve",
        }


# --------------------------------------------------------------------------- tests


def test_the_app_role_runs_the_app_and_cannot_rewrite_history(deployment, tmp_path):
    dep = deployment
    with dep.owner.connect() as conn:
        owners = set(
            conn.execute(text("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'"))
            .scalars()
            .all()
        )
    assert dep.role not in owners and len(owners) == 1

    _run_the_app(dep, tmp_path)
    before = _counts(dep.owner)
    assert all(before.values()), before
    # the app reads the schema's revision (/readyz does)
    assert check_database(dep.app) == migrations.head_revision()

    # (a) the owner itself cannot empty the history, nor reach it by a cascade
    for table in ("audit_log", "promotion_events"):  # model_versions: its FKs refuse first
        _refused(dep.owner, f"TRUNCATE {table}", f"{table} rows are {REFUSED_TRUNCATE}")
    for table in HISTORY:
        _refused(dep.owner, f"TRUNCATE {table} CASCADE", REFUSED_TRUNCATE)
    _refused(dep.owner, "TRUNCATE users CASCADE", REFUSED_TRUNCATE)
    _refused(dep.owner, "TRUNCATE model_versions, promotion_events CASCADE", REFUSED_TRUNCATE)

    # (c) the app role can change nothing of it, nor switch off what guards it
    for table in HISTORY:
        _refused(dep.app, f"UPDATE {table} SET created_at = created_at", NO_PERMISSION)
        _refused(dep.app, f"DELETE FROM {table}", NO_PERMISSION)
        _refused(dep.app, f"TRUNCATE {table}", NO_PERMISSION)
        _refused(dep.app, f"ALTER TABLE {table} DISABLE TRIGGER ALL", NOT_OWNER)
        _refused(dep.app, f"DROP TABLE {table}", NOT_OWNER)
    _refused(dep.app, "TRUNCATE users CASCADE", NO_PERMISSION)
    _refused(dep.app, "DROP TABLE users CASCADE", NOT_OWNER)
    _refused(dep.app, "ALTER TABLE audit_log OWNER TO CURRENT_USER", NOT_OWNER)
    _refused(dep.app, "SET session_replication_role = replica", "permission denied")
    with dep.app.begin() as conn:  # without grant options: a warning, and nothing granted
        conn.execute(text(f"GRANT UPDATE, DELETE, TRUNCATE ON audit_log TO {dep.role}"))
    _refused(dep.app, "DELETE FROM audit_log", NO_PERMISSION)
    _refused(dep.app, "UPDATE alembic_version SET version_num = '0001'", NO_PERMISSION)
    _refused(dep.app, "DELETE FROM alembic_version", NO_PERMISSION)
    _refused(
        dep.app,
        "CREATE TRIGGER t BEFORE INSERT ON audit_log "
        "FOR EACH STATEMENT EXECUTE FUNCTION qf_forbid_truncate()",
        "permission denied|must be owner",
    )
    # ...and the row triggers still stop the owner too
    _refused(dep.owner, "UPDATE audit_log SET outcome = 'ok'", "append-only")
    _refused(dep.owner, "DELETE FROM promotion_events", "append-only")

    assert _counts(dep.owner) == before
    with dep.owner.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == (
            migrations.head_revision()
        )
        triggers = conn.execute(
            text(
                "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal AND tgenabled = 'O' "
                "AND (tgname LIKE '%\\_no\\_truncate' OR tgname LIKE '%\\_append\\_only')"
            )
        ).scalar_one()
    assert triggers == 2 * len(HISTORY)


def test_grants_are_exact_idempotent_and_reach_tables_added_later(deployment):
    dep = deployment
    expected = {t: set(app_privileges(t)) for t in _tables(dep.owner)}
    assert expected["audit_log"] == {"SELECT", "INSERT"}
    assert expected["alembic_version"] == {"SELECT"}
    assert expected["predictions"] == {"SELECT", "INSERT", "UPDATE", "DELETE"}
    assert _granted(dep.owner, dep.role) == expected
    # something granted by hand is taken back by the next run; repeating changes nothing
    with dep.owner.begin() as conn:
        conn.execute(text(f"GRANT ALL ON audit_log, alembic_version TO {dep.role}"))
    assert "TRUNCATE" in _granted(dep.owner, dep.role)["audit_log"]
    for _ in range(2):
        granted = grant_app_role(dep.owner, dep.role)
        assert {t: set(p) for t, p in granted.items()} == expected
        assert _granted(dep.owner, dep.role) == expected

    # a table a later migration adds (as the owner) is usable by the app at once
    with dep.owner.begin() as conn:
        conn.execute(text("CREATE TABLE later_things (id serial PRIMARY KEY, note text)"))
    with dep.app.begin() as conn:
        conn.execute(text("INSERT INTO later_things (note) VALUES ('a'), ('b')"))
        conn.execute(text("UPDATE later_things SET note = 'c' WHERE note = 'a'"))
        conn.execute(text("DELETE FROM later_things WHERE note = 'b'"))
        assert conn.execute(text("SELECT note FROM later_things")).scalars().all() == ["c"]
    _refused(dep.app, "TRUNCATE later_things", NO_PERMISSION)
    _refused(dep.app, "DROP TABLE later_things", NOT_OWNER)


def test_the_app_role_must_not_be_the_owner_a_superuser_or_missing(deployment, superuser):
    dep = deployment
    with dep.owner.connect() as conn:
        owner = conn.execute(text("SELECT current_user")).scalar_one()
    owners_own = _granted(dep.owner, owner)
    with pytest.raises(ConfigError, match="owner of the tables"):
        grant_app_role(dep.owner, owner)
    with pytest.raises(ConfigError, match="superuser"):
        grant_app_role(dep.owner, "postgres")
    with superuser.connect() as conn:
        conn.execute(text(f"ALTER ROLE {dep.role} CREATEROLE"))
    with pytest.raises(ConfigError, match="CREATEROLE"):
        grant_app_role(dep.owner, dep.role)
    with superuser.connect() as conn:
        conn.execute(text(f"ALTER ROLE {dep.role} NOCREATEROLE"))
    with pytest.raises(ConfigError, match="does not exist; create it first"):
        grant_app_role(dep.owner, "qf_nobody_" + uuid.uuid4().hex[:6])
    sqlite = make_engine("sqlite://")
    with pytest.raises(ConfigError, match="need Postgres"):
        grant_app_role(sqlite, "anyone")
    sqlite.dispose()
    assert _granted(dep.owner, owner) == owners_own  # nothing was revoked from the owner
    assert owners_own["audit_log"] >= {"UPDATE", "DELETE", "TRUNCATE"}  # the triggers stop it


def test_the_append_only_tables_are_the_same_everywhere(deployment):
    """The grants, the triggers of the migrations and the ORM guard name the same tables."""
    from quarkflow_core import schema

    with deployment.owner.connect() as conn:
        by_trigger = {
            proc: set(
                conn.execute(
                    text(
                        "SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                        "JOIN pg_proc p ON p.oid = t.tgfoid WHERE p.proname = :f"
                    ),
                    {"f": proc},
                ).scalars()
            )
            for proc in ("qf_forbid_change", "qf_forbid_truncate")
        }
    guarded = {model.__tablename__ for model in schema.APPEND_ONLY}
    assert set(APPEND_ONLY_TABLES) == set(HISTORY) == guarded
    assert by_trigger == {"qf_forbid_change": guarded, "qf_forbid_truncate": guarded}


def test_truncate_triggers_downgrade_and_upgrade(pg_factory):
    url = pg_factory.create()
    engine = make_engine(url)
    try:
        migrations.upgrade(url)
        _refused(engine, "TRUNCATE audit_log", REFUSED_TRUNCATE)
        migrations.downgrade(url, "0002")
        with engine.begin() as conn:  # 0002's schema: only the row triggers
            conn.execute(text("TRUNCATE audit_log"))
            assert not conn.execute(
                text("SELECT 1 FROM pg_proc WHERE proname = 'qf_forbid_truncate'")
            ).first()
        migrations.upgrade(url)
        _refused(engine, "TRUNCATE audit_log", REFUSED_TRUNCATE)
    finally:
        engine.dispose()


def test_the_cli_migrates_as_the_owner_and_grants_the_app_role(pg_factory, superuser, monkeypatch):
    """`quarkflow init`'s database step (`db upgrade`) with the two URLs of a deployment."""
    from app.cli import app

    owner_url = pg_factory.create()
    role = _new_role(superuser)
    app_url = make_url(owner_url).set(username=role, password="app-pw-for-tests")
    try:
        monkeypatch.setenv("QF_DATABASE_URL", app_url.render_as_string(hide_password=False))
        # no owner URL: migrating as the app role fails, it may not create tables
        get_settings.cache_clear()
        out = CliRunner().invoke(app, ["db", "upgrade"])
        assert out.exit_code != 0 and "permission denied" in str(out.exception)

        monkeypatch.setenv("QF_MIGRATION_DATABASE_URL", owner_url)
        monkeypatch.setenv("QF_DATABASE_APP_ROLE", role)
        get_settings.cache_clear()
        out = CliRunner().invoke(app, ["db", "upgrade"])
        assert out.exit_code == 0, out.output + repr(out.exception)
        assert f"role {role}: read/write on" in out.output
        assert "no UPDATE/DELETE/TRUNCATE on alembic_version, audit_log, model_versions" in (
            " ".join(out.output.split())
        )
        owner = make_engine(owner_url)
        try:
            expected = {t: set(app_privileges(t)) for t in _tables(owner)}
            assert _granted(owner, role) == expected
            out = CliRunner().invoke(app, ["db", "grant-app-role", role])
            assert out.exit_code == 0, out.output + repr(out.exception)
            assert _granted(owner, role) == expected
        finally:
            owner.dispose()
        out = CliRunner().invoke(app, ["db", "current"])
        assert out.exit_code == 0 and "up to date" in out.output
        out = CliRunner().invoke(app, ["db", "grant-app-role", "qf_nobody"])
        assert isinstance(out.exception, ConfigError)
        assert "'qf_nobody' does not exist" in out.exception.detail
    finally:
        from quarkflow_core.database import get_engine

        settings = get_settings()  # the CLI's cached engines hold the role's connections
        for url in {settings.database_url, settings.migration_database_url} - {None}:
            get_engine(url).dispose()
        get_engine.cache_clear()
        _drop_role(superuser, role, owner_url)


@pytest.mark.unit
def test_the_deploy_files_migrate_as_the_owner_and_run_the_apps_as_the_app_role():
    import re
    from pathlib import Path

    import yaml

    deploy = Path(__file__).resolve().parents[1] / "deploy"

    def user(url: str) -> str:
        return re.fullmatch(r"postgresql://([^:]+):\$\{[A-Z_]+:\?[^}]+\}@postgres:5432/\w+", url)[1]

    services = yaml.safe_load((deploy / "compose.yaml").read_text())["services"]
    migrate = services["migrate"]["environment"]
    role = migrate["QF_DATABASE_APP_ROLE"]
    owner = services["postgres"]["environment"]["POSTGRES_USER"]
    assert user(migrate["QF_MIGRATION_DATABASE_URL"]) == owner != role
    for name in ("api", "workbench", "worker", "migrate"):
        env = services[name]["environment"]
        assert user(env["QF_DATABASE_URL"]) == role, name
        assert "POSTGRES_APP_PASSWORD" in env["QF_DATABASE_URL"], name
        if name != "migrate":
            assert "QF_MIGRATION_DATABASE_URL" not in env, name
    assert "POSTGRES_APP_PASSWORD" in services["postgres"]["environment"]
    init = (deploy / "postgres-init.sql").read_text()
    assert "\\getenv app_password POSTGRES_APP_PASSWORD" in init
    assert f"CREATE ROLE {role} LOGIN PASSWORD :'app_password';" in init

    docs = [
        d
        for f in sorted((deploy / "k8s").glob("*.yaml"))
        for d in yaml.safe_load_all(f.read_text())
    ]
    for doc in docs:
        if doc and doc["kind"] in ("Deployment", "Job"):
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            refs = [
                s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s
            ]
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if doc["metadata"]["name"] == "quarkflow-migrate":
                assert refs == ["quarkflow-secrets", "quarkflow-migrate-secrets"]
                assert env["QF_DATABASE_APP_ROLE"] == role
            else:  # the owner's URL reaches the migrate Job only
                assert "quarkflow-migrate-secrets" not in str(doc), doc["metadata"]["name"]
    header = (deploy / "k8s" / "config.yaml").read_text()
    assert f"QF_DATABASE_URL='postgresql://{role}:APP_PASSWORD@" in header
    assert f"QF_MIGRATION_DATABASE_URL='postgresql://{owner}:PASSWORD@" in header
    assert f"CREATE ROLE {role} LOGIN PASSWORD" in header
