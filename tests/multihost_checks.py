"""One process of a two-process jax.distributed job on 127.0.0.1 (CPU collectives over gloo),
run by tests/test_multihost.py: tensor parallelism with T = 2 spanning the two processes.
Each process prints its greedy outputs as a JSON line. Then process 1 kills itself
(SIGKILL) and process 0 keeps generating: it prints the error it gets and how long it took.

    python tests/multihost_checks.py PROCESS_ID PORT CHECKPOINT
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(__file__))

PROMPTS = [[5, 9, 14, 3, 77], [100, 2, 64, 64, 31, 8, 19, 120, 7], [42]]


def main() -> None:
    process_id, port, checkpoint = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               heartbeat_timeout_seconds=10)
    from serving import generate_ids, make_llm

    llm = make_llm(checkpoint, tensor_parallel_size=2, warm_up=True, max_num_seqs=4, max_num_batched_tokens=32)
    devices = sorted(d.process_index for d in llm.engine.executor.model.mesh.devices.flat)
    print(json.dumps({"outputs": generate_ids(llm, PROMPTS), "mesh_processes": devices}), flush=True)
    if process_id == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.perf_counter()
    try:
        for _ in range(1000):
            generate_ids(llm, PROMPTS)
        print(json.dumps({"error": None}), flush=True)
    except RuntimeError as error:
        print(json.dumps({"error": str(error), "seconds": time.perf_counter() - start}), flush=True)
        os._exit(1)  # the coordination service would abort at exit anyway, its peer being gone


if __name__ == "__main__":
    main()
