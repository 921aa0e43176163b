#!/bin/sh
# cloudsend host runtime: the only code that runs on a host. POSIX sh, no Python needed.
#
#   host.sh tick     BASE CPUS:GPUS LEASE BATCH [KEY...] < manifest
#                                                  a poll in one round trip: renew BATCH's lease, stage the
#                                                  manifest's jobs (private copies of files from the store),
#                                                  queue them, start what fits, print the records of KEYs
#   host.sh status   BASE BATCH LEASE [KEY...]    one JSON line per job of BATCH (or per KEY); catches vanished
#                                                  processes; renews the batch's lease for LEASE seconds (0: not)
#   host.sh lease    BASE BATCH LEASE             renew the batch's lease only
#   host.sh cancel   BASE BATCH [KEY...]          kill jobs' process groups (BATCH '*' = every batch)
#   host.sh missing  BASE            < shas       print the shas not in the file store, or whose content no
#                                                  longer matches its hash (removed: to be sent again)
#   host.sh env      BASE KEY [nouv]              print an environment's state, starting its build if needed
#                                                  (or needs-uv OS ARCH: see ensure_env)
#   host.sh arm      BASE SECONDS                 a client's contact: re-arms an instance's dead-man switch
#   host.sh old      BASE MINUTES                 the host's clock, then "KIB END BATCH/KEY" per job that ended
#                                                  over MINUTES ago, of a batch no client runs (cloudsend prune)
#   host.sh forget   BASE [BATCH/KEY...]          remove those jobs' records, each only if it has still ended
#   host.sh run|bootstrap|dispatch ...            internal: started by the commands above
#
# A job's record (jobs/<batch>/<key>/status) is one JSON line, the JobStatus of cloudsend_prefect/protocol.py:
# {"key","state","pid","start","end","exit","logs","cause","reason"}, every string escaped by json_str.
#
# Layout under BASE (its names, like the states and causes, come from protocol.py: the <protocol> block below):
# files/<sha256> (uploads by content), envs/<key>/ (one per environment hash), tools/ (what environment builds
# share: rattler, the conda package cache, a Julia the runtime installed), bin/ (this script),
# jobs/<batch>/<key>/ (the runtime's record of a job: cmd.sh, status, pid, stdout, stderr, outputs...) and
# jobs/<batch>/<key>/work/ (the job's working directory: private copies of its uploads, and what it writes;
# nothing of the runtime's), queue/ and running/ (host-wide CPU and GPU accounting shared by all batches: a
# running/ entry holds its job's CPUs and GPU devices, "4 0,1" or "1 -"), leases/ (one file per batch, its mtime
# the lease's expiry), capacity ("CPUS GPUS"), lock, dispatch.wanted, now.
#
# Fencing: a queued job starts only while its batch's lease runs. The client renews it at every poll, for
# less time than it waits before declaring a silent host lost, so a host that is cut off, or that comes back
# after being declared lost (its jobs handed to other hosts), starts none of its queued jobs: they end
# aborted with FENCED as their reason and fenced as their cause. A job already running goes on to its end.
#
# Everything here is private to the login user (umask 077); jobs inherit that umask.
#
# Short jobs make this script's own cost matter: every job is started and ended by it, so the per-job path
# (stage, dispatch, run) avoids forks wherever a builtin does (each fork+exec is about a millisecond, much
# more on a busy host), and finishing jobs never wait for each other's dispatch (see dispatch below).
#
# Sourced with HOST_SH_LIBRARY set, it only defines its functions (tests call them one by one): main runs
# nothing.
set -u
umask 077

# <protocol> generated from cloudsend_prefect/protocol.py (shell_block): edit names there
S_QUEUED='queued'
S_WAITING='waiting'
S_RUNNING='running'
S_DONE='done'
S_FAILED='failed'
S_ABORTED='aborted'
C_FENCED='fenced'
C_CANCELLED='cancelled'
C_ENV='environment'
E_BUILDING='building'
E_READY='ready'
E_FAILED='failed'
NEEDS_UV='needs-uv'
NO_UV='nouv'
D_FILES='files'
D_INCOMING='files/.incoming'
D_ENVS='envs'
D_JOBS='jobs'
D_QUEUE='queue'
D_RUNNING='running'
D_LEASES='leases'
D_TOOLS='tools'
D_BIN='bin'
F_CONTACT='contact'
RERUN_ANY='2'
RUN_SEP='__'
J_WORK='work'
J_STDOUT='stdout'
J_STDERR='stderr'
J_PID='pid'
J_END='end'
V_STATE='state'
V_LOG='bootstrap.log'
L_STDOUT='o'
L_STDERR='e'
# </protocol>
FENCED="not started: its batch's lease expired (the client stopped watching this host; a rerun queues it again)"
JOB_SHELL=bash
command -v bash >/dev/null 2>&1 || JOB_SHELL="sh"

