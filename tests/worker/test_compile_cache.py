"""The persistent compilation cache across a restart of the real worker: the first start compiles and saves every
program under `<output_dir>/compilation_cache`; the restart loads its train step and decode programs instead of
compiling them (counted from JAX's monitoring events in the `compile_cache` metrics records). Several CPU
processes run without it (tests/local/test_preemption.py)."""

from __future__ import annotations

import fsspec

from gcs_emulator import BUCKET, gcs_emulator, point_this_process_at
from simpo_worker.store import storage
from worker_runs import checked, records, run_worker, tiny_config

TRAIN_STEP, PREFILL, DECODE = "jit(train_step)", "jit(prefill)", "jit(decode_chunk)"


def config(output_dir: str, **overrides) -> dict:
    # Pauses after steps 1 and 3: a stop at 2 leaves the train step and a pause to both starts. Fixed-length
    # completions (ignore_eos): both pauses run the same decode shapes.
    return tiny_config(output_dir, **{
        "trainer.num_train_steps": 4,
        "inference": {"eval_at_steps": [1, 3], "synthetic_prompt_count": 6, "max_new_tokens": 8,
                      "max_prompt_len": 48, "batch_size": 4, "ignore_eos": True},
        # Every program, however fast it compiles on this machine.
        "compilation_cache": {"min_compile_time_s": 0}, **overrides})


def compile_records(output_dir: str) -> list[dict]:
    """One after each start's first train step and after each of its pauses; counts since the start."""
    return records(output_dir, "compile_cache")


def hits_and_misses(record: dict, name: str) -> tuple[int, int]:
    return record["programs"][name]["hits"], record["programs"][name]["misses"]


def test_restart_loads_its_programs_from_the_cache_on_gcs(monkeypatch):
    """The cache in its default place under a gs:// output dir, as on GKE (JAX reads and writes it through
    etils.epath and gcsfs; here fake-gcs-server)."""
    with gcs_emulator() as env:
        point_this_process_at(env, monkeypatch)
        out = f"gs://{BUCKET}/run"
        checked(run_worker(config(out), "--stop-at-step", "2", env=env))
        checked(run_worker(config(out), env=env))
        records = compile_records(out)
        fs, path = fsspec.core.url_to_fs(storage.join(out, "compilation_cache"))
        assert any(name.rsplit("/", 1)[-1].startswith("jit_train_step-") for name in fs.ls(path))

    assert [r["step"] for r in records] == [1, 1, 3, 3]
    first, restart = records[1], records[3]
    assert hits_and_misses(records[0], TRAIN_STEP) == (0, 1)
    assert hits_and_misses(records[2], TRAIN_STEP) == (1, 0)
    for name in (PREFILL, DECODE):
        hits, misses = hits_and_misses(first, name)
        assert hits == 0 and misses >= 1, name
        # The same decode shapes at both pauses: each loaded as often as it was compiled.
        assert hits_and_misses(restart, name) == (misses, 0), name
    # Nothing at all is compiled again: every program of the first start was saved (min_compile_time_s 0).
    assert first["hits"] == 0 and restart["misses"] == 0 and restart["hits"] == first["misses"]
    assert restart["compile_seconds"] < first["compile_seconds"]
    print(f"compile seconds: first start {first['compile_seconds']:.1f} ({first['misses']} programs compiled), "
          f"restart {restart['compile_seconds']:.1f} ({restart['hits']} loaded); train step "
          f"{first['programs'][TRAIN_STEP]['seconds']:.1f} -> {restart['programs'][TRAIN_STEP]['seconds']:.2f}, "
          f"decode programs {sum(first['programs'][n]['seconds'] for n in (PREFILL, DECODE)):.1f} -> "
          f"{sum(restart['programs'][n]['seconds'] for n in (PREFILL, DECODE)):.2f}")


def test_cache_off(tmp_path):
    """compilation_cache.enabled false: nothing is saved, so nothing can be loaded."""
    out = tmp_path / "run"
    checked(run_worker(config(str(out), compilation_cache={"enabled": False})))
    records = compile_records(str(out))
    assert [r["step"] for r in records] == [1, 1, 3]
    assert all(r["hits"] == 0 for r in records) and hits_and_misses(records[0], TRAIN_STEP) == (0, 1)
    assert not (out / "compilation_cache").exists()
