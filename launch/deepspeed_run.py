"""`deepspeed ARGS`, but SIGTERM, SIGINT (Ctrl-C) or SIGHUP (the terminal closed) to this process
reaches every rank, each of which checkpoints at the end of its step and exits; then this exits with
the launcher's code. If this process is killed outright (SIGKILL), the ranks notice within a second
(sst_dist.runtime.watch_launcher, through SST_DIST_SUPERVISOR) and checkpoint and exit too.

    python launch/deepspeed_run.py --num_gpus 2 launch/pretrain.py --recipe R --ds-config C --output-dir D
    kill -TERM <pid of this process>

Why a wrapper: on one node (and with --no_ssh) the `deepspeed` command handles no signal, so a
SIGTERM ends it alone and its child, deepspeed.launcher.launch, keeps the ranks training with
no one watching. That child, signalled itself, passes SIGTERM on but SIGKILLs a rank still alive
30 s later, which cuts a long checkpoint save short. This wrapper starts `deepspeed` in a process
group of its own (so a terminal's Ctrl-C reaches only the wrapper) and on a signal sends SIGTERM
to the ranks alone, then waits for them for as long as they take. A second signal goes to the
whole group: the launcher then stops the ranks within 30 s, checkpoint or not.

With a hostfile (ssh to other nodes) the ranks are not children of this machine's launcher: the
signal is passed to `deepspeed`, which stops every node's ranks through pdsh itself.
"""

import os
import signal
import socket
import subprocess
import sys

import psutil  # a dependency of deepspeed

SUPERVISOR_ENV = "SST_DIST_SUPERVISOR"  # sst_dist.runtime reads it; not imported: no torch here


def below(pid: int) -> list[tuple[psutil.Process, str]]:
    """(process, command line) of every descendant of pid that is still there."""
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for proc in procs:
        try:
            found.append((proc, " ".join(proc.cmdline())))
        except psutil.NoSuchProcess:
            continue
    return found


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    env = dict(os.environ, **{SUPERVISOR_ENV: f"{socket.gethostname()}:{os.getpid()}"})
    runner = subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", *argv],
                              start_new_session=True, env=env)
    signalled = []

    def forward(signum, frame):
        signalled.append(signum)
        tree = below(runner.pid) if len(signalled) == 1 else []
        # the ranks are the children of each node-local deepspeed.launcher.launch
        launchers = [proc for proc, cmd in tree if "deepspeed.launcher.launch" in cmd]
        targets = []
        for proc in launchers:
            try:
                targets += proc.children()
            except psutil.NoSuchProcess:
                continue
        if targets:
            for proc in targets:
                try:
                    proc.send_signal(signal.SIGTERM)
                except psutil.NoSuchProcess:
                    pass
            try:  # after a SIGHUP the terminal may be gone
                print(f"deepspeed_run: SIGTERM sent to {len(targets)} ranks; they checkpoint and exit"
                      " (signal again to stop them within 30 s)", file=sys.stderr, flush=True)
            except OSError:
                pass
        elif tree and not launchers and any("pdsh" in cmd for _, cmd in tree):
            runner.send_signal(signum)  # other nodes: deepspeed's own pdsh handler stops them
        else:  # a second signal, or no rank started yet: nothing to wait for
            try:
                os.killpg(runner.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = runner.wait()
    return 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + N


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