# init BASE: the runtime's directories under BASE (made if missing), and BASE made absolute.
init() {
    BASE=$1
    for dir in "$D_INCOMING" "$D_ENVS" "$D_JOBS" "$D_QUEUE" "$D_RUNNING" "$D_LEASES"; do # builtins: no fork per job
        [ -d "$BASE/$dir" ] || mkdir -p "$BASE/$D_INCOMING" "$BASE/$D_ENVS" "$BASE/$D_JOBS" "$BASE/$D_QUEUE" \
            "$BASE/$D_RUNNING" "$BASE/$D_LEASES" || exit 3
    done
    case $BASE in /*) ;; *) BASE=$(cd "$BASE" && pwd) || exit 3 ;; esac
}

now() {
    now_t=$(date +%s.%N)
    case $now_t in *N) now_t=$(date +%s) ;; esac
    printf '%s' "$now_t"
}

# stamp FILE: the time (epoch seconds, with nanoseconds where date has %N) into FILE, in one fork.
stamp() {
    date +%s.%N >"$1"
    now_t=
    read -r now_t <"$1"
    case $now_t in *N) date +%s >"$1" ;; esac
}

# json_str TEXT: TEXT as a JSON string, quotes included, in $js: backslashes and quotes escaped, control
# characters (newlines, tabs...) as \uXXXX. Text that needs none (the per-job path's) costs one case, no fork.
json_str() {
    case $1 in
    *[\"\\[:cntrl:]]*) ;;
    *)
        js="\"$1\""
        return 0
        ;;
    esac
    js_in=$1
    js=
    while [ -n "$js_in" ]; do
        js_rest=${js_in#?}
        js_c=${js_in%"$js_rest"}
        js_in=$js_rest
        case $js_c in
        \" | \\) js="$js\\$js_c" ;;
        [[:cntrl:]]) js="$js$(printf '\\u%04x' "'$js_c")" ;;
        *) js="$js$js_c" ;;
        esac
    done
    js="\"$js\""
}

# record_state LINE: the state of a job record (a status file's line) in $rs; empty when LINE is none. The
# key before it is escaped (json_str), so the first '","state":"' is the state's. No fork.
record_state() {
    case $1 in
    '{"key":"'*'","state":"'*)
        rs=${1#*'","state":"'}
        rs=${rs%%'"'*}
        ;;
    *) rs= ;;
    esac
}

# renew BATCH SECONDS: the batch's queued jobs may start for SECONDS more (0: leave the lease as it is).
renew() {
    case $2 in '' | 0 | *[!0-9]*) return 0 ;; esac
    exp=$(($(date +%s) + $2 + 1)) # +1: date +%s is truncated: the lease runs at least $2 seconds
    touch -d "@$exp" "$BASE/$D_LEASES/$1" 2>/dev/null || {
        echo "host.sh: cannot set the lease of batch $1 (touch -d)" >&2
        exit 3
    }
}

# Start a command in the background in its own session, holding none of our file descriptors (so an SSH
# channel closes at once); $! is its pid. A function's own redirections would not do: dash keeps the
# caller's stdout open in the background subshell.
detach() {
    (
        exec </dev/null >/dev/null 2>&1
        if command -v setsid >/dev/null 2>&1; then exec setsid "$@"; else exec "$@"; fi
    ) &
}

# The host-wide lock is the file BASE/lock holding its owner's pid, created exclusively (noclobber) by a
# builtin: taking it costs no fork. (Earlier versions used a directory of the same name, which excludes
# them as well.)
trylock() {
    set -C
    if echo $$ 2>/dev/null >"$BASE/lock"; then
        set +C
        return 0
    fi
    set +C
    return 1
}

# steal_dead_lock: remove the lock if its owner died (it never will release it).
steal_dead_lock() {
    owner=
    { read -r owner <"$BASE/lock" || read -r owner <"$BASE/lock/pid"; } 2>/dev/null
    if [ -n "$owner" ] && ! kill -0 "$owner" 2>/dev/null; then rm -rf "$BASE/lock"; fi
}

lock() {
    n=0
    until trylock; do
        n=$((n + 1))
        if [ $n -gt 250 ]; then # about 5 s
            steal_dead_lock
            n=0
        fi
        sleep 0.02 2>/dev/null || sleep 1
    done
}

unlock() {
    rm -f "$BASE/lock"
}

# write_status DIR STATE REASON [CAUSE [new]]: the job's one-line JSON record, replaced atomically (a new
# record, in a directory nothing else reads yet, is written in place: no fork). CAUSE: one of the protocol's
# C_* words, or empty. Strings are escaped (json_str); a number file holding anything else is written null.
write_status() {
    ws_pid=null ws_start=null ws_end=null ws_exit=null
    [ -f "$1/$J_PID" ] && read -r ws_pid <"$1/$J_PID"
    [ -f "$1/start" ] && read -r ws_start <"$1/start"
    [ -f "$1/$J_END" ] && read -r ws_end <"$1/$J_END"
    [ -f "$1/exit" ] && read -r ws_exit <"$1/exit"
    case $ws_pid in '' | *[!0-9]*) ws_pid=null ;; esac
    case $ws_exit in '' | *[!0-9]*) ws_exit=null ;; esac
    case $ws_start in '' | *[!0-9.]* | *.*.* | .*) ws_start=null ;; esac
    case $ws_end in '' | *[!0-9.]* | *.*.* | .*) ws_end=null ;; esac
    ws_logs= # which logs hold something (o: stdout, e: stderr): the client fetches no empty one
    [ -s "$1/$J_STDOUT" ] && ws_logs=$L_STDOUT
    [ -s "$1/$J_STDERR" ] && ws_logs=$ws_logs$L_STDERR
    ws_cause=null
    [ -z "${4:-}" ] || ws_cause="\"$4\""
    json_str "${1##*/}"
    ws_key=$js
    json_str "$3"
    if [ "${5:-}" = new ]; then ws_to=$1/status; else ws_to=$1/status.tmp; fi
    printf '{"key":%s,"state":"%s","pid":%s,"start":%s,"end":%s,"exit":%s,"logs":"%s","cause":%s,"reason":%s}\n' \
        "$ws_key" "$2" "$ws_pid" "$ws_start" "$ws_end" "$ws_exit" "$ws_logs" "$ws_cause" "$js" >"$ws_to" || return 1
    [ "$ws_to" = "$1/status" ] || mv -f "$1/status.tmp" "$1/status"
}

# Start queued jobs while their CPUs fit; a job bigger than the host still runs, alone (the rules of
# cloudsend_prefect/placement.py; tests/test_host_sh.py checks this pass against them).
#
# Any process may ask for a dispatch (a job ended, jobs were staged, an environment got ready) and none
# waits for another's: it raises the flag BASE/dispatch.wanted, then runs dispatch passes while it can take
# the lock and the flag is up. If the lock is held, the holder sees the flag after releasing it and runs
# another pass, so a freed CPU is never missed. A holder clears the flag before each pass, and a requester
# frees its CPUs before raising it, so the pass that follows a clear sees them. Builtins only, apart from
# the passes' own work.
#
# `dispatch chain` (a job's wrapper, its job just ended) takes the first job it starts for itself: it is
# returned in $next, and the wrapper execs into it instead of a new detached process being made.
dispatch() {
    chain=${1:-}
    next=
    echo 1 >"$BASE/dispatch.wanted"
    while :; do
        wanted=
        read -r wanted <"$BASE/dispatch.wanted" 2>/dev/null
        [ "$wanted" = 1 ] || return 0
        if ! trylock; then
            steal_dead_lock
            trylock || return 0
        fi
        echo 0 >"$BASE/dispatch.wanted"
        dispatch_pass # releases the lock
    done
}

