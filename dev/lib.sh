# Shared shell helpers of dev/ scripts: find or install PostgreSQL + PostGIS, run throwaway
# clusters as an unprivileged user (initdb refuses root).

pg_bindir() {
    if [ -n "${PG_BINDIR:-}" ]; then echo "$PG_BINDIR"; return; fi
    if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then pg_config --bindir; return; fi
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

# Installs the PostgreSQL server and PostGIS from Debian packages when missing (needs root).
ensure_postgres() {
    local bindir
    bindir=$(pg_bindir)
    local major=15
    if [ -n "$bindir" ] && [ -x "$bindir/initdb" ]; then
        major=$(basename "$(dirname "$bindir")")
    fi
    if [ -n "$bindir" ] && [ -x "$bindir/initdb" ] && [ -f "/usr/share/postgresql/$major/extension/postgis.control" ]; then
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "PostgreSQL server and PostGIS are needed: install postgresql-$major and postgresql-$major-postgis-3 (as root)" >&2
        return 1
    fi
    echo "installing PostgreSQL $major and PostGIS from Debian packages..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq "postgresql-$major" "postgresql-$major-postgis-3" >/dev/null
}

# The OS user that runs throwaway clusters.
cluster_user() {
    if [ "$(id -u)" != 0 ]; then id -un; elif id postgres >/dev/null 2>&1; then echo postgres; else echo nobody; fi
}

as_cluster_user() {
    if [ "$(id -u)" = 0 ]; then runuser -u "$(cluster_user)" -- "$@"; else "$@"; fi
}

# start_cluster DIR PORT: initdb + start a throwaway server on 127.0.0.1:PORT.
start_cluster() {
    local dir=$1 port=$2 bindir
    bindir=$(pg_bindir)
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown "$(cluster_user)" "$dir"
    as_cluster_user "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-locale >/dev/null
    as_cluster_user "$bindir/pg_ctl" -D "$dir/data" -l "$dir/log" -w -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" start >/dev/null
}

stop_cluster() {
    local dir=$1
    [ -d "$dir/data" ] && as_cluster_user "$(pg_bindir)/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
}

# The deploy checks' Python tools, pinned with their dependencies (kubernetes-validate bundles the
# Kubernetes JSON schemas: no network once installed). tests/tests/deploy/tools.rs pins the same
# kubernetes-validate version.
PGZM_DEPLOY_PIP_PINS="kubernetes-validate==1.37.0 attrs==26.1.0 importlib_resources==7.1.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 packaging==26.4 PyYAML==6.0.4 referencing==0.37.0 rpds-py==2026.9.1 typing_extensions==4.16.0"

# Installs what `cargo test -p pgzm-tests --test deploy` needs when missing: kubectl (its
# kustomize) and systemd-analyze from Debian's packages (needs root), kubernetes-validate from
# PyPI into a virtualenv outside the checkout, $PGZM_DEPLOY_VENV (default /var/tmp/pgzm-venv,
# exported for the tests). Silent when everything is there already.
ensure_deploy_tools() {
    export PGZM_DEPLOY_VENV="${PGZM_DEPLOY_VENV:-/var/tmp/pgzm-venv}"
    local packages=()
    command -v kubectl >/dev/null 2>&1 || packages+=(kubernetes-client)
    command -v systemd-analyze >/dev/null 2>&1 || packages+=(systemd)
    local stamp="$PGZM_DEPLOY_VENV/.pgzm-pins"
    local venv_ready=
    [ -x "$PGZM_DEPLOY_VENV/bin/kubernetes-validate" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$PGZM_DEPLOY_PIP_PINS" ] && venv_ready=1
    if [ -z "$venv_ready" ] && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        packages+=(python3-venv)
    fi
    if [ ${#packages[@]} -gt 0 ]; then
        if [ "$(id -u)" != 0 ]; then
            echo "the deploy checks need Debian's ${packages[*]}: install them (as root)" >&2
            return 1
        fi
        echo "installing ${packages[*]} from Debian packages..." >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
    fi
    if [ -z "$venv_ready" ]; then
        echo "installing kubernetes-validate into $PGZM_DEPLOY_VENV from PyPI..." >&2
        rm -rf "$PGZM_DEPLOY_VENV"
        python3 -m venv "$PGZM_DEPLOY_VENV"
        # shellcheck disable=SC2086 # one word per pin
        "$PGZM_DEPLOY_VENV/bin/pip" install -q --disable-pip-version-check $PGZM_DEPLOY_PIP_PINS
        printf '%s' "$PGZM_DEPLOY_PIP_PINS" >"$stamp"
    fi
}
