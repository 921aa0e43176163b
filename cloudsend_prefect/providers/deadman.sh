#!/bin/sh
# cloudsend's dead-man switch on an EC2 instance: it powers the instance off once nothing has used it for a
# while, so an instance never bills on after its client died. The instance's user data installs it as the
# systemd service cloudsend-deadman, enabled: it runs from every boot on, a stopped and restarted instance
# included, as root.
#
#   cloudsend-deadman LIMIT      power off after LIMIT seconds idle (the instance's idle_minutes at launch)
#
# Idle means no job running and no client contact, as seen in every login's ~/.cloudsend (host.sh's layout):
# - a job runs while the process of its running/ entry lives (entries of jobs a reboot killed keep nothing up);
# - a client is in contact while one of its batches' leases runs (leases/<batch>, renewed at every poll, its
#   mtime the lease's expiry: the batch's queued jobs are covered by it too), and at each connection it
#   re-arms the switch (host.sh arm writes `contact`: its mtime is the contact's time, its content the idle
#   limit of the client's config in seconds, which replaces LIMIT: a reused instance follows the current
#   config).
# A controller instance (`cloudsend controller up`) also counts as busy while CLOUDSEND_DEADMAN_BUSY, a shell
# command its unit sets, succeeds: there, while a Prefect flow run is running under its worker.
# Powering off is `shutdown -h now`: the instance then stops or terminates, as its shutdown behaviour says.
#
# For tests only (systemd passes none of these): CLOUDSEND_DEADMAN_DIRS (the runtime directories to watch),
# CLOUDSEND_DEADMAN_PERIOD (seconds between two looks), CLOUDSEND_POWEROFF (the command that powers off).
set -u
# <protocol> generated from cloudsend_prefect/protocol.py (shell_block): edit names there
D_JOBS='jobs'
D_RUNNING='running'
D_LEASES='leases'
F_CONTACT='contact'
RUN_SEP='__'
J_PID='pid'
# </protocol>
limit=$1
dirs=${CLOUDSEND_DEADMAN_DIRS:-/root/.cloudsend /home/*/.cloudsend}
period=${CLOUDSEND_DEADMAN_PERIOD:-30}
poweroff=${CLOUDSEND_POWEROFF:-shutdown -h now}
busy_check=${CLOUDSEND_DEADMAN_BUSY:-}
now=$(mktemp) || exit 1 # its mtime is the time of the current look: a lease runs while its file is newer
trap 'rm -f "$now"' EXIT
busy=$(date +%s) # when the instance was last seen in use (its boot counts as use)
contacted=0      # the newest client contact seen
echo "armed: powers off after ${limit}s without a running job or a client in contact"
while sleep "$period"; do
    touch "$now"
    t=$(date +%s)
    # shellcheck disable=SC2086 # the directories' patterns are expanded here
    for d in $dirs; do
        [ -d "$d" ] || continue
        if [ -f "$d/$F_CONTACT" ]; then
            c=$(date -r "$d/$F_CONTACT" +%s)
            if [ "$c" -gt "$contacted" ]; then
                contacted=$c
                [ "$c" -gt "$busy" ] && busy=$c
                l=
                read -r l <"$d/$F_CONTACT"
                case $l in '' | *[!0-9]*) ;; *)
                    [ "$l" = "$limit" ] || echo "client contact: powers off after ${l}s idle from now on"
                    limit=$l
                    ;;
                esac
            fi
        fi
        for l in "$d/$D_LEASES"/*; do
            # shellcheck disable=SC3013 # -nt: in dash, bash, ksh and busybox alike
            [ "$l" -nt "$now" ] && busy=$t
        done
        for r in "$d/$D_RUNNING"/*; do
            [ -f "$r" ] || continue
            n=${r##*/}
            p=
            read -r p <"$d/$D_JOBS/${n%%"$RUN_SEP"*}/${n#*"$RUN_SEP"}/$J_PID" 2>/dev/null
            [ -n "$p" ] && kill -0 "$p" 2>/dev/null && busy=$t
        done
    done
    [ -n "$busy_check" ] && sh -c "$busy_check" >/dev/null 2>&1 && busy=$t
    if [ $((t - busy)) -ge "$limit" ]; then
        echo "no running job and no client for $((t - busy))s: powering off"
        sh -c "$poweroff"
        exit
    fi
done