# One pass over the queue, under the lock. A running/ file holding 0 is a job that ended (its wrapper
# frees its CPUs with a builtin write); the pass removes those, its queue entries and the lock in one rm.
# vanished RUNNING_ENTRY: true when the entry's job says running but its process is gone (killed with its
# host, say): its CPUs are free again and the job is recorded aborted. Batch names hold no "__". No fork.
vanished() {
    n=${1##*/}
    jd="$BASE/$D_JOBS/${n%%"$RUN_SEP"*}/${n#*"$RUN_SEP"}"
    p=
    [ -f "$jd/$J_PID" ] && read -r p <"$jd/$J_PID"
    [ -n "$p" ] && ! kill -0 "$p" 2>/dev/null || return 1
    line=
    IFS= read -r line <"$jd/status" 2>/dev/null
    record_state "$line"
    [ "$rs" = "$S_RUNNING" ] || return 1
    write_status "$jd" "$S_ABORTED" "process vanished (killed, or the host restarted)"
}

dispatch_pass() {
    consumed=
    ended=
    echo >"$BASE/now" # its mtime is this pass's time: a lease runs while its file is newer (no fork)
    cap=1 gcap=0
    read -r cap gcap <"$BASE/capacity" 2>/dev/null
    gcap=${gcap:-0}
    used=0
    gused= # GPU devices in use: ",0,1"
    for r in "$BASE/$D_RUNNING"/*; do
        [ -f "$r" ] || continue
        c='' g=''
        read -r c g <"$r"
        case $c in
        0) ended="$ended$r
" ;;
        '') used=$((used + 1)) ;; # being written: count it until it can be read
        *)
            if vanished "$r"; then
                consumed="$consumed$r
"
            else
                used=$((used + c))
                [ "${g:--}" = - ] || gused="$gused,$g"
            fi
            ;;
        esac
    done
    for q in "$BASE/$D_QUEUE"/*; do
        [ -f "$q" ] || continue
        [ "$used" -ge "$cap" ] && break
        batch='' key=''
        read -r batch key <"$q"
        [ -n "$key" ] || continue # never half-written (entries are moved in whole); skip anyway
        d="$BASE/$D_JOBS/$batch/$key"
        if [ ! -d "$d" ]; then
            consumed="$consumed$q
"
            continue
        fi
        # shellcheck disable=SC3013 # -nt: in dash, bash, ksh and busybox alike
        if [ ! "$BASE/$D_LEASES/$batch" -nt "$BASE/now" ]; then
            consumed="$consumed$q
"
            write_status "$d" "$S_ABORTED" "$FENCED" "$C_FENCED"
            continue
        fi
        read -r c <"$d/cpus"
        g=0
        [ -f "$d/gpus" ] && read -r g <"$d/gpus"
        if [ "$g" -gt "$gcap" ]; then
            consumed="$consumed$q
"
            write_status "$d" "$S_ABORTED" "needs $g GPUs; this host has $gcap"
            continue
        fi
        read -r env <"$d/env"
        if [ "$env" != - ]; then
            es=
            read -r es <"$BASE/$D_ENVS/$env/$V_STATE" 2>/dev/null
            case $es in
            "$E_READY") ;;
            "$E_FAILED")
                consumed="$consumed$q
"
                write_status "$d" "$S_ABORTED" "environment failed to build (see its bootstrap log)" "$C_ENV"
                continue
                ;;
            *)
                [ -f "$d/waiting" ] || { : >"$d/waiting" && write_status "$d" "$S_WAITING" "waiting for environment"; }
                continue
                ;;
            esac
        fi
        claim=$c # placement.py's rule: a job asking more CPUs than the host claims all of them (and runs alone)
        [ "$c" -gt "$cap" ] && claim=$cap
        if [ $((used + claim)) -le "$cap" ]; then
            devs=-
            if [ "$g" -gt 0 ]; then
                free_gpus "$g" || continue # its GPUs are busy: a later job may fit
                gused="$gused,$devs"
            fi
            echo "$c $devs" >"$BASE/$D_RUNNING/$batch$RUN_SEP$key"
            consumed="$consumed$q
"
            if [ "$chain" = chain ]; then
                chain=
                next="$batch $key"
            else
                detach sh "$SELF" run "$BASE" "$batch" "$key"
            fi
            used=$((used + c))
        fi
    done
    old_ifs=$IFS
    IFS='
'
    set -f
    for r in $ended; do # still 0: not restarted by this pass (a rerun of the same job)
        c=
        read -r c <"$r"
        [ "$c" = 0 ] && consumed="$consumed$r
"
    done
    # Only lock holders read the queue, so its entries go before the lock does (rm removes in order).
    # shellcheck disable=SC2086 # one path per line (IFS), globbing off
    rm -f $consumed "$BASE/lock"
    set +f
    IFS=$old_ifs
}

# free_gpus N: the first N GPU devices not in $gused, comma-separated in $devs; false when fewer are free.
free_gpus() {
    devs=
    n=0
    i=0
    while [ "$i" -lt "$gcap" ] && [ "$n" -lt "$1" ]; do
        case "$gused," in
        *",$i,"*) ;;
        *)
            devs="${devs:+$devs,}$i"
            n=$((n + 1))
            ;;
        esac
        i=$((i + 1))
    done
    [ "$n" -eq "$1" ]
}

# The manifest is read twice: first to make every new job directory with one mkdir, then to fill them.
# Queue entries are written aside and moved into queue/ together, so a dispatch never reads one half-written.
stage() {
    case $1 in # CPUS:GPUS
    *:*) echo "${1%%:*} ${1#*:}" >"$BASE/capacity" ;;
    *) echo "$1 0" >"$BASE/capacity" ;;
    esac
    lease=$2
    for f in "$BASE/$D_INCOMING"/*; do # sent with the client's umask: made private, then stored
        [ -f "$f" ] || continue
        [ -n "${private:-}" ] || { chmod go= "$BASE/$D_INCOMING"/* && private=1; }
        mv -f "$f" "$BASE/$D_FILES/${f##*/}"
    done
    manifest="$BASE/$D_JOBS/.manifest.$$"
    incoming="$BASE/$D_QUEUE/.incoming.$$"
    cat >"$manifest" || exit 3
    # J batch key cpus envkey timeout rerun maxout gpus: a known job is left alone (re-attached, never started
    # twice) unless rerun asks to replace it once it has ended: 1 if it ended other than done (a retry of a
    # failed job, a job fenced before it started), 2 even if done (an explicit rerun of the batch). Two
    # clients retrying the same job thus run it once: the second finds it queued, running or done.
    new=
    gone=
    renewed=
    while IFS= read -r line; do
        case $line in 'J '*)
            # shellcheck disable=SC2086 # the fields of the line
            set -- ${line#J }
            [ -n "$renewed" ] || { renew "$1" "$lease" && renewed=1; }
            d="$BASE/$D_JOBS/$1/$2"
            if [ -f "$d/status" ]; then
                IFS= read -r line <"$d/status"
                record_state "$line"
                case $rs in
                "$S_DONE")
                    [ "$6" = "$RERUN_ANY" ] && gone="$gone$d
