-- Prefect and Label Studio keep their own databases on the same Postgres server.
CREATE DATABASE prefect OWNER quarkflow;
CREATE DATABASE labelstudio OWNER quarkflow;

-- Quarkflow's API, workbench and worker connect as quarkflow_app, which owns nothing, so it
-- can neither change the append-only history nor switch its triggers off. The migrate service
-- (`quarkflow init`, as the owner `quarkflow`) grants it what it needs. Runs on the first
-- start only: for an existing volume see docs/operations.md.
\getenv app_password POSTGRES_APP_PASSWORD
CREATE ROLE quarkflow_app LOGIN PASSWORD :'app_password';
