"""jax.distributed across real local processes (CPU, gloo): barriers, their timeouts, and failure handling."""

import io
import sys
import textwrap

from local_hosts import host_envs
from simpo_interleave.host_processes import run_host_processes
from simpo_worker.parallel.distributed import process_id_from_env

SCRIPT = textwrap.dedent("""
    import sys, time, traceback
    from simpo_worker.parallel.distributed import BarrierTimeout, barrier, exit_now, initialize_from_env
    initialize_from_env(60)
    import jax, numpy as np
    from jax.experimental import multihost_utils
    barrier("start", 60)
    gathered = multihost_utils.process_allgather(np.array([jax.process_index() * 10]))
    print("gathered", gathered.ravel().tolist(), flush=True)
    if sys.argv[1] == "straggler" and jax.process_index() == 1:
        time.sleep(60)
    if sys.argv[1] == "crash" and jax.process_index() == 1:
        exit_now(42)
    try:
        barrier("end", 3)
    except BarrierTimeout:
        traceback.print_exc()
        exit_now(7)
    print("finished", flush=True)
""")


def run(tmp_path, mode, hosts=2):
    script = tmp_path / "host.py"
    script.write_text(SCRIPT)
    out = io.StringIO()
    code = run_host_processes([sys.executable, str(script), mode], host_envs(hosts), timeout_s=120, out=out)
    return code, out.getvalue()


def test_hosts_meet_and_gather(tmp_path):
    code, log = run(tmp_path, "ok", hosts=3)
    assert code == 0, log
    assert log.count("gathered [0, 10, 20]") == 3
    assert log.count("finished") == 3


def test_barrier_timeout_names_the_missing_host(tmp_path):
    code, log = run(tmp_path, "straggler")
    assert code == 7, log
    assert "barrier 'end': host(s) [1] did not arrive within 3s (this is host 0 of 2)" in log


def test_first_failure_stops_the_others(tmp_path):
    code, log = run(tmp_path, "crash")
    assert code == 42, log
    assert "host 1 exited with code 42" in log


def test_process_id_from_completion_index_and_slice():
    env = {"SIMPO_HOST_INDEX": "3", "SIMPO_SLICE_INDEX": "2", "SIMPO_HOSTS_PER_SLICE": "4"}
    assert process_id_from_env(env) == 11
    assert process_id_from_env({"JAX_PROCESS_ID": "5", **env}) == 5
