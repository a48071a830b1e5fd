"""One process of a 2-process checkpoint check (tests/test_multiprocess.py::test_each_process_verifies_its_shards_
and_all_fall_back_together), joined through the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
variables, 2 CPU devices each.

    python tests/multiprocess_checkpoint.py DIR save      # checkpoints 1 and 2 of a state sharded over all 4 devices
    python tests/multiprocess_checkpoint.py DIR restore   # restore_latest; prints one JSON line: the step and values

Each process writes its own shards (DIR/<step>/state/ocdbt.process_<i>); the test damages one of them in between.
"""

import json
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from starling_jax.config import MeshConfig
from starling_jax.parallel.sharding import initialize_distributed
from starling_jax.step.checkpoint import Checkpoints


def state(step: int, sharding) -> dict:
    full = np.random.default_rng(step).standard_normal((512, 256)).astype(np.float32)
    return {"w": jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])}


def main(directory: str, phase: str) -> None:
    initialize_distributed(MeshConfig(distributed=True))
    assert jax.process_count() == 2 and jax.device_count() == 4
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
    ckpts = Checkpoints(directory, keep=5)
    if phase == "save":
        for step in (1, 2):
            ckpts.save(step, state(step, sharding), {"step": step}, {})
        ckpts.wait()
    else:
        restored = ckpts.restore_latest(state(0, sharding))
        mine = [np.asarray(s.data) for s in restored.state["w"].addressable_shards]
        expected = np.asarray(state(restored.step, sharding)["w"].addressable_shards[0].data)
        print(json.dumps({"process": jax.process_index(), "step": restored.step,
                          "data_state": restored.data_state, "matches_saved": bool(np.array_equal(mine[0], expected)),
                          "steps_left": ckpts.steps()}), flush=True)
    ckpts.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
