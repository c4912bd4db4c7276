"""`simpo-interleave plan`: the worker's own programs compiled for a slice without one (targets), what XLA says
of their memory, FLOPs and collectives (report, hlo), and roofline time estimates. May import every package below it
(train, infer and down)."""
