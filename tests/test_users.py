"""Users, roles, hashed API tokens and the audit log, on SQLite and Postgres."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text

from quarkflow_core.errors import (
    AlreadyExists,
    AuthenticationFailed,
    InvalidInput,
    PermissionDenied,
)
from quarkflow_core.schema import ApiToken, AuditLog, ImmutableRowError, Role
from quarkflow_core.users import (
    authenticate_password,
    authenticate_token,
    authorize,
    create_token,
    create_user,
    record_audit,
    revoke_token,
)

pytestmark = pytest.mark.integration
SECRET = "test-secret"


def test_create_user_and_sign_in(db_session):
    user = create_user(session=db_session, username="ada", role="ml_lead", password="correct horse")
    assert user.role is Role.ML_LEAD
    assert user.password_hash.startswith("scrypt$") and "correct horse" not in user.password_hash
    assert (
        authenticate_password(session=db_session, username="ada", password="correct horse") == user
    )
    with pytest.raises(AuthenticationFailed):
        authenticate_password(session=db_session, username="ada", password="wrong horse")
    with pytest.raises(AlreadyExists):
        create_user(session=db_session, username="ada", role="analyst", password="whatever1")


@pytest.mark.parametrize(
    ("username", "role"), [("x", "analyst"), ("ok_name", "boss"), ("a b", "admin")]
)
def test_create_user_rejects_bad_input(db_session, username, role):
    with pytest.raises(InvalidInput):
        create_user(session=db_session, username=username, role=role, password="longenough")


def test_tokens_are_hashed_at_rest_and_checked(db_session):
    user = create_user(session=db_session, username="bob", role="domain_expert")
    row, plaintext = create_token(session=db_session, user=user, secret=SECRET)
    stored = db_session.scalar(select(ApiToken.token_hash).where(ApiToken.id == row.id))
    assert plaintext.startswith("qf_") and plaintext not in stored and len(stored) == 64
    assert authenticate_token(session=db_session, token=plaintext, secret=SECRET) == user
    with pytest.raises(AuthenticationFailed):
        authenticate_token(session=db_session, token=plaintext, secret="other-secret")
    with pytest.raises(AuthenticationFailed):
        authenticate_token(session=db_session, token=plaintext + "x", secret=SECRET)
    revoke_token(session=db_session, token_id=row.id)
    with pytest.raises(AuthenticationFailed, match="revoked"):
        authenticate_token(session=db_session, token=plaintext, secret=SECRET)


def test_expired_token_is_refused(db_session):
    user = create_user(session=db_session, username="carol", role="analyst")
    _, plaintext = create_token(
        session=db_session, user=user, secret=SECRET, expires_in=timedelta(hours=1)
    )
    later = datetime.now(UTC) + timedelta(hours=2)
    with pytest.raises(AuthenticationFailed, match="expired"):
        authenticate_token(session=db_session, token=plaintext, secret=SECRET, now=later)


def test_refusal_is_audited(db_session):
    analyst = create_user(session=db_session, username="dan", role="analyst")
    with pytest.raises(PermissionDenied, match="needs role ml_lead"):
        authorize(db_session, actor=analyst, allowed={Role.ML_LEAD}, action="models.approve")
    entry = db_session.scalar(select(AuditLog).where(AuditLog.actor == "dan"))
    assert entry.outcome == "denied" and entry.action == "models.approve"
    lead = create_user(session=db_session, username="eve", role="ml_lead")
    authorize(db_session, actor=lead, allowed={Role.ML_LEAD}, action="models.approve")


def test_audit_rows_are_immutable_in_the_orm(db_session):
    row = record_audit(session=db_session, actor=None, action="probe", outcome="ok")
    row.outcome = "changed"
    with pytest.raises(ImmutableRowError):
        db_session.flush()
    db_session.rollback()


def test_timestamps_come_back_timezone_aware_utc(db_session):
    user = create_user(session=db_session, username="tz_user", role="analyst")
    db_session.expire_all()
    fetched = db_session.get(type(user), user.id)
    assert fetched.created_at.tzinfo is UTC
    naive = db_session.execute(
        text("SELECT created_at FROM users WHERE id = :i"), {"i": user.id}
    ).scalar()
    assert abs((fetched.created_at - datetime.now(UTC)).total_seconds()) < 60
    assert naive is not None
