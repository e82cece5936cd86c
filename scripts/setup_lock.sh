# Sourced by setup.sh and test.sh: take_setup_lock WHO takes the checkout's setup lock on fd 9, waiting while
# another setup holds it (the demo and the tests started together on a fresh checkout would build one .venv twice
# and prepare one data folder twice): the second waits for the first, then finds its work done. The lock is on
# scripts/setup.sh, opened for reading where that suffices (a checkout whose files are not ours to write); NFS takes
# an exclusive flock only on a file opened for writing (flock says "Bad file descriptor"), so the script is then
# opened read-write (nothing is written). Where neither locks (a filesystem without locks), one line, and on.
# Without flock(1) (util-linux; stock macOS has none) there is no lock.
take_setup_lock() {
    command -v flock >/dev/null || return 0
    exec 9<scripts/setup.sh
    flock 9 2>/dev/null && return 0
    { exec 9<>scripts/setup.sh && flock 9; } 2>/dev/null && return 0
    echo "$1: could not lock scripts/setup.sh here (a filesystem without file locks, or on NFS the script not" \
        "writable by you?): going on unlocked; run one setup at a time in this checkout" >&2
}
