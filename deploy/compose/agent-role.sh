#!/bin/sh
# docker-entrypoint-initdb.d script of the compose example: creates the role `pgzm_agent`
# that the agent next to this database logs in as (password: $PGZM_AGENT_DB_PASSWORD), with
# only the privileges its side needs:
#   source       read every table (pg_read_all_data) and import the coordinator's snapshot;
#   destination  nothing: the coordinator grants the role what a copy needs on the shadow
#                tables it creates (and on pgzm's metadata), and revokes it when the copy ends.
set -eu
case "${PGZM_AGENT_SIDE:?set PGZM_AGENT_SIDE to source or destination}" in
    source) grants="GRANT pg_read_all_data TO pgzm_agent;" ;;
    destination) grants="" ;;
    *) echo "PGZM_AGENT_SIDE must be source or destination" >&2; exit 1 ;;
esac
: "${PGZM_AGENT_DB_PASSWORD:?set PGZM_AGENT_DB_PASSWORD}"
export PGZM_AGENT_DB_PASSWORD
# psql reads the password from its environment (\getenv, psql 15+): never on its command line.
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" <<SQL
\\getenv pw PGZM_AGENT_DB_PASSWORD
CREATE ROLE pgzm_agent LOGIN PASSWORD :'pw';
$grants
SQL
