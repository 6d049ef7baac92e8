#!/usr/bin/env bash
# Development certificates for TLS between agents, the CLI and the cloud (openssl only).
#   deploy/dev-certs.sh [OUT_DIR] [DEVICE_NAME ...]      (OUT_DIR default: deploy/certs)
# Writes, keeping files that already exist (delete OUT_DIR to start over):
#   ca.pem / ca.key            development CA (signs the server certificate)
#   server.pem / server.key    the cloud's certificate: compose service names, the Kubernetes
#                              Service DNS names, localhost, 127.0.0.1 (+ $EXTRA_SANS, e.g.
#                              "DNS:cloud.example.internal,IP:10.0.0.5")
#   devices-ca.pem / .key      (with DEVICE_NAMEs) CA for device certificates: `serve
#                              --tls-client-ca devices-ca.pem` turns on mutual TLS
#   device-NAME.pem / .key     a device's client certificate (`edge-agent --tls-cert/--tls-key`)
# For development only: the leaf keys are world-readable (0644) so the containers' uid 10001
# can read them through a bind mount (the CA keys stay 0600), and nothing here is ever committed (deploy/certs/ is ignored).
# In production bring your own certificates (deploy/README.md, "TLS").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-deploy/certs}
[ $# -gt 0 ] && shift
DAYS=${DAYS:-825}
mkdir -p "$OUT"
chmod 0755 "$OUT"
command -v openssl >/dev/null || { echo "openssl is required" >&2; exit 1; }

# key FILE MODE: a P-256 key (PKCS#8 PEM).
key() { [ -f "$1" ] || openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; chmod "$2" "$1"; }

# ca NAME CN: a self-signed CA.
ca() {
  key "$OUT/$1.key" 0600   # CA keys are never mounted anywhere
  [ -f "$OUT/$1.pem" ] && return
  openssl req -x509 -new -key "$OUT/$1.key" -sha256 -days "$DAYS" -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$OUT/$1.pem"
  echo "wrote $OUT/$1.pem"
}

# leaf NAME CA CN EKU SANS: a certificate signed by CA.
leaf() {
  local name=$1 ca=$2 cn=$3 eku=$4 sans=$5 ext
  key "$OUT/$name.key" 0644
  [ -f "$OUT/$name.pem" ] && return
  ext=$(mktemp)
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature"
    echo "extendedKeyUsage=$eku"
    echo "subjectAltName=$sans"
  } >"$ext"
  openssl req -new -key "$OUT/$name.key" -subj "/CN=$cn" |
    openssl x509 -req -CA "$OUT/$ca.pem" -CAkey "$OUT/$ca.key" -CAcreateserial -sha256 \
      -days "$DAYS" -extfile "$ext" -out "$OUT/$name.pem" 2>/dev/null
  rm -f "$ext"
  openssl verify -CAfile "$OUT/$ca.pem" "$OUT/$name.pem" >/dev/null
  echo "wrote $OUT/$name.pem"
}

ca ca "adaptivenet development CA"
SANS="DNS:localhost,IP:127.0.0.1,IP:::1"
SANS+=",DNS:api-1,DNS:api-2"                                   # compose services
SANS+=",DNS:adaptivenet-api,DNS:adaptivenet-api.adaptivenet"   # the Kubernetes Service
SANS+=",DNS:adaptivenet-api.adaptivenet.svc,DNS:adaptivenet-api.adaptivenet.svc.cluster.local"
[ -n "${EXTRA_SANS:-}" ] && SANS+=",$EXTRA_SANS"
leaf server ca "adaptivenet-api" serverAuth "$SANS"

if [ $# -gt 0 ]; then
  ca devices-ca "adaptivenet development device CA"
  for d in "$@"; do
    [[ "$d" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "device name $d: letters, digits, . _ - only" >&2; exit 1; }
    leaf "device-$d" devices-ca "$d" clientAuth "DNS:$d"
  done
fi
rm -f "$OUT"/*.srl
