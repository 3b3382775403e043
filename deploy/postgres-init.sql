-- Prefect and Label Studio keep their own databases on the same Postgres server.
CREATE DATABASE prefect OWNER quarkflow;
CREATE DATABASE labelstudio OWNER quarkflow;