"
                    ;;
                "$S_FAILED" | "$S_ABORTED")
                    [ "$6" != 0 ] && gone="$gone$d
"
                    ;;
                esac
            else
                new="$new$d/$J_WORK
"
            fi
            ;;
        esac
    done <"$manifest"
    old_ifs=$IFS
    IFS='
'
    set -f
    # shellcheck disable=SC2086 # one path per line (IFS), globbing off
    [ -n "$gone" ] && rm -rf $gone
    for g in $gone; do new="$new$g/$J_WORK
"; done
    # shellcheck disable=SC2086 # one path per line (IFS), globbing off
    [ -n "$new" ] && mkdir -p $new "$incoming"
    set +f
    IFS=$old_ifs
    stamp=$(now)
    i=1000000 # queue entries sort by staging time, then by manifest order
    skip=1
    d=
    while IFS= read -r line; do
        tag=${line%% *}
        rest=${line#* }
        case $tag in
        J)
            # shellcheck disable=SC2086 # the fields of the line
            set -- $rest
            d="$BASE/$D_JOBS/$1/$2"
            batch=$1 key=$2
            skip=1
            [ -f "$d/status" ] || [ ! -d "$d" ] && continue # known (or not made: nothing to queue)
            skip=0
            echo "$3" >"$d/cpus"
            [ "${8:-0}" = 0 ] || echo "$8" >"$d/gpus"
            echo "$4" >"$d/env"
            [ "$5" != - ] && echo "$5" >"$d/timeout"
            [ "$7" != - ] && echo "$7" >"$d/maxout"
            : >"$d/outputs"
            : >"$d/cmd.sh"
            ;;
        F) # F sha flags rel: flags x (executable), l (large: shared, not copied), - (neither)
            [ $skip = 1 ] && continue
            sha=${rest%% *}
            rest=${rest#* }
            x=${rest%% *}
            rel=${rest#* }
            case $rel in */*) mkdir -p "$d/$J_WORK/${rel%/*}" ;; esac
            src="$BASE/$D_FILES/$sha" dst="$d/$J_WORK/$rel"
            case $x in
            *l*)
                # A large file: a copy per job would cost its size in time and disk, so it is shared instead: a
                # reflink where the file system has them (XFS, btrfs: private, free until written), else a hard
                # link to the store's read-only copy (a job can delete or replace it, not write into it, unless
                # it runs as root; the store is checked by hash before each client's first use).
                cp --reflink=always "$src" "$dst" 2>/dev/null || { chmod a-w "$src" && ln -f "$src" "$dst"; } ||
                    cp "$src" "$dst" || exit 3
                ;;
            *)
                # A private copy: whatever the job does to it, the store (and every other job) keeps the original.
                cp --reflink=auto "$src" "$dst" 2>/dev/null || cp "$src" "$dst" || exit 3
                ;;
            esac
            case $x in *x*) chmod u+x "$dst" ;; esac
            ;;
        O) [ $skip = 1 ] || printf '%s\n' "$rest" >>"$d/outputs" ;;
        C) [ $skip = 1 ] || printf '%s\n' "$rest" >>"$d/cmd.sh" ;;
        E)
            [ $skip = 1 ] && continue
            skip=1 # a second E, or one without J, queues nothing
            write_status "$d" "$S_QUEUED" "waiting for free CPUs" "" new
            i=$((i + 1))
            printf '%s %s\n' "$batch" "$key" >"$incoming/$stamp.$i"
            ;;
        esac
    done <"$manifest"
    [ $i -gt 1000000 ] && mv -f "$incoming"/* "$BASE/$D_QUEUE/"
    rm -rf "$manifest" "$incoming"
    dispatch
}

# The job runs in DIR/work; everything of the runtime's stays in DIR, out of the job's way.
runjob() {
    d="$BASE/$D_JOBS/$1/$2"
    cd -P "$d/$J_WORK" || exit 1
    work=$PWD
    echo $$ >"$d/$J_PID"
    stamp "$d/start"
    write_status "$d" "$S_RUNNING" ""
    read -r env <"$d/env"
    read -r CLOUDSEND_CPUS <"$d/cpus"
    export CLOUDSEND_CPUS CLOUDSEND_BATCH="$1" CLOUDSEND_JOB="$2"
    # Its GPUs (given by dispatch_pass); on a host with GPUs, a job that asked for none sees none.
    _c='' devs='' _cap='' gcap=''
    read -r _c devs <"$BASE/$D_RUNNING/$1$RUN_SEP$2"
    read -r _cap gcap <"$BASE/capacity"
    if [ "${devs:--}" != - ]; then
        export CUDA_VISIBLE_DEVICES="$devs"
    elif [ "${gcap:-0}" -gt 0 ]; then
        export CUDA_VISIBLE_DEVICES=
    fi
    t=
    [ -f "$d/timeout" ] && read -r t <"$d/timeout"
    oom_kills
    oom_before=$oom
    if [ "$env" != - ] && [ -f "$BASE/$D_ENVS/$env/activate" ]; then
        # In a subshell: this process may go on to the host's next job, which must not inherit the environment.
        # shellcheck disable=SC1090
        (. "$BASE/$D_ENVS/$env/activate" && run_cmd)
    else
        run_cmd
    fi
    ex=$?
    echo "$ex" >"$d/exit"
    stamp "$d/$J_END"
    cd -P "$work" 2>/dev/null || cd / || exit 1
    if [ -f "$d/cancelled" ]; then
        write_status "$d" "$S_ABORTED" "cancelled" "$C_CANCELLED"
    elif [ "$ex" -eq 0 ]; then
        if check_outputs; then
            write_status "$d" "$S_DONE" ""
        else
            write_status "$d" "$S_ABORTED" "$bad"
        fi
    elif [ -n "$t" ] && [ "$ex" -eq 124 ]; then
        write_status "$d" "$S_FAILED" "timed out after ${t}s"
    elif [ "$ex" -eq 137 ] && oom_kills && [ "$oom" -gt "$oom_before" ]; then
        write_status "$d" "$S_FAILED" "out of memory: killed by the kernel's OOM killer"
    elif [ "$ex" -eq 137 ]; then
        write_status "$d" "$S_FAILED" "killed by SIGKILL (out of memory, or killed by someone)"
    elif [ "$ex" -ne 0 ] && tail -n 5 "$d/$J_STDERR" | grep -qiE 'MemoryError|Cannot allocate memory|out of memory|bad_alloc'; then
        write_status "$d" "$S_FAILED" "out of memory (exit code $ex; see stderr)"
    elif [ "$ex" -gt 128 ]; then
        write_status "$d" "$S_FAILED" "killed by signal $((ex - 128))"
    else
        write_status "$d" "$S_FAILED" "exit code $ex"
    fi
    echo 0 >"$BASE/$D_RUNNING/$1$RUN_SEP$2" # frees its CPUs (see dispatch_pass)
    dispatch chain
    # The next job, if this process took one: same pid and process group (its own session), fresh shell.
    # shellcheck disable=SC2086
    if [ -n "$next" ]; then exec sh "$SELF" run "$BASE" $next; fi
}

# check_outputs: whether every output of the job in $d (cwd: its work dir $work) is a regular file, reached
# without symbolic links, and all of them together within its maxout bytes; else why not, in $bad. Only
# such files are fetched: a link could point anywhere on the host, a FIFO or device never ends.
check_outputs() {
    bad=
    set --
    while IFS= read -r o; do
        if [ -L "$o" ]; then
            bad="output $o is a symbolic link: only regular files are fetched"
        elif [ ! -e "$o" ]; then
            bad="missing output file: $o"
        elif [ ! -f "$o" ]; then
            bad="output $o is not a regular file (a directory, FIFO, socket or device): only regular files are fetched"
        else
            case $o in */*)
                if ! cd -P "${o%/*}" 2>/dev/null || [ "$PWD" != "$work/${o%/*}" ]; then
                    bad="output $o is under a symbolically linked directory: only files inside the job's directory are fetched"
                fi
                cd -P "$work" || return 1
                ;;
            esac
        fi
        [ -n "$bad" ] && return 1
        set -- "$@" "$o"
    done <"$d/outputs"
    [ $# -gt 0 ] && [ -f "$d/maxout" ] || return 0
    read -r maxout <"$d/maxout"
    total=$(wc -c -- "$@" | { last=0; while read -r n _; do last=$n; done; echo "$last"; })
    if [ "${total:-0}" -gt "$maxout" ]; then
        bad="outputs total $total bytes, over the limit of $maxout bytes (max_output_mb)"
        return 1
    fi
    return 0
}

# oom_kills: the OOM-killer count of this process's cgroup (cgroup v2) into $oom, 0 when unknown. No fork.
oom_kills() {
    oom=0
    cg=
    while IFS= read -r line; do
        case $line in 0::*) cg=${line#0::} ;; esac
    done </proc/self/cgroup 2>/dev/null
    [ -r "/sys/fs/cgroup$cg/memory.events" ] || return 0
    while read -r k v; do
        [ "$k" = oom_kill ] && oom=$v
    done <"/sys/fs/cgroup$cg/memory.events"
    return 0
}

run_cmd() {
    if [ -n "$t" ] && command -v timeout >/dev/null 2>&1; then
        timeout -k 10 "$t" "$JOB_SHELL" "$d/cmd.sh" >"$d/$J_STDOUT" 2>"$d/$J_STDERR"
    else
        "$JOB_SHELL" "$d/cmd.sh" >"$d/$J_STDOUT" 2>"$d/$J_STDERR"
    fi
}

# status BATCH [KEY...]: with keys, only those jobs (what a client watching a few jobs of a big batch asks).
status() {
    batch=$1
    renew "$1" "$2"
    shift 2
    vanished=0
    if [ $# -gt 0 ]; then
        for key in "$@"; do status_of "$BASE/$D_JOBS/$batch/$key"; done
    else
        for d in "$BASE/$D_JOBS/$batch"/*/; do status_of "${d%/}"; done
    fi
    if [ $vanished = 1 ]; then dispatch; fi
}

status_of() {
    d=$1
    [ -f "$d/status" ] || return 0
    IFS= read -r line <"$d/status"
    record_state "$line"
    if [ "$rs" = "$S_RUNNING" ]; then
        pid=
        read -r pid <"$d/$J_PID" 2>/dev/null
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            IFS= read -r line <"$d/status" # it may have just finished
            record_state "$line"
            if [ "$rs" = "$S_RUNNING" ]; then
                write_status "$d" "$S_ABORTED" "process vanished (killed, or the host restarted)"
                rm -f "$BASE/$D_RUNNING/$batch$RUN_SEP${d##*/}"
                vanished=1
                IFS= read -r line <"$d/status"
            fi
        fi
    fi
    printf '%s\n' "$line"
}

cancel() {
    batch=$1
    shift
    lock
    killed=
    # shellcheck disable=SC2231 # BATCH '*' means every batch
    for d in "$BASE/$D_JOBS"/$batch/*/; do
        d=${d%/}
        key=${d##*/}
        if [ $# -gt 0 ]; then
            want=0
            for k in "$@"; do [ "$k" = "$key" ] && want=1; done
            [ $want = 1 ] || continue
        fi
        [ -f "$d/status" ] || continue
        IFS= read -r line <"$d/status"
        record_state "$line"
        case $rs in
        "$S_QUEUED" | "$S_WAITING")
            for q in "$BASE/$D_QUEUE"/*; do
                [ -f "$q" ] || continue
                read -r qb qk <"$q"
                [ "$qk" = "$key" ] && [ "$BASE/$D_JOBS/$qb/$qk" = "$d" ] && rm -f "$q"
            done
            write_status "$d" "$S_ABORTED" "cancelled" "$C_CANCELLED"
            echo "$key"
            ;;
        "$S_RUNNING")
            : >"$d/cancelled"
            pid=
            read -r pid <"$d/$J_PID" 2>/dev/null
            [ -n "$pid" ] && { kill -TERM -"$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null; }
            killed="$killed$d
"
            echo "$key"
            ;;
        esac
    done
    unlock
    [ -z "$killed" ] && return 0
    sleep 1
    # The job's wrapper died with its process group: record the end here.
    old_ifs=$IFS
    IFS='
'
    for d in $killed; do
        pid=
        read -r pid <"$d/$J_PID" 2>/dev/null
        [ -n "$pid" ] && kill -KILL -"$pid" 2>/dev/null
        write_status "$d" "$S_ABORTED" "cancelled" "$C_CANCELLED"
        b=${d%/*}
        rm -f "$BASE/$D_RUNNING/${b##*/}$RUN_SEP${d##*/}"
    done
    IFS=$old_ifs
    dispatch
}

