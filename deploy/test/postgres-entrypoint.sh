#!/bin/sh
# First start: create the cluster with POSTGRES_USER/POSTGRES_PASSWORD and the POSTGRES_DB
# database (what the official image does), password auth from the network. Then run in front.
set -eu
data=/var/lib/postgresql/data
mkdir -p "$data" /var/run/postgresql
chown postgres:postgres "$data" /var/run/postgresql
chmod 700 "$data"
if [ ! -s "$data/PG_VERSION" ]; then
  pw="$(mktemp)"; printf '%s\n' "$POSTGRES_PASSWORD" >"$pw"; chown postgres "$pw"
  runuser -u postgres -- initdb -D "$data" -U "$POSTGRES_USER" --pwfile="$pw" \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pw"
  echo "host all all 0.0.0.0/0 scram-sha-256" >>"$data/pg_hba.conf"
  runuser -u postgres -- pg_ctl -D "$data" -w -o "-c listen_addresses=''" start >/dev/null
  if [ "$POSTGRES_DB" != postgres ]; then
    runuser -u postgres -- psql -q -U "$POSTGRES_USER" -d postgres -c "CREATE DATABASE \"$POSTGRES_DB\""
  fi
  runuser -u postgres -- pg_ctl -D "$data" -w stop >/dev/null
fi
exec runuser -u postgres -- postgres -D "$data" -c listen_addresses='*'
