#!/usr/bin/env sh
# A self-signed certificate for local use: nginx/make-cert.sh [DIR] [NAME...]
# Writes DIR/tls.crt and DIR/tls.key (default DIR: nginx/tls, ignored by git), valid for
# localhost, 127.0.0.1 and the NAMEs given. Production uses a certificate from a real CA
# in the same two files. `ingest` on other hosts trusts this one with
# INGEST_PREFECT_CA_FILE=DIR/tls.crt (other Prefect clients: PREFECT_API_SSL_CERT_FILE).
set -eu

dir=${1:-"$(dirname "$0")/tls"}
[ $# -gt 0 ] && shift
san="DNS:localhost,IP:127.0.0.1"
for name in "$@"; do san="$san,DNS:$name"; done

mkdir -p "$dir"
umask 077
# EC P-256: small and fast; the x509 request makes a CA:TRUE certificate, so clients can
# use the certificate itself as the CA to trust.
openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$dir/tls.key" -out "$dir/tls.crt" -days 825 -subj "/CN=${1:-localhost}" \
    -addext "subjectAltName=$san" 2>/dev/null
# The certificate is public; the key stays readable by its owner only.
chmod 644 "$dir/tls.crt"
echo "wrote $dir/tls.crt and $dir/tls.key ($san)"
