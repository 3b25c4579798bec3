#!/usr/bin/env bash
# What the Kubernetes manifests (deploy/k8s) mount, made with openssl:
#   a cluster CA (keep ca.key offline; it signs every certificate below),
#   gemma-coordinator-tls       the public port's certificate (gRPC 50051 and HTTPS 8000), for
#                               gemma-coordinator[.NAMESPACE[.svc[.cluster.local]]], localhost
#                               and 127.0.0.1 (kubectl port-forward), and the CA clients verify;
#   gemma-coordinator-internal  the internal port's certificate (50052, mutual TLS), which is
#                               also the client certificate the coordinator calls replicas with;
#   gemma-worker-tls            one certificate every worker pod presents: it names
#                               "gemma-worker" (pods get their addresses after it is made, so
#                               the coordinator checks that name: --replica-tls-name);
#   gemma-auth                  the coordinator's --auth-tokens file: an admin and a user token.
# Writes the files to OUT (one folder per Secret) and OUT/secrets.yaml (the four Secrets), and
# the tokens to OUT/admin.token and OUT/user.token for gemmactl (--token) and the OpenAI API.
#
#   scripts/make_cluster_secrets.sh [--namespace gemma] [--days 365] OUT
#   kubectl apply -f OUT/secrets.yaml      # the Secrets name their --namespace themselves
set -euo pipefail

namespace=gemma
days=365
out=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --namespace) namespace="$2"; shift 2 ;;
    --days) days="$2"; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "make_cluster_secrets.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) out="$1"; shift ;;
  esac
done
if [[ -z "${out}" ]]; then
  echo "make_cluster_secrets.sh: give the folder to write to (see --help)" >&2
  exit 2
fi
if [[ ! "${days}" =~ ^[1-9][0-9]*$ ]]; then
  echo "make_cluster_secrets.sh: --days ${days} is not a positive number of days" >&2
  exit 2
fi
if [[ -e "${out}/ca.key" ]]; then
  echo "make_cluster_secrets.sh: ${out} already holds a CA (ca.key); certificates from a new CA" \
    "would lock out everything the old one signed: use another folder, or remove it first" >&2
  exit 1
fi
command -v openssl >/dev/null || { echo "make_cluster_secrets.sh: needs openssl" >&2; exit 1; }
mkdir -p "${out}"
umask 077
cd "${out}"

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca.key
openssl req -x509 -new -key ca.key -out ca.crt -days "${days}" -subj "/CN=gemma-cluster CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

# sign SECRET CN SAN USAGE: SECRET/tls.key, SECRET/tls.crt (signed by the CA, for USAGE:
# serverAuth, clientAuth or both) and SECRET/ca.crt.
sign() {
  local dir="$1" cn="$2" san="$3" usage="$4"
  mkdir -p "${dir}"
  key "${dir}/tls.key"
  openssl req -new -key "${dir}/tls.key" -out "${dir}/tls.csr" -subj "/CN=${cn}"
  printf 'subjectAltName=%s\nextendedKeyUsage=%s\n' "${san}" "${usage}" >"${dir}/ext"
  openssl x509 -req -in "${dir}/tls.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out "${dir}/tls.crt" -days "${days}" -extfile "${dir}/ext" 2>/dev/null
  rm -f "${dir}/tls.csr" "${dir}/ext"
  cp ca.crt "${dir}/ca.crt"
}

svc="gemma-coordinator"
names="DNS:${svc},DNS:${svc}.${namespace},DNS:${svc}.${namespace}.svc"
names="${names},DNS:${svc}.${namespace}.svc.cluster.local,DNS:localhost,IP:127.0.0.1"
# The public certificate only serves; the internal ones also present themselves as clients (the
# coordinator calling replicas, workers joining).
sign gemma-coordinator-tls "${svc}" "${names}" serverAuth
sign gemma-coordinator-internal "${svc}" "${names}" serverAuth,clientAuth
sign gemma-worker-tls gemma-worker "DNS:gemma-worker" serverAuth,clientAuth

mkdir -p gemma-auth
openssl rand -hex 24 >admin.token
openssl rand -hex 24 >user.token
printf '%s admin admin\n%s user user\n' "$(cat admin.token)" "$(cat user.token)" \
  >gemma-auth/tokens

# secret NAME TYPE FILE...: one Secret of secrets.yaml, its files base64-encoded.
secret() {
  local name="$1" type="$2" f data
  shift 2
  printf -- '---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: %s\n  namespace: %s\n' \
    "${name}" "${namespace}"
  printf 'type: %s\ndata:\n' "${type}"
  for f in "$@"; do
    data="$(openssl base64 -A -in "${name}/${f}")"
    [[ -n "${data}" ]] || { echo "make_cluster_secrets.sh: cannot encode ${name}/${f}" >&2; exit 1; }
    printf '  %s: %s\n' "${f}" "${data}"
  done
}
{
  secret gemma-coordinator-tls kubernetes.io/tls tls.crt tls.key ca.crt
  secret gemma-coordinator-internal kubernetes.io/tls tls.crt tls.key ca.crt
  secret gemma-worker-tls kubernetes.io/tls tls.crt tls.key ca.crt
  secret gemma-auth Opaque tokens
} >secrets.yaml

echo "wrote ${out}: the CA, four Secrets in secrets.yaml (namespace ${namespace}), the tokens"
echo "  kubectl apply -f ${out}/secrets.yaml"
echo "  gemmactl --coordinator localhost:50051 --tls-ca ${out}/ca.crt --token \$(cat ${out}/admin.token) status"