missing() {
    present=
    while read -r sha; do
        case $sha in '' | *[!0-9a-f]*) continue ;; esac
        if [ -f "$BASE/$D_FILES/$sha" ]; then present="$present $sha"; else echo "$sha"; fi
    done
    [ -n "$present" ] && command -v sha256sum >/dev/null 2>&1 || return 0
    cd "$BASE/$D_FILES" || exit 3
    # A stored file whose content no longer matches its name is removed, and sent again.
    # shellcheck disable=SC2086
    sha256sum -- $present | while read -r sum name; do
        name=${name#\*}
        [ "$sum" = "$name" ] || { rm -f "$name" && echo "$name"; }
    done
}

# ensure_env KEY [nouv]: the environment's state; a build is started unless it is ready or being built. When
# the build needs Python tools this host lacks (no uv, and a python3 without venv support: stock Debian and
# Ubuntu images), it prints `needs-uv <os> <arch>` instead and starts nothing: the client sends its own uv
# to BASE/bin/uv when it runs on the same OS and architecture and asks again, else asks again with `nouv`
# (the build then installs python3-venv if root or sudo allows, or fails saying what the host lacks).
ensure_env() {
    e="$BASE/$D_ENVS/$1"
    mkdir -p "$e"
    lock
    st=
    read -r st <"$e/$V_STATE" 2>/dev/null
    if [ "$st" = "$E_BUILDING" ]; then
        pid=
        read -r pid <"$e/pid" 2>/dev/null
        [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || st=
    fi
    if [ "$st" != "$E_READY" ] && [ "$st" != "$E_BUILDING" ]; then
        if [ "${2:-}" != "$NO_UV" ] && needs_python "$e" && ! python_tools "$e"; then
            unlock
            echo "$NEEDS_UV $(uname -s) $(uname -m)"
            return 0
        fi
        st=$E_BUILDING
        echo "$st" >"$e/$V_STATE"
        detach sh "$SELF" bootstrap "$BASE" "$1"
        echo $! >"$e/pid"
    fi
    unlock
    echo "$st"
}

# -- environment builds -------------------------------------------------------------------------------------
# An environment is built once per host into envs/<key>/ from the files the client put there: setup.sh, apt.txt,
# conda.txt or environment.yml (+ conda-channels.txt), requirements.txt, julia.txt or Project.toml (+ Manifest.toml),
# in that order. Tools shared by all environments (rattler's venv, the package cache, a Julia the build
# installed) live in tools/. What a job needs of it is written to envs/<key>/activate, which its run sources.
RATTLER_VERSION=0.28.0 # py-rattler, the conda solver and installer, from PyPI (see build_conda)
JULIA_VERSION=1.11.5   # the Julia a host without one gets (the official build; see install_julia)
# Pkg.add of the packages given as arguments: `Name`, or `Name@version`.
JULIA_ADD='using Pkg
Pkg.add(map(ARGS) do arg
    name, version = occursin("@", arg) ? split(arg, "@"; limit=2) : (arg, "")
    isempty(version) ? PackageSpec(name=String(name)) : PackageSpec(name=String(name), version=String(version))
end)'

# needs_python DIR: whether the environment in DIR is built with Python tools (a venv, or rattler's).
needs_python() {
    [ -f "$1/requirements.txt" ] || [ -f "$1/conda.txt" ] || [ -f "$1/environment.yml" ]
}

# uv_bin: the uv of this host (on PATH, or the one a client sent); prints nothing when there is none.
uv_bin() {
    command -v uv 2>/dev/null || { [ -x "$BASE/$D_BIN/uv" ] && echo "$BASE/$D_BIN/uv"; } || :
}

# python_tools DIR: whether the environment in DIR can be built here without installing anything first: with
# uv, or with a python3 that makes venvs (3.10 or newer for a conda environment: py-rattler needs it).
python_tools() {
    [ -n "$(uv_bin)" ] && return 0
    if [ -f "$1/conda.txt" ] || [ -f "$1/environment.yml" ]; then
        python3 -c 'import ensurepip, sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1
    else
        python3 -c 'import ensurepip' >/dev/null 2>&1
    fi
}

# as_root CMD...: CMD as root, directly or through passwordless sudo; fails saying so when neither works.
as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        echo "$1 needs root or passwordless sudo on this host"
        return 1
    fi
}

