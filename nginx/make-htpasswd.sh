#!/usr/bin/env sh
# nginx's htpasswd from the Prefect auth string: nginx/make-htpasswd.sh [FILE]
# Reads INGEST_PREFECT_AUTH_STRING (`user:password`) from the environment, or else from
# docker/.env, and writes FILE (default nginx/htpasswd, ignored by git) with the same user
# and a salted SHA-512 crypt of the password: nginx and Prefect must accept the very same
# credential (see nginx/ingest.conf.template). Run it again after changing the password.
set -eu

here=$(dirname "$0")
file=${1:-"$here/htpasswd"}
auth=${INGEST_PREFECT_AUTH_STRING:-}
if [ -z "$auth" ] && [ -f "$here/../docker/.env" ]; then
    auth=$(sed -n 's/^INGEST_PREFECT_AUTH_STRING=//p' "$here/../docker/.env" | tail -n 1)
fi
user=${auth%%:*}
password=${auth#*:}
case "$auth" in
    *:*) ;;
    *) echo "INGEST_PREFECT_AUTH_STRING must be user:password" >&2; exit 2 ;;
esac
if [ -z "$user" ] || [ -z "$password" ]; then
    echo "INGEST_PREFECT_AUTH_STRING must be user:password, both non-empty" >&2; exit 2
fi

umask 077
# The password goes through stdin: never on a command line that `ps` shows.
hash=$(printf '%s\n' "$password" | openssl passwd -6 -stdin)
printf '%s:%s\n' "$user" "$hash" > "$file"
# nginx's worker processes (not root) read it; it holds a hash, not the password.
chmod 644 "$file"
echo "wrote $file for user $user"
