#!/bin/sh
# Writes a Redis ACL file from a role template (deploy/redis/users.acl):
#   render-acl.sh TEMPLATE SECRETS_DIR OUT        with CAMERAS="cam-1 cam-2"
# A line with {camera} becomes one user per camera; {password_sha256} becomes the sha256 of the user's
# password file SECRETS_DIR/<user> (its content without the trailing newline). No password is written in clear.
set -eu
template=$1 secrets=$2 out=$3
umask 077
tmp="$out.tmp"
: > "$tmp"
while IFS= read -r line || [ -n "$line" ]; do
  case "$line" in ''|'#'*) continue ;; esac  # Redis ACL files take no comments
  case "$line" in
    *'{camera}'*)
      users=""
      for camera in ${CAMERAS:?set CAMERAS to the camera names}; do
        case "$camera" in *[!A-Za-z0-9_.-]*) echo "render-acl: bad camera name '$camera' (letters, digits, _ . - only)" >&2; exit 1 ;; esac
        users="$users$(printf '%s' "$line" | sed "s/{camera}/$camera/g")
"
      done ;;
    *) users="$line
" ;;
  esac
  printf '%s' "$users" | while IFS= read -r user_line; do
    user=$(printf '%s\n' "$user_line" | awk '{print $2}')
    case "$user_line" in
      *'{password_sha256}'*)
        [ -r "$secrets/$user" ] || { echo "render-acl: no password file $secrets/$user" >&2; exit 1; }
        password=$(cat "$secrets/$user")
        [ -n "$password" ] || { echo "render-acl: empty password file $secrets/$user" >&2; exit 1; }
        hash=$(printf '%s' "$password" | sha256sum | cut -d' ' -f1)
        user_line=$(printf '%s\n' "$user_line" | sed "s/{password_sha256}/$hash/") ;;
    esac
    printf '%s\n' "$user_line" >> "$tmp"
  done
done < "$template"
mv "$tmp" "$out"