# make_venv DIR [VERSIONS]: a virtualenv at DIR: uv's if this host has uv (with a Python in VERSIONS, e.g. '>=3.10',
# which uv fetches when the host's is older), else python3's own (after installing python3-venv where python3
# lacks ensurepip, as stock Debian and Ubuntu images do, when root or sudo allows).
make_venv() {
    uv=$(uv_bin)
    if [ -n "$uv" ]; then
        "$uv" venv -q ${2:+--python "$2"} "$1"
        return
    fi
    if ! command -v python3 >/dev/null 2>&1; then
        echo "cannot make a Python environment: this host has neither python3 nor uv (and the client could not send its uv)"
        return 1
    fi
    if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
        echo "python3 here cannot make a venv (no ensurepip: the python3-venv package is missing) and there is no uv;"
        echo "installing python3-venv (the client sent no uv: it runs on another OS or architecture, or the upload failed)"
        if ! as_root apt-get update -q || ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv; then
            echo "cannot make a Python environment on this host: install uv or python3-venv on it, use an image that has"
            echo "them, or run the client on the host's OS and architecture ($(uname -s) $(uname -m)) so it can send its uv"
            return 1
        fi
    fi
    python3 -m venv "$1"
}

# pip_install PYTHON ARG...: pip packages into PYTHON's environment (with uv when there is one).
pip_install() {
    py=$1
    shift
    uv=$(uv_bin)
    if [ -n "$uv" ]; then
        "$uv" pip install -q --python "$py" "$@"
    else
        "$py" -m pip install -q --disable-pip-version-check "$@"
    fi
}

