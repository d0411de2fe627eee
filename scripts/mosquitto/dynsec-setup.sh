#!/usr/bin/env bash
# Users and ACLs of a local Mosquitto's dynamic-security plugin (LOCAL DEVELOPMENT AND TESTS).
# Used by scripts/infra.sh and by the tests that start a broker of their own, so both get the
# same users and roles:
#
#   dynsec-setup.sh init  FILE ADMIN_USER ADMIN_PASSWORD       before the broker's first start
#   dynsec-setup.sh apply HOST PORT ADMIN_USER ADMIN_PASSWORD PLATFORM_USER PLATFORM_PASSWORD
#
# `apply` is idempotent and runs against the live broker (no restart):
#   role platform     read the shared subscription $share/cornjacket/devices/+/events, write
#                     devices/+/errors — what the platform needs in production too
#   role development  DEVELOPMENT ONLY: every topic and every shared subscription, so the README
#                     examples and the tests (which use topic roots of their own) work as the
#                     platform's user
#   PLATFORM_USER     holds both roles locally
#   default ACL       publish and subscribe denied unless a role allows it
# Devices get a role each (`cornjacket devices add`): dynamic security in Mosquitto 2.0 has no
# %u substitution in ACLs.
set -euo pipefail

die() { printf 'dynsec-setup: error: %s\n' "$*" >&2; exit 1; }

cmd=${1:-}
case $cmd in
    init)
        (($# == 4)) || die "usage: $0 init FILE ADMIN_USER ADMIN_PASSWORD"
        file=$2
        [[ -s $file ]] && exit 0
        mosquitto_ctrl dynsec init "$file" "$3" "$4" >/dev/null || die "mosquitto_ctrl dynsec init failed"
        ;;
    apply)
        (($# == 7)) || die "usage: $0 apply HOST PORT ADMIN_USER ADMIN_PASSWORD PLATFORM_USER PLATFORM_PASSWORD"
        host=$2 port=$3 admin=$4 admin_pw=$5 user=$6 pw=$7
        query() { # prints what one command answered (mosquitto_ctrl exits 0 on refusals too)
            local out
            out=$(mosquitto_ctrl -h "$host" -p "$port" -u "$admin" -P "$admin_pw" dynsec "$@" 2>&1) ||
                die "mosquitto_ctrl dynsec $1 failed: $out"
            grep -v -i -e 'without encryption' -e 'visible on the network' -e '^$' <<<"$out" || true
        }
        ctrl() { # runs one command; "already exists" is success
            local out
            out=$(query "$@")
            if grep -q 'Error' <<<"$out" && ! grep -q 'already exists' <<<"$out"; then
                die "mosquitto_ctrl dynsec $1: $out"
            fi
        }
        ctrl setDefaultACLAccess publishClientSend deny
        ctrl setDefaultACLAccess subscribe deny
        ctrl setDefaultACLAccess publishClientReceive allow
        ctrl setDefaultACLAccess unsubscribe allow
        ctrl createRole platform
        ctrl addRoleACL platform subscribePattern '$share/cornjacket/devices/+/events' allow
        ctrl addRoleACL platform publishClientSend 'devices/+/errors' allow
        ctrl createRole development
        ctrl addRoleACL development subscribePattern '#' allow
        ctrl addRoleACL development subscribePattern '$share/#' allow
        ctrl addRoleACL development publishClientSend '#' allow
        local_client=$(query getClient "$user")
        if grep -q 'not found' <<<"$local_client"; then
            ctrl createClient "$user" -p "$pw"
        else
            ctrl setClientPassword "$user" "$pw"
        fi
        for role in platform development; do
            # Adding a role the client already has is an "Internal error" in Mosquitto 2.0.
            grep -Eq "(Roles:|^) +$role " <<<"$local_client" || ctrl addClientRole "$user" "$role"
        done
        ;;
    *) die "usage: $0 init|apply ..." ;;
esac
