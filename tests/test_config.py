import pytest

from quarkflow_core.config import get_settings, load_settings
from quarkflow_core.errors import ConfigError

pytestmark = pytest.mark.unit


def test_defaults_are_the_embedded_laptop_setup():
    s = load_settings()
    assert s.database_url == "sqlite:///.quarkflow/quarkflow.db"
    assert s.storage_url == "file://.quarkflow/store"
    assert s.database_backend == "sqlite"
    assert s.review_threshold is None  # each served model's calibrated threshold


def test_qf_variables_override(monkeypatch):
    monkeypatch.setenv("QF_DATABASE_URL", "postgresql://u:p@db:5432/qf")
    monkeypatch.setenv("QF_STORAGE_URL", "gs://bucket/some/prefix")
    monkeypatch.setenv("QF_REVIEW_THRESHOLD", "0.65")
    get_settings.cache_clear()
    s = get_settings()
    assert s.database_url == "postgresql+psycopg2://u:p@db:5432/qf"
    assert s.database_backend == "postgresql"
    assert s.storage_url == "gs://bucket/some/prefix"
    assert s.review_threshold == 0.65


def test_get_settings_is_cached_and_overridable(monkeypatch):
    first = get_settings()
    assert get_settings() is first
    monkeypatch.setenv("QF_REVIEW_THRESHOLD", "0.5")
    assert get_settings().review_threshold != 0.5  # cached
    get_settings.cache_clear()
    assert get_settings().review_threshold == 0.5


@pytest.mark.parametrize(
    ("var", "value", "needle"),
    [
        ("QF_DATABASE_URL", "mysql://root@localhost/x", "unknown scheme 'mysql'"),
        ("QF_STORAGE_URL", "s3://bucket", "unknown scheme 's3'"),
        ("QF_STORAGE_URL", "gs://", "names no bucket"),
        ("QF_REVIEW_THRESHOLD", "1.5", "less than or equal to 1"),
        ("QF_LOG_LEVEL", "LOUD", "not a logging level"),
    ],
)
def test_bad_values_name_the_variable(monkeypatch, var, value, needle):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    message = str(err.value)
    assert message.startswith(f"{var}: ")
    assert needle in message
    assert "\n" not in message
