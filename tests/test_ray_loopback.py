"""erc's local Ray (`init_ray` without RAY_ADDRESS: tests, pipelines/*) listens on loopback only, and leaves no
folder behind: its own erc-ray-* temp folder goes when the process ends, a dead process's at the next start.

The Ray is started in a program of its own, as a stage starts it (Ray's settings are read at import and at start).
"""

import ipaddress
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = """
import os, sys
import ray
from erc.training.cluster import init_ray

init_ray(num_cpus=2)

@ray.remote
def pid():
    return os.getpid()

@ray.remote
class Actor:
    def pid(self):
        return os.getpid()

actor = Actor.remote()
print(os.environ["RAY_TMPDIR"], ray.get(actor.pid.remote()), *ray.get([pid.remote() for _ in range(2)]), flush=True)
sys.stdin.readline()  # until the test has looked
"""


def ray_processes(driver: int, folder: str) -> list[psutil.Process]:
    """The driver, its descendants, and every process whose command line names its Ray folder (Ray's own)."""
    found = {driver: psutil.Process(driver)}
    found.update({p.pid: p for p in psutil.Process(driver).children(recursive=True)})
    for p in psutil.process_iter(["cmdline"]):
        if any(folder in arg for arg in p.info["cmdline"] or ()):
            found[p.pid] = p
    return list(found.values())


def listening_sockets(processes) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening socket of the processes still alive."""
    found = []
    for process in processes:
        try:
            sockets = [c for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
            name = " ".join(process.cmdline()[:2])[-90:]
        except psutil.NoSuchProcess:
            continue
        found += [(c.laddr.ip, c.laddr.port, name) for c in sockets]
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_local_ray_listens_on_loopback_only_and_leaves_no_folder(tmp_path):
    parent = Path("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    stale = parent / f"erc-ray-{gone.pid}-stale{os.getpid()}"
    (stale / "ray").mkdir(parents=True)
    alive = parent / f"erc-ray-{os.getpid()}-alive{os.getpid()}"  # this test's own: a live process
    alive.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    program = subprocess.Popen([sys.executable, "-c", PROGRAM], cwd=tmp_path, env=env, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = program.stdout.readline().split()
        assert line, "the program did not start Ray"
        folder, workers = line[0], {int(pid) for pid in line[1:]}
        time.sleep(2)  # the agents' and dashboard's late listeners
        processes = ray_processes(program.pid, folder)
        assert workers <= {p.pid for p in processes}
        sockets = listening_sockets(processes)
        listening = len(sockets)
        outside = [f"{ip}:{port} ({name})" for ip, port, name in sockets if not is_loopback(ip)]
        assert listening >= 6  # GCS, raylet, dashboard, its agent, the runtime-env agent, workers: all looked at
        assert not outside, "Ray listens beyond loopback: " + ", ".join(outside)
        assert not stale.exists(), "a dead process's Ray folder is left"
        assert alive.exists(), "a live process's Ray folder was removed"
    finally:
        program.stdin.close()
        program.wait(timeout=60)
        alive.rmdir()
    assert program.returncode == 0
    assert not Path(folder).exists(), f"{folder} is left after the program ended"
