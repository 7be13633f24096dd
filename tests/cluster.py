"""A real Redis Cluster on loopback ports for the tests: 3 masters + 3 replicas, created with `redis-cli --cluster
create`, AOF on, a short cluster-node-timeout so that a killed master's replica is promoted within seconds."""
from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from patchcore.embedded_redis import MIN_VERSION, free_port, server_version
from runtime.server_limits import server_args


def cluster_tools() -> tuple[str, str] | None:
    """(redis-server, redis-cli) >= 7.0 on PATH, or None."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not server or not cli or server_version(server)[:2] < MIN_VERSION:
        return None
    return server, cli


class LocalCluster:
    """`with LocalCluster() as cluster: cluster.url` (a node's URL); `kill_master(port)`, `wait_ok()`."""

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1500):
        tools = cluster_tools()
        if tools is None:
            raise FileNotFoundError("redis-server >= 7.0 and redis-cli are needed for a local cluster")
        self.server, self.cli = tools
        self.masters, self.replicas, self.node_timeout_ms = masters, replicas, node_timeout_ms
        self.ports = [free_port() for _ in range(masters * (1 + replicas))]
        self.dir = Path(tempfile.mkdtemp(prefix="patchcore-cluster-"))
        self.processes: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        """The URL of a live node (any node will do: the client finds the others)."""
        return f"redis://127.0.0.1:{self.alive()[0]}/0"

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=5)

    def start_node(self, port: int) -> None:
        folder = self.dir / str(port)
        folder.mkdir(exist_ok=True)
        self.processes[port] = subprocess.Popen(
            [self.server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-port", str(free_port()), "--cluster-config-file", str(folder / "nodes.conf"),
             "--cluster-node-timeout", str(self.node_timeout_ms), "--cluster-replica-validity-factor", "0",
             "--appendonly", "yes", "--save", "", "--dir", str(folder), "--daemonize", "no", "--logfile",
             str(folder / "log"), *server_args()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.node(port).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __enter__(self) -> "LocalCluster":
        try:
            for port in self.ports:
                self.start_node(port)
            subprocess.run([self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                            "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                           check=True, capture_output=True, timeout=60)
            self.wait_ok()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def alive(self) -> list[int]:
        return [p for p, process in self.processes.items() if process.poll() is None]

    def slot_map(self) -> dict[int, list[tuple[int, int]]]:
        """Port -> slot ranges of every live master serving slots, as a live node sees the cluster."""
        nodes = self.node(self.alive()[0]).cluster("nodes")
        return {int(address.rsplit(":", 1)[1]): [(int(lo), int(hi)) for lo, hi in node["slots"]]
                for address, node in nodes.items()
                if "master" in node["flags"] and "fail" not in node["flags"] and node["slots"]}

    def master_ports(self) -> list[int]:
        return sorted(self.slot_map())

    def port_of_slot(self, slot: int) -> int:
        for port, ranges in self.slot_map().items():
            if any(lo <= slot <= hi for lo, hi in ranges):
                return port
        raise LookupError(f"no live master serves slot {slot}")

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok and every slot has a live master (after a kill: until the
        killed master's replica has taken over its slots), and every live replica is in sync with its master."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                slots = self.slot_map()
                if all(self.node(p).cluster("info")["cluster_state"] == "ok" for p in self.alive()) \
                        and set(slots) <= set(self.alive()) \
                        and all(self.node(p).info("replication").get("master_link_status", "up") == "up"
                                for p in self.alive()) \
                        and sum(hi - lo + 1 for ranges in slots.values() for lo, hi in ranges) == 16384:
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def flush(self) -> None:
        for port in self.master_ports():
            self.node(port).flushall()

    def restart(self, port: int) -> None:
        """Start a killed node again (same files): it rejoins, as a replica if its slots moved meanwhile."""
        self.start_node(port)

    def replica_of(self, port: int) -> int:
        nodes = self.node(self.alive()[0]).cluster("nodes")
        master_id = next(n["node_id"] for address, n in nodes.items() if address.endswith(f":{port}"))
        return next(int(address.rsplit(":", 1)[1]) for address, n in nodes.items() if n["master_id"] == master_id)

    def pause(self, port: int) -> None:
        """SIGSTOP a node: it neither answers nor replicates (a stalled host or link) until resume()."""
        self.processes[port].send_signal(signal.SIGSTOP)

    def resume(self, port: int) -> None:
        self.processes[port].send_signal(signal.SIGCONT)

    def kill(self, port: int) -> None:
        """SIGKILL a node (no shutdown, no last AOF write)."""
        self.processes[port].send_signal(signal.SIGKILL)
        self.processes[port].wait(10)



def spread_cameras(cluster: LocalCluster, keys, per_master: int = 2) -> list[str]:
    """Camera names whose frame streams land `per_master` on each master (in master order)."""
    from redis.crc import key_slot

    wanted = {port: per_master for port in cluster.master_ports()}
    names, i = [], 0
    while any(wanted.values()):
        name = f"cam-{i}"
        port = cluster.port_of_slot(key_slot(keys.frames(name).encode()))
        if wanted[port]:
            wanted[port] -= 1
            names.append(name)
        i += 1
    return names
