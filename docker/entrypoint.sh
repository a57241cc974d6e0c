#!/bin/sh
# Entrypoint of the shoplens image. The component commands are the very same `airflow ...`
# invocations that shoplens/dev/airflow_stack.py spawns for the local stack (checked by
# tests/test_deploy.py); only host/port values differ.
#
#   init                     migrate Airflow's metadata DB and the manifest, create the shop pool
#   api-server|scheduler|dag-processor|triggerer|celery ...   exec `airflow <args>`
#   anything else            exec'd as given (e.g. `python -m dataset models fetch`)
#
# Nothing starts while a variable still holds a CHANGE-ME placeholder of docker/.env.example:
# those values are public, and a known JWT secret lets anyone forge API tokens.
set -eu

refuse_placeholders() {
    # Names only (never values); a placeholder inside a URL (a DB password) counts too.
    placeholders="$(env | grep -E '^[A-Za-z_][A-Za-z0-9_]*=.*CHANGE-ME' | cut -d= -f1 | sort -u | tr '\n' ' ')"
    if [ -n "$placeholders" ]; then
        echo "shoplens: refusing to start: ${placeholders}still hold(s) a CHANGE-ME placeholder" \
             "from docker/.env.example; set real secrets in docker/.env (see docs/deploy.md)" >&2
        exit 78
    fi
}

write_passwords_file() {
    # SimpleAuthManager reads its users' passwords from this file (as in the local stack).
    if [ -n "${SHOPLENS_ADMIN_PASSWORD:-}" ]; then
        umask 077
        python -c 'import json, os, sys; json.dump({"admin": os.environ["SHOPLENS_ADMIN_PASSWORD"]}, sys.stdout)' \
            > "$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"
    fi
}

if [ -n "${1:-}" ]; then
    refuse_placeholders
fi

case "${1:-}" in
    init)
        airflow db migrate
        # The pool caps how many crawl tasks hit the shop at once, whatever the number of workers.
        airflow pools set shop "${SHOPLENS_SHOP_POOL_SLOTS:-2}" \
            "Crawl tasks allowed to run against the shop at the same time"
        python -c 'import os; from shoplens.manifest import upgrade; upgrade(os.environ["SHOPLENS_MANIFEST_URL"])'
        echo "shoplens init: Airflow metadata and manifest migrated"
        ;;
    api-server)
        write_passwords_file
        exec airflow "$@"
        ;;
    scheduler|dag-processor|triggerer|celery)
        exec airflow "$@"
        ;;
    "")
        echo "usage: shoplens-entrypoint init|api-server|scheduler|dag-processor|triggerer|celery worker ...|COMMAND" >&2
        exit 64
        ;;
    *)
        exec "$@"
        ;;
esac
