#!/bin/sh
# Creates deploy/secrets/: one random password per Redis user of deploy/redis/users.acl and the bank signing key.
# Existing files are kept. The folder is git-ignored and only its owner may enter it; the files themselves are
# readable (0444) because compose bind-mounts each into the one container that needs it, where the image's
# unprivileged user (uid 10001) must read it.
#   CAMERAS="cam-1 cam-2" sh deploy/make-secrets.sh
set -eu
dir=$(dirname "$0")/secrets
mkdir -p "$dir"
chmod 700 "$dir"
for user in worker store sink operator viewer bank-key $(for c in ${CAMERAS:-cam-1}; do echo "camera-$c"; done); do
  [ -s "$dir/$user" ] || (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$dir/$user")
  chmod 444 "$dir/$user"
done
echo "secrets in $dir"
