#!/usr/bin/env bash
# Least-privilege roles and their databases, created once, when the postgres image
# initialises an empty volume (it runs /docker-entrypoint-initdb.d/*.sh as the superuser).
# - INGEST_DB_USER owns INGEST_DB_NAME: the inbox, batches and sink tables and their
#   migrations; it can create nothing else (no CREATEDB, no CREATEROLE, no superuser).
# - PREFECT_DB_USER owns PREFECT_DB_NAME: the Prefect server's state and migrations.
# Neither can connect to the other's database (CONNECT revoked from PUBLIC), and the
# superuser's password (POSTGRES_PASSWORD) is used by nothing but this script.
# Passwords come from the environment and reach psql as variables, never as command text.
set -euo pipefail

: "${INGEST_DB_PASSWORD:?set INGEST_DB_PASSWORD}"
: "${PREFECT_DB_PASSWORD:?set PREFECT_DB_PASSWORD}"

psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    -v ingest_user="${INGEST_DB_USER:-ingest}" -v ingest_db="${INGEST_DB_NAME:-ingest}" \
    -v ingest_password="$INGEST_DB_PASSWORD" \
    -v prefect_user="${PREFECT_DB_USER:-prefect}" -v prefect_db="${PREFECT_DB_NAME:-prefect}" \
    -v prefect_password="$PREFECT_DB_PASSWORD" <<'SQL'
CREATE ROLE :"ingest_user" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'ingest_password';
CREATE ROLE :"prefect_user" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'prefect_password';
-- Owners: their migrations create tables (and Prefect the trusted extension pg_trgm) in the
-- public schema, which PostgreSQL 15+ gives to the database owner.
CREATE DATABASE :"ingest_db" OWNER :"ingest_user";
CREATE DATABASE :"prefect_db" OWNER :"prefect_user";
REVOKE ALL ON DATABASE :"ingest_db" FROM PUBLIC;
REVOKE ALL ON DATABASE :"prefect_db" FROM PUBLIC;
SQL
