"""Device meshes, parameter partitioning and multi-process helpers (see docs/scale_out.md)."""
from pilaf_jax.parallel.mesh import (BATCH_AXES, MESH_AXES, batch_sharding, batch_spec,
                                     check_batch_divisible, make_mesh, num_batch_shards, replicated,
                                     resolve_mesh_shape)
from pilaf_jax.parallel.multihost import (global_to_host, host_local_to_global,
                                          initialize_distributed, is_main_process, process_rows, sync)
from pilaf_jax.parallel.partitioning import (LLAMA_RULES, init_sharded_params, kv_cache_sharding,
                                             kv_cache_specs, optimizer_state_shardings,
                                             optimizer_state_specs, param_partition_specs,
                                             param_shardings, per_device_bytes, shard_params,
                                             sharded_init)
