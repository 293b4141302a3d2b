#!/bin/sh
# Makes a private CA and the certificates a pgzm deployment needs, with openssl (1.1.1 or 3.x):
#
#   make-certs.sh OUT_DIR AGENT_NAME[,EXTRA_SAN...]...
#
#   ca.pem / ca.key                      the CA (keep ca.key offline once you are done)
#   <agent>.pem / <agent>.key            one per agent: server certificate for the agent's
#                                        DNS names (and client certificate: agents call each
#                                        other), extendedKeyUsage serverAuth + clientAuth
#   coordinator.pem / coordinator.key    client certificate for `pgzm`
#
# Each AGENT_NAME is the host name the coordinator (and the other agents) use in the agent's
# https:// URL; add more names or IP addresses after commas, e.g.
#   make-certs.sh ./tls source-agent,source-agent.pgzm.svc,IP:10.0.3.7 dest-agent
# Existing files are kept (delete OUT_DIR to start over). Keys are P-256, PKCS#8, mode 0600;
# set CERT_OWNER=uid:gid to chown the output (e.g. for a container user). DAYS (default 825).
set -eu
[ $# -ge 2 ] || { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
out=$1
shift
days=${DAYS:-825}
umask 077
mkdir -p "$out"
cd "$out"

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }

if [ ! -f ca.pem ]; then
    newkey ca.key
    openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=pgzm CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out ca.pem
fi

# sign NAME EXTENSIONS: NAME.key + NAME.pem signed by the CA.
sign() {
    [ -f "$1.pem" ] && return 0
    newkey "$1.key"
    openssl req -new -key "$1.key" -subj "/CN=$1" -out "$1.csr"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" "$2" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 \
        -days "$days" -extfile "$1.ext" -out "$1.pem"
    rm -f "$1.csr" "$1.ext"
}

for spec in "$@"; do
    name=${spec%%,*}
    sans=""
    for san in $(printf '%s' "$spec" | tr ',' ' '); do
        case $san in
            IP:*|DNS:*) sans="$sans,$san" ;;
            *) sans="$sans,DNS:$san" ;;
        esac
    done
    sign "$name" "extendedKeyUsage=serverAuth,clientAuth
subjectAltName=${sans#,}"
done
sign coordinator "extendedKeyUsage=clientAuth"

chmod 0644 ./*.pem
chmod 0600 ./*.key
if [ -n "${CERT_OWNER:-}" ]; then chown "$CERT_OWNER" ./*.pem ./*.key; fi
echo "certificates in $(pwd):"
ls -1 ./*.pem
