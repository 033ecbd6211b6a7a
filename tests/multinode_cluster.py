"""A three-node Ray cluster on this machine where one node cannot see a directory (run as a script by tests).

    python tests/multinode_cluster.py HIDDEN_DIR

starts a head and one worker node with `ray.cluster_utils.Cluster`, and a third node with `ray start` in a
mount namespace of its own (`unshare -m`) where HIDDEN_DIR is an empty tmpfs: that node's workers see
nothing of what is written there, as a node without the shared filesystem would. It prints the cluster's
address on one line once the three nodes are alive, then keeps the cluster up until its stdin closes.

A separate process, so that the test process's own Ray connection (the session's local cluster) is left alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def main(hidden: str) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    blind = None
    try:
        cluster.add_node(num_cpus=1)
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        blind = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             f'mount -t tmpfs tmpfs "{hidden}" && exec "{ray_cli}" start --address={cluster.address} --num-cpus=1 '
             f'--block'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while sum(1 for n in cluster.global_state.node_table() if n["Alive"]) < 3:
            if blind.poll() is not None or time.time() > deadline:
                raise RuntimeError("the third node did not start")
            time.sleep(0.5)
        print(cluster.address, flush=True)
        sys.stdin.read()  # until the test is done with the cluster
    finally:
        if blind is not None and blind.poll() is None:
            blind.terminate()  # `ray start --block` stops its node's processes on SIGTERM
            try:
                blind.wait(timeout=60)
            except subprocess.TimeoutExpired:
                blind.kill()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
