#!/bin/sh
# Runs once, when the PostgreSQL volume is first initialised: one server, two databases with
# their own owners, so Airflow's metadata and the shoplens manifest never share a schema.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
     -v airflow_pw="$AIRFLOW_DB_PASSWORD" -v manifest_pw="$SHOPLENS_DB_PASSWORD" <<'SQL'
CREATE ROLE airflow LOGIN PASSWORD :'airflow_pw';
CREATE DATABASE airflow OWNER airflow;
CREATE ROLE shoplens LOGIN PASSWORD :'manifest_pw';
CREATE DATABASE shoplens OWNER shoplens;
SQL