# activate_var NAME VALUE [PATH-PREFIX]: a line of the activate file exporting NAME=VALUE, single-quoted (the
# base directory is the user's to choose); with 1 as third argument, VALUE/bin is put in front of PATH too.
activate_var() {
    q=$(printf '%s' "$2" | sed "s/'/'\\\\''/g")
    printf "%s='%s'\nexport %s\n" "$1" "$q" "$1" >>"$e/activate"
    # shellcheck disable=SC2016 # $PATH is expanded when the file is sourced
    [ "${3:-}" = 1 ] && printf 'PATH="$%s/bin:$PATH"\nexport PATH\n' "$1" >>"$e/activate"
    return 0
}

# build_conda: the conda environment at $e/conda, solved and installed by rattler (a real conda solver that
# comes from PyPI into a small venv: no conda installer download, no base environment, nothing outside BASE).
# Packages are cached in tools/conda-pkgs for every environment of the host. The script writes the pip
# section of an environment.yml to pip.txt, installed below with requirements.txt.
build_conda() {
    tool="$BASE/$D_TOOLS/rattler-$RATTLER_VERSION"
    if [ ! -x "$tool/bin/python" ]; then
        echo "== rattler (py-rattler $RATTLER_VERSION), once per host"
        if [ -z "$(uv_bin)" ] && ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            echo "conda environments need Python 3.10 or newer here (for py-rattler), or uv, which fetches one:"
            echo "python3 is $(python3 --version 2>&1), and the client sent no uv (another OS or architecture)"
            return 1
        fi
        mkdir -p "$BASE/$D_TOOLS"
        rm -rf "$tool.$$"
        make_venv "$tool.$$" ">=3.10" # what py-rattler needs
        pip_install "$tool.$$/bin/python" "py-rattler==$RATTLER_VERSION" PyYAML
        # another build may have made it meanwhile: keep theirs
        if [ -x "$tool/bin/python" ]; then rm -rf "$tool.$$"; else mv "$tool.$$" "$tool"; fi
    fi
    echo "== conda"
    "$tool/bin/python" "${SELF%.sh}-conda.py" "$e" "$e/conda" "$BASE/$D_TOOLS/conda-pkgs"
    activate_var CONDA_PREFIX "$e/conda" 1
}

# build_pip: requirements.txt (and an environment.yml's pip section) into the conda environment's python, or
# into a venv of their own.
build_pip() {
    echo "== pip"
    set --
    [ -f requirements.txt ] && set -- "$@" -r requirements.txt
    [ -f pip.txt ] && set -- "$@" -r pip.txt
    if [ -d conda ]; then
        if [ ! -x conda/bin/python ]; then
            echo "pip packages need python in the conda environment: add python to env_conda"
            return 1
        fi
        pip_install "$e/conda/bin/python" "$@"
    else
        make_venv venv
        pip_install "$e/venv/bin/python" "$@"
        activate_var VIRTUAL_ENV "$e/venv" 1
    fi
}

# install_julia: the official build of Julia $JULIA_VERSION for this host into tools/ (juliaup would want a
# login shell's profile; a tarball of a pinned version is the same on every host of a batch).
install_julia() {
    case $(uname -m) in
    x86_64) dir=x64 arch=x86_64 ;;
    aarch64 | arm64) dir=aarch64 arch=aarch64 ;;
    *)
        echo "no official Julia build for $(uname -m): install julia on this host (its PATH is searched first)"
        return 1
        ;;
    esac
    url="https://julialang-s3.julialang.org/bin/linux/$dir/${JULIA_VERSION%.*}/julia-$JULIA_VERSION-linux-$arch.tar.gz"
    echo "== julia $JULIA_VERSION from $url, once per host"
    t="$BASE/$D_TOOLS/julia-$JULIA_VERSION"
    mkdir -p "$t.$$"
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL -o "$t.$$.tar.gz" "$url"
    else
        wget -q -O "$t.$$.tar.gz" "$url"
    fi
    tar -xzf "$t.$$.tar.gz" -C "$t.$$" --strip-components=1
    rm -f "$t.$$.tar.gz"
    if [ -x "$t/bin/julia" ]; then rm -rf "$t.$$"; else mv "$t.$$" "$t"; fi
}

# build_julia: a Julia project at $e/julia: the Project.toml (and Manifest.toml) given, or the packages of
# julia.txt added to an empty one; instantiated and precompiled. Jobs get it as JULIA_PROJECT, which is what
# `julia --project=<env>` sets: `julia script.jl` then runs in it.
build_julia() {
    jl=$(command -v julia 2>/dev/null) || jl=
    if [ -z "$jl" ]; then
        jl="$BASE/$D_TOOLS/julia-$JULIA_VERSION/bin/julia"
        [ -x "$jl" ] || install_julia
        activate_var CLOUDSEND_JULIA_HOME "$BASE/$D_TOOLS/julia-$JULIA_VERSION" 1
    fi
    echo "== julia ($jl)"
    mkdir -p julia
    [ -f Project.toml ] && cp Project.toml julia/Project.toml
    [ -f Manifest.toml ] && cp Manifest.toml julia/Manifest.toml
    if [ -f julia.txt ]; then
        set -f
        # shellcheck disable=SC2046 # one package per word: Name, or Name@version
        "$jl" --project="$e/julia" -e "$JULIA_ADD" $(cat julia.txt)
        set +f
    fi
    "$jl" --project="$e/julia" -e 'using Pkg; Pkg.instantiate(); Pkg.precompile()'
    activate_var JULIA_PROJECT "$e/julia"
}

