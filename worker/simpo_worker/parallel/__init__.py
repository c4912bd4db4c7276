"""Many devices and hosts: the training mesh and what is placed on it, jax.distributed (barriers, the leader),
counted compiles and JAX's persistent compilation cache. May import model, store and contract."""
