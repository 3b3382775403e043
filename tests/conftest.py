"""Shared fixtures: every DB test runs on SQLite and Postgres, every storage test on a local
folder and on fake-gcs-server. `make test` starts the real services; running pytest by hand
without them fails loudly (it never silently skips the real-service variants)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from helpers.data import SEED_SIZE, save_smallcnn
from helpers.storage import make_gcs
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from quarkflow_core import migrations
from quarkflow_core.config import get_settings
from quarkflow_core.database import make_engine
from quarkflow_core.storage import LocalStorage, Storage

DEFAULT_PG = "postgresql+psycopg2://quarkflow:quarkflow@127.0.0.1:5432/quarkflow_test"
DEFAULT_GCS = "http://127.0.0.1:4443"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--pg-url",
        default=os.environ.get("QF_TEST_POSTGRES_URL", DEFAULT_PG),
        help="Postgres used to create throw-away test databases",
    )
    parser.addoption(
        "--gcs-host",
        default=os.environ.get("QF_TEST_GCS_HOST", DEFAULT_GCS),
        help="fake-gcs-server address",
    )


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[None]:
    """No test reads the developer's .env or QF_* variables by accident."""
    for key in list(os.environ):
        if key.startswith("QF_") and not key.startswith("QF_TEST_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("QF_DATA_DIR", str(tmp_path / "qfdata"))
    monkeypatch.setenv("QF_GRPC_PORT", "0")  # no app a test starts takes gRPC's port 8001
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


# --------------------------------------------------------------------------- databases


class PostgresFactory:
    """Creates uniquely named databases on the test server and drops them afterwards."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.created: list[str] = []
        self._admin = make_engine(admin_url, isolation_level="AUTOCOMMIT")

    def create(self) -> str:
        name = f"qf_t_{uuid.uuid4().hex[:10]}"
        try:
            with self._admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        except Exception as exc:  # pragma: no cover - environment problem
            pytest.fail(
                f"Postgres test server not usable at {self.admin_url}: {exc}. "
                "Run `make test` (it starts Postgres) or scripts/services.sh start."
            )
        self.created.append(name)
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with self._admin.connect() as conn:
            for name in self.created:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self._admin.dispose()


@pytest.fixture(scope="session")
def pg_factory(request: pytest.FixtureRequest) -> Iterator[PostgresFactory]:
    factory = PostgresFactory(request.config.getoption("--pg-url"))
    yield factory
    factory.drop_all()


@pytest.fixture
def fresh_db_url(db_backend, pg_factory, tmp_path) -> str:
    """An empty database (no schema) of the parametrized backend."""
    if db_backend == "postgresql":
        return pg_factory.create()
    return f"sqlite:///{tmp_path / 'fresh.db'}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for name in ("fresh_db_url", "db_engine", "db_session"):
        if name in metafunc.fixturenames:
            metafunc.parametrize("db_backend", ["sqlite", "postgresql"], indirect=True)
            break


@pytest.fixture(scope="session")
def db_backend(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def _migrated_engines() -> Iterator[dict[str, Engine]]:
    engines: dict[str, Engine] = {}
    yield engines
    for engine in engines.values():
        engine.dispose()


@pytest.fixture
def db_engine(db_backend, _migrated_engines, pg_factory, tmp_path_factory) -> Engine:
    """A migrated database of the parametrized backend, shared by the whole test session."""
    if db_backend not in _migrated_engines:
        if db_backend == "postgresql":
            url = pg_factory.create()
        else:
            url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'test.db'}"
        migrations.upgrade(url)
        _migrated_engines[db_backend] = make_engine(url)
    return _migrated_engines[db_backend]


@pytest.fixture
def db_session(db_engine: Engine) -> Iterator[Session]:
    """A session inside an outer transaction that is rolled back after the test.

    Code under test may call commit(): with join_transaction_mode="create_savepoint" that only
    releases a SAVEPOINT, and the outer rollback still undoes everything."""
    conn = db_engine.connect()
    outer = conn.begin()
    session = Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        outer.rollback()
        conn.close()


# --------------------------------------------------------------------------- storage


@pytest.fixture(scope="session")
def gcs_host(request) -> str:
    return request.config.getoption("--gcs-host")


@pytest.fixture(params=["local", "gcs"])
def storage(request, tmp_path, gcs_host) -> Storage:
    if request.param == "gcs":
        return make_gcs(gcs_host)
    return LocalStorage(tmp_path / "store")


# --------------------------------------------------------------------------- trained models


@pytest.fixture(scope="session")
def trained_artifacts(tmp_path_factory):
    """Three real models trained on the seed snapshot's train split (never its hold-out):
    ``weak`` (1 epoch on 120 images), ``strong`` and ``strong_b`` (5 epochs, two seeds)."""
    import numpy as np
    import torch

    from quarkflow_core.datasets import stratified_holdout
    from quarkflow_core.demo_data import HOLDOUT_FRACTION, SPLIT_SEED, demo_pngs
    from quarkflow_core.ml.data import ImageSet, decode
    from quarkflow_core.ml.train import TrainConfig, fit
    from quarkflow_core.ml.transforms import eval_preset

    preset = eval_preset("digits28")
    pngs, labels = demo_pngs(SEED_SIZE)
    held = np.array(stratified_holdout(labels, fraction=HOLDOUT_FRACTION, seed=SPLIT_SEED))
    train_idx = np.nonzero(~held)[0]
    classes = sorted(set(labels))
    train = ImageSet(
        torch.from_numpy(np.stack([decode(pngs[i], preset) for i in train_idx])),
        torch.tensor([classes.index(labels[i]) for i in train_idx]),
        classes,
        [str(i) for i in train_idx],
    )
    base = {"batch_size": 64, "augment": "none", "num_threads": 2, "val_fraction": 0.1}
    specs = {
        "weak": (train.subset(np.arange(0, len(train), 4)), {"epochs": 1, "seed": 0}),
        "strong": (train, {"epochs": 5, "seed": 0}),
        "strong_b": (train, {"epochs": 5, "seed": 1}),
    }
    out = {}
    for name, (data, cfg) in specs.items():
        res = fit(data, TrainConfig(**base, **cfg))
        folder = tmp_path_factory.mktemp(name)
        save_smallcnn(
            res, folder, metrics={"holdout": {"accuracy": res.history[-1]["val_accuracy"]}}
        )
        out[name] = folder
    return out


# --------------------------------------------------------------------------- prefect


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for every flow test (it is slow to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