bootstrap() {
    e="$BASE/$D_ENVS/$1"
    cd "$e" || exit 1
    : >activate
    rm -rf venv conda julia pip.txt # what a failed build left: a retry starts afresh
    # Not an `if (...)`: set -e is ignored in a tested context, and every step must stop the build.
    (
        set -e
        if [ -f setup.sh ]; then
            echo "== setup command"
            "$JOB_SHELL" setup.sh
        fi
        if [ -f apt.txt ]; then
            echo "== apt-get"
            as_root apt-get update -q
            # shellcheck disable=SC2046
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(cat apt.txt)
        fi
        if [ -f conda.txt ] || [ -f environment.yml ]; then build_conda; fi
        if [ -f requirements.txt ] || [ -f pip.txt ]; then build_pip; fi
        if [ -f julia.txt ] || [ -f Project.toml ]; then build_julia; fi
    ) >"$V_LOG" 2>&1
    # shellcheck disable=SC2181 # the subshell above is not an `if` condition (see there)
    if [ $? = 0 ]; then echo "$E_READY" >"$V_STATE.tmp"; else echo "$E_FAILED" >"$V_STATE.tmp"; fi
    mv -f "$V_STATE.tmp" "$V_STATE"
    dispatch
}

# The lease is renewed once, first (so stage renews nothing); the manifest may be empty (a poll with nothing new
# to stage), and without KEYs nothing is printed (status would print every job of the batch). With CLOUDSEND_IMDS
# set (a spot instance's client asks every few seconds), EC2's interruption notice is read too.
tick() {
    renew "$3" "$2"
    stage "$1" 0
    batch=$3
    shift 3
    [ -z "${CLOUDSEND_IMDS:-}" ] || notice "$CLOUDSEND_IMDS"
    [ $# -eq 0 ] || status "$batch" 0 "$@"
}

# notice URL: a spot instance's interruption notice from the instance metadata service at URL (IMDSv2: a
# session token first), as the line {"interruption":"..."}; nothing while there is none (404).
notice() {
    command -v curl >/dev/null 2>&1 || return 0
    token=$(curl -sf --connect-timeout 1 -m 2 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' \
        "$1/latest/api/token") || return 0
    action=$(curl -sf --connect-timeout 1 -m 2 -H "X-aws-ec2-metadata-token: $token" \
        "$1/latest/meta-data/spot/instance-action") || return 0
    json_str "$action"
    printf '{"interruption":%s}\n' "$js"
}

# arm SECONDS: the client's contact, for an instance's dead-man switch (providers/deadman.sh): the file's
# mtime is the contact's time, its content the idle limit the client's config asks for. Replaced whole:
# the switch never reads it half-written.
arm() {
    case $1 in '' | *[!0-9]*)
        echo "host.sh arm: not a number of seconds: $1" >&2
        exit 2
        ;;
    esac
    echo "$1" >"$BASE/$F_CONTACT.tmp" && mv -f "$BASE/$F_CONTACT.tmp" "$BASE/$F_CONTACT"
}

# old BASE MINUTES: what `cloudsend prune` may remove here. The host's clock first (ages are the host's), then a
# line per job whose end is over MINUTES old, skipping batches whose lease is live (a client is running them).
# The end is read from the record's end file (builtins): only the jobs listed pay a fork, for their size.
old() {
    mark=$(mktemp) || exit 1
    clock=$(date +%s)
    echo "$clock"
    cut=$((clock - $1 * 60))
    for d in "$BASE/$D_JOBS"/*/*; do
        [ -f "$d/$J_END" ] || continue
        e=
        read -r e <"$d/$J_END"
        e=${e%%.*}
        case $e in '' | *[!0-9]*) continue ;; esac
        [ "$e" -le "$cut" ] || continue
        b=${d%/*}
        b=${b##*/}
        # shellcheck disable=SC3013 # -nt: in every sh host.sh runs on (leases rely on it too)
        [ "$BASE/$D_LEASES/$b" -nt "$mark" ] && continue
        printf '%s %s %s\n' "$(du -sk "$d" | cut -f1)" "$e" "${d#"$BASE/$D_JOBS"/}"
    done
    rm -f "$mark"
}

# forget BASE [BATCH/KEY...]: remove these jobs' records, each only if it has still ended (a rerun may have
# queued it again since it was listed), then their batch's folder if that is now empty.
forget() {
    for rel in "$@"; do
        case $rel in */*/* | .* | */.* | */ | /*) continue ;; */*) ;; *) continue ;; esac
        d="$BASE/$D_JOBS/$rel"
        if [ -f "$d/$J_END" ]; then rm -rf "$d"; fi
        rmdir "$BASE/$D_JOBS/${rel%%/*}" 2>/dev/null
    done
    return 0
}

# main COMMAND BASE ARG...: what the client (cloudsend_prefect.runtime.HostRuntime) or host.sh itself asks.
main() {
    cmd=$1
    init "$2"
    shift 2
    case $cmd in
    tick) tick "$@" ;;
    arm) arm "$@" ;;
    old) old "$@" ;;
    forget) forget "$@" ;;
    status) status "$@" ;;
    lease) renew "$@" ;;
    cancel) cancel "$@" ;;
    missing) missing ;;
    env) ensure_env "$@" ;;
    run) runjob "$@" ;;
    bootstrap) bootstrap "$@" ;;
    dispatch) dispatch ;;
    *)
        echo "host.sh: unknown command $cmd" >&2
        exit 2
        ;;
    esac
}

case $0 in /*) SELF=$0 ;; *) SELF=$PWD/$0 ;; esac
[ -n "${HOST_SH_LIBRARY:-}" ] || main "$@"
