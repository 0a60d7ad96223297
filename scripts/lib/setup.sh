# Sourced by scripts/test, scripts/demo and bench/run: installs what they need on a
# fresh Debian machine (idempotent; quick when everything is there already).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${INVOICE_RELAY_VENV:-$ROOT/.venv}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "setup: installing ${missing[*]} from Debian" >&2
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

ensure_dovecot() {
    # The tests start their own Dovecot with a private config; the package's own
    # service is not needed (and may not start in a container).
    apt_install dovecot-imapd sqlite3
}

ensure_postfix() {
    # The SMTP tests and the WAN bench start their own Postfix (PIPELINING, CHUNKING)
    # with a private config; "No configuration" keeps the package's own one empty.
    if ! dpkg-query -W -f='${Status}' postfix 2>/dev/null | grep -q "install ok installed"; then
        echo "postfix postfix/main_mailer_type select No configuration" \
            | as_root debconf-set-selections
    fi
    apt_install postfix
}

ensure_chromium() {
    # The status page's browser tests (tests/integration/test_status_page_browser.py)
    # drive Debian's headless Chromium through its chromedriver; Selenium is told that
    # path, so it never tries to download a browser or a driver of its own.
    apt_install chromium chromium-driver
}

ensure_postgres() {
    local host="127.0.0.1" port="5432"
    if pg_isready -q -h "$host" -p "$port" 2>/dev/null; then
        return 0
    fi
    apt_install postgresql postgresql-client
    local version
    version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)"
    if [ -z "$version" ]; then
        version="$(ls /usr/lib/postgresql | sort -V | tail -1)"
        as_root pg_createcluster "$version" main >/dev/null
    fi
    local conf="/etc/postgresql/$version/main"
    # Loopback trust for the test machine only, as the tests expect.
    if ! grep -q "invoice-relay tests" "$conf/pg_hba.conf"; then
        as_root sh -c "printf '%s\n' '# invoice-relay tests' \
            'host all all 127.0.0.1/32 trust' 'local all all trust' \
            | cat - '$conf/pg_hba.conf' > '$conf/pg_hba.new' && mv '$conf/pg_hba.new' '$conf/pg_hba.conf'"
    fi
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start \
        || as_root pg_ctlcluster --skip-systemctl-redirect "$version" main restart
    for _ in $(seq 1 30); do
        pg_isready -q -h "$host" -p "$port" && break
        sleep 1
    done
    # PostgreSQL refuses to run as root, but root may log in as a role of its own.
    as_root su postgres -c "psql -q -h $host -p $port -d postgres -c \
        \"DO \\\$\\\$ BEGIN CREATE ROLE root SUPERUSER LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END \\\$\\\$;\"" \
        >/dev/null 2>&1 || true
}

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.invoice-relay-installed"
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
        echo "setup: installing Python packages into $VENV" >&2
        local log="$VENV/pip-install.log"
        if ! { "$VENV/bin/python" -m pip install --upgrade pip \
                && "$VENV/bin/python" -m pip install -e "$ROOT[test]"; } >"$log" 2>&1; then
            tail -40 "$log" >&2
            echo "setup: pip install failed; the whole log is in $log" >&2
            return 1
        fi
        touch "$stamp"
    fi
}
